"""The bad-input rows of the security matrix, through the real server: each
gets its status and a JSON error naming the field, the worker keeps its PID;
awkward but valid images (EXIF-rotated, CMYK, 16-bit, palette, alpha) work."""
from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from image_server import ImageServer
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.server


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


BASE = Image.open(ROOT / "examples" / "tubingen.jpg").convert("RGB")
BASE.thumbnail((64, 64))  # 64x48
GOOD = _encode(BASE, "PNG")


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height; almost no data follows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
PSD = b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03" + struct.pack(">II", 48, 64) + b"\x00\x08\x00\x03" + b"\x00" * 64


@pytest.mark.parametrize(
    "content, code",
    [
        (b"", 400),
        (SVG, 415),
        (PDF, 415),
        (PSD, 415),
        (_encode(BASE, "TIFF"), 415),
        (_encode(BASE, "BMP"), 415),
        (GOOD[:200], 400),
        (_png_claiming(100_000, 100_000), 413),
    ],
    ids=["empty", "svg", "pdf", "psd", "tiff", "bmp", "truncated", "header-bomb"],
)
def test_bad_images_are_refused_with_the_contract_status(server, content, code):
    pids = server.worker_pids()
    r = server.predict(files={"content": content, "style": GOOD}, data={"steps": "1", "max_size": "32"})
    assert r.status_code == code, r.text
    body = r.json()
    assert body["code"] == code and body["message"].startswith("content")
    assert server.worker_pids() == pids


@pytest.mark.parametrize(
    "style, code",
    [("not base64 at all!", 400), ("data:image/png;base64,@@@@", 400), ("", 400)],
    ids=["garbage", "bad-data-url", "empty"],
)
def test_bad_base64_is_400_naming_the_field(server, style, code):
    pids = server.worker_pids()
    r = server.predict(json={"content": base64.b64encode(GOOD).decode(), "style": style, "steps": 1})
    assert r.status_code == code, r.text
    assert r.json()["message"].startswith("style")
    assert server.worker_pids() == pids


@pytest.mark.parametrize(
    "field, value",
    [("steps", True), ("steps", 2.5), ("lr", "inf"), ("max_size", -1), ("style_blend", [1, 2]),
     ("style_layer_weights", {"conv9_9": 1}), ("seed", "x"), ("quality", 0),
     ("steps", "\u0661"), ("deadline", "1_0")],  # int()/float() read Arabic-Indic digits and underscores
)
def test_wrong_typed_json_parameters_are_422(server, field, value):
    body = {"content": base64.b64encode(GOOD).decode(), "style": base64.b64encode(GOOD).decode(),
            "steps": 1, field: value}
    pids = server.worker_pids()
    r = server.predict(json=body)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(field)
    assert server.worker_pids() == pids


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(BASE, "JPEG", exif=exif.tobytes())


def _sixteen_bit() -> bytes:
    grey = (np.asarray(BASE.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return _encode(Image.fromarray(grey), "PNG")  # uint16 -> mode I;16


def _alpha() -> bytes:
    rgba = BASE.convert("RGBA")
    rgba.putalpha(128)
    return _encode(rgba, "PNG")


@pytest.mark.parametrize(
    "content, size",
    [
        (_exif_rotated(), (24, 32)),  # displayed portrait: 48x64 at max_size 32
        (_encode(BASE.convert("CMYK"), "JPEG"), (32, 24)),
        (_sixteen_bit(), (32, 24)),
        (_encode(BASE.convert("P"), "PNG"), (32, 24)),
        (_alpha(), (32, 24)),
        (_encode(BASE, "WEBP"), (32, 24)),
        (_encode(BASE, "GIF"), (32, 24)),
    ],
    ids=["exif-rotated", "cmyk", "16-bit", "palette", "alpha", "webp", "gif"],
)
def test_awkward_valid_images_work(server, content, size):
    r = server.predict(files={"content": content, "style": GOOD}, data={"steps": "1", "max_size": "32"})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == size


def test_body_over_max_request_size_is_413_from_the_frontend(strict_server):
    """strict_server sets max_request_size to 2 MB (test-only)."""
    pids = strict_server.worker_pids()
    r = strict_server.predict(files={"content": b"\0" * 3_000_000, "style": GOOD})
    assert r.status_code == 413
    assert r.content == b""  # TorchServe's own answer, as the README says: no JSON error body
    assert strict_server.worker_pids() == pids


def test_url_inputs_are_off_by_default(server):
    pids = server.worker_pids()
    r = server.predict(json={"content_url": "https://example.com/a.png",
                             "style": base64.b64encode(GOOD).decode()})
    assert r.status_code == 422 and r.json()["message"].startswith("content_url")
    assert server.worker_pids() == pids


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "0x7f000001", "[::ffff:127.0.0.1]", "localhost"])
def test_url_inputs_never_reach_loopback(strict_server, host):
    """strict_server allows URLs; a local image server stands where an attacker would point."""
    pids = strict_server.worker_pids()
    try:  # port 80, so the allowed-ports rule passes and the address check is what refuses
        site = ImageServer(port=80)
    except OSError:
        pytest.skip("port 80 is not free or not bindable here")
    with site:
        r = strict_server.predict(json={"content_url": site.url("/img.png", host),
                                        "style": base64.b64encode(GOOD).decode(), "steps": 1})
        assert site.hits == 0
    assert r.status_code == 403, r.text
    assert r.json()["message"] == "content_url: the address is not public (loopback, private, link-local...)"
    assert strict_server.worker_pids() == pids


def test_decompression_bombs_leave_worker_memory_flat(server):
    """A real 100-megapixel PNG (a ~100 KB file of zeros) and a forged header, ten times each:
    refused from the header, so the worker's memory does not move."""
    import psutil

    real_bomb = _encode(Image.new("L", (10_000, 10_000)), "PNG", optimize=True)
    assert len(real_bomb) < 1_000_000
    pid = server.worker_pids()[0]
    server.predict(files={"content": real_bomb, "style": GOOD})  # first use warms the code path
    before = psutil.Process(pid).memory_info().rss
    for bomb in [real_bomb, _png_claiming(100_000, 100_000)] * 10:
        r = server.predict(files={"content": bomb, "style": GOOD}, data={"steps": "1"})
        assert r.status_code == 413 and r.json()["message"].startswith("content")
    after = psutil.Process(pid).memory_info().rss
    assert server.worker_pids() == [pid]
    assert after - before < 32 * 2**20  # decoding one bomb would take 100 MB
