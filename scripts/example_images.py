"""The bundled example images, shrunk for tests, the load test and the benchmark's smoke runs."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def thumbnail(name: str, size: int, fmt: str = "PNG") -> bytes:
    """examples/<name> scaled to fit size x size (aspect kept), encoded as `fmt`."""
    img = Image.open(EXAMPLES / name).convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()
