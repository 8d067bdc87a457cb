"""Image bytes <-> tensors, with the input limits enforced before any pixel is decoded."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .config import Limits
from .errors import BadRequest, InvalidParameter, TooLarge, UnsupportedMedia

# Decoders we let Pillow try: obscure ones carry most of its CVEs. Pillow's
# name -> the name a client's error message gives.
_FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF"}
ACCEPTED_FORMATS = tuple(_FORMAT_NAMES)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


_RST_OR_STUFFED = frozenset([0x00, *range(0xD0, 0xD8)])  # not markers inside entropy-coded data
_STANDALONE = frozenset([0x01, *range(0xD0, 0xDA)])  # TEM, RSTn, SOI, EOI: no length field


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """Count the start-of-scan markers of a JPEG by walking its segments,
    stopping once the count passes `stop_after`.

    Decode cost grows with the number of scans times the pixels: a progressive
    JPEG can repeat scans tens of thousands of times within the byte and pixel
    limits and keep a decoder busy for minutes, so this is checked before any
    pixel is decoded. Bytes inside other segments (an EXIF thumbnail) and
    inside entropy-coded data are skipped, not counted."""
    scans, pos, end = 0, 2, len(data)
    while pos + 1 < end:
        if data[pos] != 0xFF:
            pos += 1  # garbage between segments: libjpeg skips it too
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE or marker == 0x00:
            pos += 2
            continue
        if pos + 3 >= end:
            break
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        if scans > stop_after:
            break
        # Entropy-coded data runs to the next 0xFF that is not stuffing or RSTn.
        while True:
            pos = data.find(b"\xff", pos)
            if pos < 0 or pos + 1 >= end:
                return scans
            if data[pos + 1] in _RST_OR_STUFFED or data[pos + 1] == 0xFF:
                pos += 1 if data[pos + 1] == 0xFF else 2
                continue
            break
    return scans


def decode(data: bytes, field: str, limits: Limits, *, draft_size: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image, EXIF orientation applied.

    Format is sniffed from the bytes (the declared type is ignored); size and
    pixel count are checked from the header, before decoding. `draft_size`
    lets JPEG decode at a reduced scale when the result is downscaled anyway."""
    if not data:
        raise BadRequest(field, f"{field}: empty image")
    if len(data) > limits.max_input_bytes:
        raise TooLarge(field, f"{field}: {len(data)} bytes, more than the limit of {limits.max_input_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        if isinstance(e, UnidentifiedImageError):
            accepted = ", ".join(_FORMAT_NAMES.values())
            raise UnsupportedMedia(field, f"{field}: not an accepted image format ({accepted})") from None
        raise TooLarge(field, f"{field}: too many pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise BadRequest(field, f"{field}: unreadable image data") from None
    w, h = img.size
    if w * h > limits.max_input_pixels:
        raise TooLarge(field, f"{field}: {w}x{h} px, more than the limit of {limits.max_input_pixels} pixels")
    if min(w, h) < limits.min_input_side:
        raise InvalidParameter(field, f"{field}: {w}x{h} px, each side must be at least {limits.min_input_side} px")
    if img.format == "JPEG":
        scans = jpeg_scans(data, limits.max_jpeg_scans)
        if scans > limits.max_jpeg_scans:
            raise TooLarge(field, f"{field}: a JPEG of more than {limits.max_jpeg_scans} scans "
                                  f"(this server's limit); re-encode it as baseline or standard progressive JPEG")
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise BadRequest(field, f"{field}: truncated or corrupt image data") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16-bit is rescaled (Pillow's convert
    clamps it), transparency is composited onto white."""
    if img.mode in _SIXTEEN_BIT:
        img = Image.fromarray(_to_8_bits(np.asarray(img)), "L")
    if img.mode == "P" or img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _to_8_bits(arr: np.ndarray) -> np.ndarray:
    """(H, W) 16-bit levels (or Pillow's 32-bit "I") -> (H, W) uint8, each
    v / 257 rounded and clipped to [0, 255], computed in integers
    ((v + 128) // 257 is that rounding: v / 257 is never a half) a block of
    rows at a time. Float64 copies of the whole image took 20 bytes a pixel
    (tests/core/test_imageio.py measures the peak), about 1 GB for a
    7000x7000 grayscale PNG of 110 kB."""
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, _LEVELS_BLOCK_PIXELS // max(1, arr.shape[1]))
    for top in range(0, arr.shape[0], rows):
        block = arr[top:top + rows].astype(np.int64)  # int32 "I" levels may be negative or past 65535
        block += 128
        block //= 257
        np.clip(block, 0, 255, out=block)
        out[top:top + rows] = block
    return out


_LEVELS_BLOCK_PIXELS = 1 << 20  # 8 MB of int64 per block


def fit_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """(width, height) scaled down (never up) so the longest side is at most `longest`."""
    w, h = size
    if max(w, h) <= longest:
        return w, h
    scale = longest / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def fit(img: Image.Image, longest: int) -> Image.Image:
    """Scale down (never up) so the longest side is at most `longest`."""
    size = fit_size(img.size, longest)
    return img if size == img.size else img.resize(size, Image.LANCZOS)


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to exactly (width, height)."""
    return img if img.size == size else img.resize(size, Image.LANCZOS)


def to_tensor(img: Image.Image, device: torch.device | str = "cpu") -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    return (t.to(device=device, dtype=torch.float32) / 255.0).contiguous()


def to_image(pixels: Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> RGB PIL image."""
    arr = (pixels.detach()[0].clamp(0, 1) * 255).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), "RGB")  # (H, W, 3)


CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode(pixels: Tensor, fmt: str = "png", quality: int = 90) -> bytes:
    """(1, 3, H, W) in [0, 1] -> encoded bytes of `fmt` (png, jpeg, webp)."""
    buf = io.BytesIO()
    img = to_image(pixels)
    if fmt == "png":
        img.save(buf, "PNG")
    elif fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, "WEBP", quality=quality)
    return buf.getvalue()


def as_delivered(pixels: Tensor, fmt: str = "png", quality: int = 90) -> Tensor:
    """(1, 3, H, W) 8-bit levels in [0, 1] -> the pixels a client decodes from
    `encode(pixels, fmt, quality)`, on the same device: the same pixels for
    PNG (lossless), the compressed image's for JPEG and WebP, whose loss the
    server reports (the contract: the loss of the image actually returned).
    Encoding is deterministic, so these are the bytes the answer carries."""
    if fmt == "png":
        return pixels
    with Image.open(io.BytesIO(encode(pixels, fmt, quality))) as img:
        return to_tensor(img, pixels.device)
