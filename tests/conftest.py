"""Fixtures shared by the core and handler tiers: one deterministic random VGG19
per session and small synthetic images (a smooth gradient "content" and a
striped, differently coloured "style", so the two really differ)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from hypothesis import settings
from PIL import Image

from nst.vgg import VGGFeatures, random_features_state

# The property tests (tests/core/test_properties.py) draw the same examples on
# every run, so that a clean CI run's verdict depends on the commit alone, not
# on the draw. HYPOTHESIS_PROFILE=explore draws new ones each run (and keeps
# what failed in .hypothesis/ to replay first next time).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def pytest_collection_modifyitems(config, items):
    """Mark `gpu` the tests that skip without a GPU (their skipif's reason
    starts "needs a GPU"), so that a lent GPU's short session runs just
    those: bench/gpu_session.sh runs `pytest -m gpu` over the core's files
    that have them. (Not over all of tests/core: test_fetch.py imports
    requests_hardened, which a GPU machine's own Python may not have.)"""
    for item in items:
        if any(str(m.kwargs.get("reason", "")).startswith("needs a GPU") for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


def content_image(w: int = 48, h: int = 32) -> Image.Image:
    """Smooth colour gradient with a dark disc: low-frequency, warm."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 0.25 + 0.7 * x / max(w - 1, 1)
    g = 0.2 + 0.5 * y / max(h - 1, 1)
    b = np.full_like(x, 0.3)
    disc = (x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 4) ** 2
    rgb = np.stack([r, g, b], -1)
    rgb[disc] *= 0.4
    return Image.fromarray(np.rint(rgb * 255).astype(np.uint8), "RGB")


def style_image(w: int = 32, h: int = 32) -> Image.Image:
    """Diagonal stripes plus a checkerboard in blue/green: high-frequency, cool."""
    y, x = np.mgrid[0:h, 0:w]
    stripes = ((x + y) // 3) % 2
    checker = ((x // 4) + (y // 4)) % 2
    rgb = np.zeros((h, w, 3), np.float64)
    rgb[..., 0] = 0.1 + 0.2 * checker
    rgb[..., 1] = 0.3 + 0.5 * stripes
    rgb[..., 2] = 0.9 - 0.4 * checker * stripes
    return Image.fromarray(np.rint(rgb * 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [0, 1] (independent of nst.imageio)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


class Images:
    """Helpers handed to tests through the `images` fixture."""

    content = staticmethod(content_image)
    style = staticmethod(style_image)
    encode = staticmethod(encode)
    tensor = staticmethod(to_tensor)

    @staticmethod
    def png(img: Image.Image) -> bytes:
        return encode(img, "PNG")

    @staticmethod
    def jpeg(img: Image.Image, **kwargs) -> bytes:
        return encode(img, "JPEG", **kwargs)

    @staticmethod
    def open(data: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img


@pytest.fixture(scope="session")
def images() -> type[Images]:
    return Images


@pytest.fixture(autouse=True)
def _nothing_kept():
    """Each test starts and ends with no kept optimization (KEEP_PROGRAMS, on
    a GPU): one kept by an earlier test would carry that test's monkeypatches
    (a patched loss, a step bound) into this one, and its memory into a peak."""
    from nst.optimize import drop_programs

    drop_programs()
    yield
    drop_programs()


@pytest.fixture(scope="session")
def vgg_state() -> dict[str, torch.Tensor]:
    """torchvision's VGG19 init under seed 0, features up to conv5_1 (`N.weight` keys)."""
    return random_features_state(0)


@pytest.fixture(scope="session")
def vgg(vgg_state) -> VGGFeatures:
    return VGGFeatures(vgg_state)
