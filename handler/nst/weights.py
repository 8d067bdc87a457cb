"""Loading the shipped VGG19 feature weights and knowing where they came from."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from .vgg import features_state_dict

log = logging.getLogger(__name__)

KINDS = ("imagenet", "random", "custom")
# The weights file's name: in weights/ (scripts/fetch_weights.py writes it) and
# as the archive's serialized file. Shell scripts, the Makefile and the
# Dockerfile spell it too; tests/scripts/test_scripts.py checks they agree.
FILE_NAME = "vgg19_features.pth"
RANDOM_WARNING = (
    "VGG19 weights are RANDOM (offline fallback): results are a texture-transfer "
    "approximation, not ImageNet style transfer. Run scripts/fetch_weights.py "
    "where the network allows, or pass --weights FILE."
)


def sidecar(path: Path) -> Path:
    """The JSON beside a weights file that records its kind."""
    return path.with_suffix(".json")


def kind_of(path: str | Path) -> str:
    """The kind its sidecar records for a weights file; `custom` without one."""
    meta = sidecar(Path(path))
    kind = json.loads(meta.read_text()).get("kind", "custom") if meta.exists() else "custom"
    return kind if kind in KINDS else "custom"


def load(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """(features state dict, kind). Kind comes from the sidecar JSON written by
    scripts/fetch_weights.py; a file without one is `custom`."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    kind = kind_of(path)
    if kind == "random":
        log.warning(RANDOM_WARNING)
    return features_state_dict(state), kind
