"""The optimization loop: content + style tensors in, the delivered image out."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .config import Params
from .losses import make_objective
from .vgg import VGGFeatures

log = logging.getLogger(__name__)


class BudgetExceeded(Exception):
    """The request's time budget ran out before the last step."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Progress:
    step: int  # steps finished so far
    steps: int  # steps asked for
    loss: float  # loss of the image before this step's update
    elapsed_ms: float


@dataclass(frozen=True)
class Result:
    image: Tensor  # (1, 3, H, W) in [0, 1], on 8-bit levels: what is delivered
    loss: float  # the recipe's loss of `image` itself
    steps: int
    elapsed_ms: float
    history: list[Progress] = field(default_factory=list)


Callback = Callable[[Progress], None]


def quantize(pixels: Tensor) -> Tensor:
    """Clamp to [0,1] and round to 8-bit levels, as the encoded PNG will be."""
    return torch.round(pixels.clamp(0, 1) * 255) / 255


def transfer_luminance(stylized: Tensor, content: Tensor) -> Tensor:
    """Stylized luminance with the content's chrominance (Gatys et al. 2016,
    'Preserving colour'), using the BT.601 YCbCr transform."""
    def to_ycc(rgb: Tensor) -> Tensor:
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        y = 0.299 * r + 0.587 * g + 0.114 * b
        return torch.stack([y, (b - y) * 0.564, (r - y) * 0.713], 1)

    y = to_ycc(stylized)[:, :1]
    cc = to_ycc(content)[:, 1:]
    cb, cr = cc[:, 0:1], cc[:, 1:2]
    r = y + 1.403 * cr
    b = y + 1.773 * cb
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return torch.cat([r, g, b], 1).clamp(0, 1)


def _initial_image(content: Tensor, params: Params) -> Tensor:
    if params.init == "content":
        return content.clone()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else torch.seed())
    return torch.rand(content.shape, generator=gen).to(content.device)


def stylize(
    vgg: VGGFeatures,
    content: Tensor,
    styles: Sequence[Tensor],
    params: Params,
    *,
    callback: Callback | None = None,
    deadline: float | None = None,
    progress_every: int = 1,
) -> Result:
    """Optimize an image against `content` (1,3,H,W) and `styles` (each
    (1,3,h,w)), all [0,1] RGB on the extractor's device.

    The seed preset (recipe mode) optimizes ImageNet-normalized pixels with no
    constraint, step for step as the tutorial does; the fast preset optimizes
    [0,1] pixels and projects them back into range after every step, so the
    image it optimizes is the image it delivers. `deadline` is a
    `time.monotonic()` value; past it, `BudgetExceeded` is raised.
    """
    start = time.monotonic()
    objective = make_objective(
        vgg,
        vgg.normalize(content),
        [vgg.normalize(s) for s in styles],
        style_layer_weights=params.style_layer_weights,
        content_weight=params.content_weight,
        style_weight=params.style_weight,
        tv_weight=params.tv_weight,
        style_blend=params.style_blend,
        pooling=params.pooling,
    )
    if params.recipe_mode:
        var = vgg.normalize(_initial_image(content, params)).requires_grad_(True)
        to_input = lambda v: v  # noqa: E731  the variable already is VGG's input
        to_pixels = vgg.denormalize
    else:
        var = _initial_image(content, params).requires_grad_(True)
        to_input = vgg.normalize
        to_pixels = lambda v: v  # noqa: E731

    if params.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([var], lr=params.lr)
    else:
        # One L-BFGS iteration per .step(): steps count iterations, and the
        # deadline and progress are checked between them. Short history: the
        # two-loop recursion is vector work on image-sized buffers.
        opt = torch.optim.LBFGS([var], lr=params.lr, max_iter=1, history_size=10)

    history: list[Progress] = []
    last_loss = math.nan

    def closure() -> Tensor:
        nonlocal last_loss
        opt.zero_grad(set_to_none=True)
        loss = objective(to_input(var)).total
        loss.backward()
        last_loss = loss.item()
        return loss

    with torch.enable_grad():
        for step in range(1, params.steps + 1):
            if deadline is not None and time.monotonic() > deadline:
                raise BudgetExceeded(f"time budget ran out after {step - 1} of {params.steps} steps")
            opt.step(closure)
            if not math.isfinite(last_loss):
                raise Diverged(f"loss became {last_loss} at step {step}")
            if not params.recipe_mode:
                with torch.no_grad():
                    var.clamp_(0, 1)
            if step % progress_every == 0 or step == params.steps:
                p = Progress(step, params.steps, last_loss, (time.monotonic() - start) * 1e3)
                history.append(p)
                if callback is not None:
                    callback(p)

    with torch.no_grad():
        delivered = quantize(to_pixels(var.detach()))
        if params.preserve_color:
            delivered = quantize(transfer_luminance(delivered, content))
        final = objective(vgg.normalize(delivered)).total.item()
    if not math.isfinite(final):
        raise Diverged(f"loss of the delivered image is {final}")
    return Result(delivered, final, params.steps, (time.monotonic() - start) * 1e3, history)
