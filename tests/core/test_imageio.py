"""Decoding with limits enforced, colour-mode normalization, encoding."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from nst import Limits, RequestError
from nst import imageio
from nst.optimize import quantize

LIMITS = Limits()


def noisy(w: int, h: int, seed: int = 0) -> Image.Image:
    """Incompressible content, so encoded files are long enough to truncate mid-data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def raises(data: bytes, code: int, field: str = "content", limits: Limits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        imageio.decode(data, field, limits)
    err = info.value
    assert err.code == code, err.message
    assert err.field == field
    assert err.message.startswith(f"{field}:")
    return err


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_accepted_formats_decode_to_rgb_of_right_size(images, fmt):
    src = images.content(40, 24)
    img = imageio.decode(images.encode(src, fmt), "content", LIMITS)
    assert img.mode == "RGB" and img.size == (40, 24)
    if fmt == "PNG":  # lossless: identical pixels
        assert np.array_equal(np.asarray(img), np.asarray(src))
    else:  # lossy or palette: close
        diff = np.abs(np.asarray(img, np.int16) - np.asarray(src, np.int16))
        assert diff.mean() < 12


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(None, id="bmp"),
        pytest.param(b"this is not an image at all, just text" * 3, id="text"),
        pytest.param(bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)), id="random-bytes"),
    ],
)
def test_unaccepted_format_is_415_naming_the_field(images, data):
    if data is None:
        data = images.encode(images.content(32, 32), "BMP")
        assert Image.open(io.BytesIO(data)).format == "BMP"  # Pillow could decode it: we refuse
    raises(data, 415, field="style_2")


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO"])
def test_other_pillow_formats_are_refused(images, fmt):
    raises(images.encode(images.content(32, 32), fmt), 415)


def test_empty_is_400():
    raises(b"", 400)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_400(images, fmt):
    data = images.encode(noisy(64, 64), fmt)
    raises(data[: len(data) // 2], 400)


def test_too_many_pixels_is_413(images):
    data = images.png(images.content(40, 30))
    raises(data, 413, limits=Limits(max_input_pixels=40 * 30 - 1))
    assert imageio.decode(data, "content", Limits(max_input_pixels=40 * 30)).size == (40, 30)


def test_too_many_bytes_is_413(images):
    data = images.png(images.content(40, 30))
    raises(data, 413, limits=Limits(max_input_bytes=len(data) - 1))
    assert imageio.decode(data, "content", Limits(max_input_bytes=len(data))).size == (40, 30)


@pytest.mark.parametrize("size", [(8, 40), (40, 8), (15, 15)])
def test_side_below_minimum_is_422(images, size):
    raises(images.png(images.content(*size)), 422, limits=Limits(min_input_side=16))


def test_decompression_bomb_header_is_413_not_a_crash():
    # a PNG header claiming 100000 x 100000 px (beyond Pillow's own bomb limit)
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")
    raises(data, 413)


def test_exif_orientation_is_applied():
    # 40x24 image with a red marker in the top-left corner, stored with
    # Orientation=6 ("rotate 90 CW to display")
    arr = np.full((24, 40, 3), 200, np.uint8)
    arr[:8, :8] = (255, 0, 0)
    img = Image.fromarray(arr, "RGB")
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)

    out = imageio.decode(buf.getvalue(), "content", LIMITS)
    assert out.size == (24, 40)
    shown = np.asarray(out, np.int16)
    # rotating 90 degrees clockwise moves the top-left corner to the top-right
    assert shown[:6, -6:, 0].mean() > 230 and shown[:6, -6:, 1].mean() < 40
    assert shown[:6, :6, 1].mean() > 150  # and the top-left is background now


def test_rgba_is_composited_on_white():
    arr = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
    arr[0, 0] = (10, 20, 30, 255)  # opaque
    arr[0, 1] = (255, 0, 0, 128)  # half-transparent red
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG")
    out = np.asarray(imageio.decode(buf.getvalue(), "content", LIMITS), np.int16)
    assert tuple(out[5, 5]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (10, 20, 30)
    a = 128 / 255
    expected = [round(255 * a + 255 * (1 - a)), round(0 * a + 255 * (1 - a)), round(0 * a + 255 * (1 - a))]
    assert np.abs(out[0, 1] - expected).max() <= 1


def test_sixteen_bit_levels_are_rounded_as_the_reference_formula_with_bounded_memory():
    """Every 16-bit level, and 32-bit "I" levels out of that range, to 8 bits
    as round(v / 257) clipped to [0, 255], without whole-image float copies
    (they took 20 bytes a pixel: about 1 GB for a 7000x7000 grayscale PNG)."""
    import tracemalloc

    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = imageio._to_8_bits(every)
    assert got.dtype == np.uint8
    assert np.array_equal(got, np.clip(np.rint(every / 257.0), 0, 255).astype(np.uint8))
    wide = np.array([[-70000, -1, 0, 128, 129, 65535, 65536, 2**31 - 1]], np.int32)
    assert imageio._to_8_bits(wide).tolist() == [[0, 0, 0, 0, 1, 255, 255, 255]]
    big = np.zeros((3000, 3000), np.uint16)
    tracemalloc.start()
    try:
        imageio._to_8_bits(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * big.size, peak  # the uint8 result and a block or two; a float64 copy alone is 8 bytes a pixel


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.zeros((16, 16), np.uint16)
    values[0, 0], values[0, 1], values[0, 2], values[0, 3] = 65535, 32896, 1000, 257
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = np.asarray(imageio.decode(buf.getvalue(), "content", LIMITS))
    assert out.shape == (16, 16, 3)
    for x, v in enumerate((65535, 32896, 1000, 257)):
        assert list(out[0, x]) == [round(v / 257)] * 3  # 255, 128, 4, 1 (clipping would give 255s)
    assert list(out[5, 5]) == [0, 0, 0]


def test_palette_and_cmyk_convert(images):
    src = images.content(32, 32)
    pal = src.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = imageio.decode(images.png(pal), "content", LIMITS)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))

    cmyk = src.convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    out = imageio.decode(buf.getvalue(), "content", LIMITS)
    assert out.mode == "RGB" and out.size == (32, 32)
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(cmyk.convert("RGB"), np.int16))
    assert diff.mean() < 8


def test_grayscale_and_la_convert():
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    buf = io.BytesIO()
    gray.save(buf, "PNG")
    out = np.asarray(imageio.decode(buf.getvalue(), "content", LIMITS))
    assert np.array_equal(out[..., 0], np.asarray(gray)) and np.array_equal(out[..., 0], out[..., 2])

    la = Image.merge("LA", [gray, Image.new("L", (16, 16), 0)])  # fully transparent
    buf = io.BytesIO()
    la.save(buf, "PNG")
    assert (np.asarray(imageio.decode(buf.getvalue(), "content", LIMITS)) == 255).all()


def test_fit_scales_down_only(images):
    img = images.content(80, 40)
    assert imageio.fit(img, 40).size == (40, 20)
    assert imageio.fit(img, 80) is img
    assert imageio.fit(img, 200) is img
    # the size alone (what a worker's warm-up compiles for a preset), rounded as images are
    assert [imageio.fit_size(size, 400) for size in ((512, 341), (1000, 3), (300, 200))] == \
        [imageio.fit(images.content(*size), 400).size for size in ((512, 341), (1000, 3), (300, 200))] == \
        [(400, 266), (400, 1), (300, 200)]


def test_to_tensor_layout(images):
    img = images.content(40, 24)
    t = imageio.to_tensor(img)
    assert t.shape == (1, 3, 24, 40) and t.dtype == torch.float32
    torch.testing.assert_close(t, images.tensor(img))


def test_png_encode_round_trips_the_quantized_pixels():
    gen = torch.Generator().manual_seed(0)
    pixels = quantize(torch.rand(1, 3, 20, 28, generator=gen) * 1.2 - 0.1)
    data = imageio.encode(pixels, "png")
    back = imageio.decode(data, "content", LIMITS)
    assert Image.open(io.BytesIO(data)).format == "PNG"
    torch.testing.assert_close(imageio.to_tensor(back), pixels, rtol=0, atol=0)


@pytest.mark.parametrize("fmt, pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_lossy_encode_formats_and_quality(fmt, pil):
    gen = torch.Generator().manual_seed(1)
    pixels = quantize(torch.rand(1, 3, 32, 32, generator=gen))
    hi = imageio.encode(pixels, fmt, 95)
    lo = imageio.encode(pixels, fmt, 5)
    assert Image.open(io.BytesIO(hi)).format == pil
    assert Image.open(io.BytesIO(hi)).size == (32, 32)
    assert len(lo) < len(hi)
    assert imageio.CONTENT_TYPES[fmt] == f"image/{fmt}"


def _jpeg(img, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def test_jpeg_scans_counts_start_of_scan_markers_only():
    from nst.imageio import jpeg_scans

    rgb = Image.new("RGB", (64, 48), (10, 200, 30))
    assert jpeg_scans(_jpeg(rgb), 1000) == 1
    assert jpeg_scans(_jpeg(rgb, progressive=True), 1000) == 10  # libjpeg's standard progressive script
    assert jpeg_scans(_jpeg(rgb.convert("L"), progressive=True), 1000) == 6
    # An embedded progressive JPEG (in an APP segment) is payload, not scans of this image.
    inner = _jpeg(rgb, progressive=True)
    outer = _jpeg(rgb)
    app = b"\xff\xe9" + (len(inner) + 2).to_bytes(2, "big") + inner
    assert jpeg_scans(outer[:2] + app + outer[2:], 1000) == 1


def test_jpeg_scans_stops_counting_past_the_limit_and_decode_refuses():
    from nst.imageio import jpeg_scans

    data = _jpeg(Image.new("L", (64, 64), 128), progressive=True)
    scan = data[data.rfind(b"\xff\xda"):-2]
    bomb = data[:-2] + scan * 500 + b"\xff\xd9"
    assert jpeg_scans(bomb, 10_000) == 506
    assert jpeg_scans(bomb, 100) == 101
    with pytest.raises(RequestError) as e:
        imageio.decode(bomb, "style", Limits())
    assert e.value.code == 413 and e.value.message.startswith("style: a JPEG of more than 100 scans")


def test_as_delivered_is_what_a_client_decodes_from_the_encoded_answer():
    """The image the reported loss scores: PNG's pixels as they are, a lossy
    format's after its compression, bit for bit what decoding the answer gives."""
    from nst.imageio import as_delivered, encode

    gen = torch.Generator().manual_seed(0)
    pixels = torch.round(torch.rand(1, 3, 24, 40, generator=gen) * 255) / 255
    assert as_delivered(pixels, "png") is pixels
    for fmt in ("jpeg", "webp"):
        seen = as_delivered(pixels, fmt, 50)
        with Image.open(io.BytesIO(encode(pixels, fmt, 50))) as img:
            decoded = torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1).unsqueeze(0) / 255
        assert seen.shape == pixels.shape and torch.equal(seen, decoded.float())
        assert not torch.equal(seen, pixels)  # the compression changed it
