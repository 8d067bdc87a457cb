"""Hostile request shapes that once got a 500, through the real server: JSON
nested deeper than Python's recursion limit, integers too large for a float
or for int(), and nested multipart/mixed parts (which TorchServe's frontend
refuses itself, before the handler runs). After each, the worker has the same
PID and serves a normal request."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from example_images import thumbnail

pytestmark = pytest.mark.server

CONTENT = thumbnail("tubingen.jpg", 48)  # 48x36 PNG
STYLE = thumbnail("starry_night.jpg", 48)
IMAGES = f'"content": "{base64.b64encode(CONTENT).decode()}", "style": "{base64.b64encode(STYLE).decode()}"'
BIG = "1" + "0" * 400  # 10**400 as a JSON integer literal: float() of it overflows
HUGE = "9" * 5000  # over int()'s 4300-digit limit: TorchServe's json.loads fails and forwards the raw body
DEEP = "[" * 5000  # RecursionError in json.loads


def _json(members: str) -> dict:
    """A raw JSON body (no Python object nests this deep or holds these literals)."""
    return {"data": ("{" + members + "}").encode(), "headers": {"Content-Type": "application/json"}}


def _served_normally(server) -> None:
    r = server.predict(files={"content": CONTENT, "style": STYLE}, data={"steps": "1", "max_size": "32"})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).format == "PNG"


CASES = {
    # deep nesting
    "layer-weights-deep-json": (_json(f'{IMAGES}, "style_layer_weights": {DEEP}'), 422, "style_layer_weights"),
    "layer-weights-deep-multipart": (
        {"files": {"content": CONTENT, "style": STYLE}, "data": {"style_layer_weights": DEEP}},
        422, "style_layer_weights",
    ),
    "body-200k-deep": ({"data": b"[" * 200_000, "headers": {"Content-Type": "application/json"}}, 400, "body"),
    # integers too large for a float (TorchServe parses them; float() overflows)
    "lr-10e400": (_json(f'{IMAGES}, "lr": {BIG}'), 422, "lr"),
    "style-blend-10e400": (_json(f'{IMAGES}, "style_blend": [{BIG}]'), 422, "style_blend"),
    "layer-weight-10e400": (_json(f'{IMAGES}, "style_layer_weights": {{"conv1_1": {BIG}}}'), 422,
                            "style_layer_weights"),
    # an integer too long for int() (TorchServe's json.loads fails, the handler parses the raw body)
    "steps-5000-digits": (_json(f'{IMAGES}, "steps": {HUGE}'), 422, "steps"),
    "blend-5000-digits-multipart": (
        {"files": {"content": CONTENT, "style": STYLE}, "data": {"style_blend": f"[{HUGE}]"}},
        422, "style_blend",
    ),
    # a multipart field named like TorchServe's JSON-body key: once it replaced
    # the uploads with the images its JSON carried
    "multipart-field-named-body": (
        {"files": {"content": CONTENT, "style": STYLE}, "data": {"body": "{" + IMAGES + "}"}}, 422, "body",
    ),
    # ... and alone: once run as the JSON request it carried
    "lone-multipart-field-named-body": ({"files": {"body": (None, "{" + IMAGES + "}")}}, 400, "content"),
    "lone-urlencoded-field-named-body": ({"data": {"body": "{" + IMAGES + "}"}}, 400, "content"),
    # a file part sent as text/*, which TorchServe hands over as a str: once
    # read as base64 (400 "not valid base64"), now refused as a format
    "svg-file-part-as-text": (
        {"files": {"content": ("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "text/xml"), "style": STYLE}},
        415, "content",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_json_is_a_client_error_naming_the_field(server, case):
    request, code, field = CASES[case]
    pids = server.worker_pids()
    r = server.predict(**request)
    assert r.status_code == code, r.text
    body = r.json()
    assert body["code"] == code and body["message"].startswith(field), body
    assert len(body["message"]) < 200  # no 400-digit number or 5000 brackets echoed back
    assert server.worker_pids() == pids
    _served_normally(server)


# A multipart/form-data field whose part is itself multipart/mixed (RFC 2388's
# old way of sending several files under one name). Netty's decoder accepts
# the well-formed shape (each inner part a file with a filename) and fails on
# the rest before the request reaches a worker.
_OUTER = "multipart/form-data; boundary=outer"
_CONTENT_PART = (b'--outer\r\nContent-Disposition: form-data; name="content"; filename="c.png"\r\n'
                 b"Content-Type: image/png\r\n\r\n" + CONTENT + b"\r\n")
_MIXED = (b'--outer\r\nContent-Disposition: form-data; name="style"\r\n'
          b"Content-Type: multipart/mixed; boundary=inner\r\n\r\n")
_END = b"--outer--\r\n"

MIXED_CASES = {
    # inner part without a filename
    "inner-part-without-filename": (
        _CONTENT_PART + _MIXED + b'--inner\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--inner--\r\n' + _END,
        "ErrorDataDecoderException", "Filename not found",
    ),
    # multipart/mixed inside multipart/mixed
    "mixed-in-mixed": (
        _CONTENT_PART + _MIXED + b'--inner\r\nContent-Disposition: file; filename="s.png"\r\n'
        b"Content-Type: multipart/mixed; boundary=deeper\r\n\r\n--deeper\r\n"
        b'Content-Disposition: file; filename="t.png"\r\n\r\n' + STYLE + b"\r\n--deeper--\r\n--inner--\r\n" + _END,
        "ErrorDataDecoderException", "Mixed Multipart found in a previous Mixed Multipart",
    ),
    # the multipart/mixed part has no name
    "mixed-without-name": (
        _CONTENT_PART + b'--outer\r\nContent-Disposition: form-data\r\nContent-Type: multipart/mixed; boundary=inner\r\n\r\n'
        b'--inner\r\nContent-Disposition: file; filename="s.png"\r\n\r\n' + STYLE + b"\r\n--inner--\r\n" + _END,
        "ErrorDataDecoderException", "nameAttribute",
    ),
    # multipart/mixed without a boundary
    "mixed-without-boundary": (
        _CONTENT_PART + b'--outer\r\nContent-Disposition: form-data; name="style"\r\nContent-Type: multipart/mixed\r\n\r\n'
        + STYLE + b"\r\n" + _END,
        "ArrayIndexOutOfBoundsException", "out of bounds",
    ),
}


@pytest.mark.parametrize("case", list(MIXED_CASES))
def test_nested_multipart_mixed_gets_torchserves_own_500_and_the_worker_is_untouched(server, case):
    """Cannot be a 400 naming the field: Netty's HttpPostRequestDecoder throws
    in TorchServe's frontend, which answers 500 with the Java exception's name
    before any worker sees the request (documented in docs/FAULTS.md)."""
    raw, exc_type, detail = MIXED_CASES[case]
    pids = server.worker_pids()
    r = server.predict(data=raw, headers={"Content-Type": _OUTER})
    assert r.status_code == 500, r.text
    body = r.json()
    assert body["type"] == exc_type and detail in body["message"], body
    assert server.worker_pids() == pids
    _served_normally(server)


def test_well_formed_nested_multipart_mixed_is_read_as_the_file_field(server):
    """The shape Netty does accept: the inner file part becomes the field."""
    raw = (_CONTENT_PART + _MIXED + b'--inner\r\nContent-Disposition: file; filename="s.png"\r\n'
           b"Content-Type: image/png\r\n\r\n" + STYLE + b"\r\n--inner--\r\n"
           b'--outer\r\nContent-Disposition: form-data; name="steps"\r\n\r\n1\r\n'
           b'--outer\r\nContent-Disposition: form-data; name="max_size"\r\n\r\n32\r\n' + _END)
    pids = server.worker_pids()
    r = server.predict(data=raw, headers={"Content-Type": _OUTER})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (32, 24)
    assert server.worker_pids() == pids
