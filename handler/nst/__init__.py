"""Gatys neural style transfer: the pure core (no TorchServe imports)."""
from .config import Limits, Params
from .errors import RequestError
from .request import Request, parse_request
from .pipeline import Output, run
from .optimize import BudgetExceeded, Diverged, Progress, Result, WouldExceedBudget, stylize
from .vgg import VGGFeatures

__all__ = [
    "BudgetExceeded", "Diverged", "Limits", "Output", "Params", "Progress", "Request",
    "RequestError", "Result", "VGGFeatures", "WouldExceedBudget", "parse_request", "run", "stylize",
]
