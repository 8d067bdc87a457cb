"""Request fields -> a `Request`: validated image bytes, the core's `Params`
and how the answer travels. Shared by the handler and the CLI.

Values arrive as bytes (multipart text fields), str (JSON strings, CLI
options) or JSON values; every parser accepts all three. Each error names
the field and is one of the kinds of nst.errors.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .config import (
    FAST_ADAM_LR,
    FORMATS,
    INITS,
    OPTIMIZERS,
    POOLINGS,
    PRESETS,
    SEED_PRESET,
    SPACES,
    Limits,
    Params,
)
from .errors import BadRequest, InvalidParameter, RequestError, TooLarge, quote_field
from .vgg import canonical_layer


def _text(value: Any, name: str, invalid: type[RequestError] = InvalidParameter) -> str:
    """A field's text, stripped. Bytes that are not UTF-8 are `invalid`: a
    parameter's value (422) by default."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise invalid(name, f"{name}: not valid UTF-8 text") from None
    if isinstance(value, str):
        return value.strip()
    raise InvalidParameter(name, f"{name}: expected a {type(value).__name__!s} to be text")


def _is_textual(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, str))


class TooLongInteger:
    """A JSON integer literal with more digits than int() accepts
    (`sys.get_int_max_str_digits()`, 4300 by default). Our JSON parsing keeps
    it as this marker, so the body still parses and its field's parser refuses
    it by name, instead of the whole body failing with a ValueError."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


def _json_int(literal: str) -> int | TooLongInteger:
    try:
        return int(literal)
    except ValueError:
        return TooLongInteger(len(literal.lstrip("-")))


def _describe_int(value: int | TooLongInteger) -> str:
    """An integer for a message: itself when short, else its length. (str() of
    an int over 4300 digits raises, and 400 digits would crowd out the rest.)"""
    if isinstance(value, TooLongInteger):
        return f"a {value.digits}-digit integer"
    if -10**19 < value < 10**19:
        return str(value)
    try:
        return f"a {len(str(abs(value)))}-digit integer"
    except ValueError:
        return f"an integer of over {sys.get_int_max_str_digits()} digits"


def parse_int(value: Any, name: str, lo: int, hi: int) -> int:
    if _is_textual(value):
        text = _text(value, name)
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", text):  # ASCII digits: int() also reads "١" and "1_0"
            raise InvalidParameter(name, f"{name}: expected an integer, got {text[:40]!r}")
        value = int(text)
    elif isinstance(value, TooLongInteger):
        raise InvalidParameter(name, f"{name}: {_describe_int(value)} is out of range [{lo}, {hi}]")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(name, f"{name}: expected an integer")
    if not lo <= value <= hi:
        raise InvalidParameter(name, f"{name}: {_describe_int(value)} is out of range [{lo}, {hi}]")
    return value


# A number as JSON or a form field writes one, in ASCII; inf and nan too, so
# that they are refused as not finite rather than as unreadable.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)", re.I)


def parse_float(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    bracket = "(" if lo_open else "["
    if _is_textual(value):
        text = _text(value, name)
        if not _DECIMAL.fullmatch(text):  # float() also reads "1_0", "١" and "１"
            raise InvalidParameter(name, f"{name}: expected a number, got {text[:40]!r}")
        value = float(text)  # a decimal string too large for a float is inf, never an error
    elif isinstance(value, TooLongInteger):
        raise InvalidParameter(name, f"{name}: {_describe_int(value)} is out of range {bracket}{lo}, {hi}]")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, f"{name}: expected a number")
    try:
        value = float(value)
    except OverflowError:  # a JSON integer beyond float's range (about 1.8e308)
        raise InvalidParameter(name, f"{name}: {_describe_int(value)} is out of range {bracket}{lo}, {hi}]") from None
    if not math.isfinite(value):
        raise InvalidParameter(name, f"{name}: must be a finite number")
    if value > hi or value < lo or (lo_open and value == lo):
        raise InvalidParameter(name, f"{name}: {value} is out of range {bracket}{lo}, {hi}]")
    return value


def parse_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if _is_textual(value):
        text = _text(value, name).lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
    raise InvalidParameter(name, f"{name}: expected true/false/1/0")


def parse_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    text = _text(value, name).lower() if _is_textual(value) else None
    if text not in choices:
        raise InvalidParameter(name, f"{name}: must be one of {', '.join(choices)}")
    return text


def _loads(text: str | bytes) -> Any:
    """json.loads, keeping integer literals too long for int() as `TooLongInteger`.
    Nesting deeper than the interpreter's recursion limit raises RecursionError
    (not a ValueError): callers turn it into an error naming the field."""
    return json.loads(text, parse_int=_json_int)


def _json_value(value: Any, name: str) -> Any:
    if _is_textual(value):
        try:
            return _loads(_text(value, name))
        except RecursionError:
            raise InvalidParameter(name, f"{name}: JSON nested too deeply") from None
        except ValueError:
            raise InvalidParameter(name, f"{name}: not valid JSON") from None
    return value


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _too_deep_field(text: str | bytes) -> str | None:
    """The top-level key of the JSON object `text` whose value is nested too
    deeply to parse, or None (not an object, or no single key to blame).

    Only called once parsing the whole body raised RecursionError: each value
    is parsed on its own, so the one that raises again is the one to name."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return None
    decoder = json.JSONDecoder(parse_int=_json_int)
    i = _JSON_SPACE.match(text).end()
    if not text.startswith("{", i):
        return None
    i += 1
    try:
        while True:
            i = _JSON_SPACE.match(text, i).end()
            if not text.startswith('"', i):
                return None
            key, i = json.decoder.scanstring(text, i + 1)
            i = _JSON_SPACE.match(text, i).end()
            if not text.startswith(":", i):
                return None
            i = _JSON_SPACE.match(text, i + 1).end()
            try:
                _, i = decoder.raw_decode(text, i)
            except RecursionError:
                return key
            i = _JSON_SPACE.match(text, i).end()
            if not text.startswith(",", i):
                return None
            i += 1
    except ValueError:
        return None


def parse_json_body(body: Any) -> dict:
    """A request body -> its fields. TorchServe hands over a JSON body already
    parsed, or, when its own json.loads failed (nesting deeper than the
    recursion limit, an integer longer than int() accepts, not JSON at all) or
    the Content-Type was not application/json, the raw bytes (str for text/*)."""
    if isinstance(body, (bytes, bytearray, str)):
        raw = body if isinstance(body, str) else bytes(body)
        try:
            body = _loads(raw)
        except RecursionError:
            field = _too_deep_field(raw)
            if field is None:
                raise BadRequest("body", "body: JSON nested too deeply") from None
            raise InvalidParameter(field, f"{quote_field(field)}: JSON nested too deeply") from None
        except ValueError:
            raise BadRequest(
                "body", "body: expected multipart/form-data or a JSON object (Content-Type: application/json)"
            ) from None
    if not isinstance(body, dict):
        raise BadRequest("body", "body: expected a JSON object")
    return body


def parse_layer_weights(value: Any, name: str) -> dict[str, float]:
    raw = _json_value(value, name)
    if not isinstance(raw, dict) or not raw:
        raise InvalidParameter(name, f"{name}: expected a JSON object of layer -> weight")
    out: dict[str, float] = {}
    named: dict[str, str] = {}  # layer -> the key that named it (a valid layer name: canonical_layer read it)
    for key, weight in raw.items():
        try:
            layer = canonical_layer(str(key))
        except ValueError as e:
            raise InvalidParameter(name, f"{name}: {e}") from None
        if layer in named:  # relu1_1 and conv1_1: one would silently win
            raise InvalidParameter(name, f"{name}: {named[layer]} and {key} name the same layer")
        named[layer] = str(key)
        out[layer] = parse_float(weight, f"{name}.{key}", 0.0, 1e6)
    if not any(out.values()):
        raise InvalidParameter(name, f"{name}: at least one weight must be > 0")
    return out


def parse_blend(value: Any, name: str) -> tuple[float, ...]:
    raw = _json_value(value, name)
    if not isinstance(raw, list) or not raw:
        raise InvalidParameter(name, f"{name}: expected a JSON list of numbers")
    weights = tuple(parse_float(w, f"{name}[{i}]", 0.0, 1e6) for i, w in enumerate(raw))
    if not any(weights):
        raise InvalidParameter(name, f"{name}: at least one weight must be > 0")
    return weights


# name -> parser(value, limits). The single list of request parameters: the
# handler rejects any other name and the CLI makes an option of each.
PARSERS: dict[str, Callable[[Any, Limits], Any]] = {
    "preset": lambda v, lim: parse_choice(v, "preset", PRESETS),
    "space": lambda v, lim: parse_choice(v, "space", SPACES),
    "steps": lambda v, lim: parse_int(v, "steps", 1, lim.max_steps),
    "max_size": lambda v, lim: parse_int(v, "max_size", lim.min_input_side, lim.max_size),
    "optimizer": lambda v, lim: parse_choice(v, "optimizer", OPTIMIZERS),
    "lr": lambda v, lim: parse_float(v, "lr", 0.0, 1e3, lo_open=True),
    "content_weight": lambda v, lim: parse_float(v, "content_weight", 0.0, 1e12),
    "style_weight": lambda v, lim: parse_float(v, "style_weight", 0.0, 1e12),
    "style_layer_weights": lambda v, lim: parse_layer_weights(v, "style_layer_weights"),
    "init": lambda v, lim: parse_choice(v, "init", INITS),
    "seed": lambda v, lim: parse_int(v, "seed", 0, 2**63 - 1),
    "stream": lambda v, lim: parse_bool(v, "stream"),
    "preserve_color": lambda v, lim: parse_bool(v, "preserve_color"),
    "style_blend": lambda v, lim: parse_blend(v, "style_blend"),
    "style_scale": lambda v, lim: parse_float(v, "style_scale", 0.0, 4.0, lo_open=True),
    "tv_weight": lambda v, lim: parse_float(v, "tv_weight", 0.0, 1e12),
    "pooling": lambda v, lim: parse_choice(v, "pooling", POOLINGS),
    "format": lambda v, lim: parse_choice(v, "format", FORMATS),
    "quality": lambda v, lim: parse_int(v, "quality", 1, 100),
    "timeout_s": lambda v, lim: parse_float(v, "timeout_s", 0.0, 1e6, lo_open=True),
    "deadline": lambda v, lim: parse_float(v, "deadline", 0.0, 1e11, lo_open=True),
}


# Parameters of how the answer travels, not of the optimization: they go on
# the Request, beside the core's Params.
TRANSPORT = ("stream",)


def build_params(given: Mapping[str, Any], limits: Limits) -> Params:
    """Parse the given parameters and lay them over the preset's defaults."""
    parsed = {name: PARSERS[name](value, limits) for name, value in given.items() if name not in TRANSPORT}
    values: dict[str, Any] = {"max_size": min(Params.max_size, limits.max_size)}
    preset = parsed.get("preset", Params.preset)
    if preset == "seed":
        values.update(SEED_PRESET)
    elif parsed.get("optimizer") == "adam" and "lr" not in parsed:
        values["lr"] = FAST_ADAM_LR
    values.update(parsed)
    values["steps"] = min(values.get("steps", Params.steps), limits.max_steps)
    values["max_size"] = min(values["max_size"], limits.max_size)
    return dataclasses.replace(Params(), **values)


@dataclass(frozen=True)
class Request:
    content: bytes
    styles: list[bytes]
    params: Params
    # The field each image came from, for error messages about its bytes:
    # "content" or "content_url"; "style", "style[1]", "style_2" or "style_url".
    content_field: str
    style_fields: tuple[str, ...]  # one per style
    stream: bool = False  # NDJSON progress records, then the image (a transport choice: the core never reads it)


_STYLE_N = re.compile(r"^style_([2-9]|[1-9]\d)$")
# RFC 2397: data:[<mediatype>][;<attribute>=<value>]*;base64, (each part
# ends at the next ";" or ",", so matching is linear in the prefix)
_DATA_URL = re.compile(r"^data:[^,;]*(?:;[^,;=]+=[^,;]*)*;base64,", re.IGNORECASE)


def decode_base64(value: str, name: str, limits: Limits) -> bytes:
    """Strict standard-alphabet base64; padding optional, a data: prefix tolerated.
    The size is checked before decoding."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = re.sub(r"\s+", "", text)
    if len(text) * 3 // 4 > limits.max_input_bytes:
        raise TooLarge(name, f"{name}: more than the limit of {limits.max_input_bytes} bytes once decoded")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(name, f"{name}: not valid base64") from None


def _image_bytes(value: Any, name: str, limits: Limits, multipart: bool = False) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return decode_base64(value, name, limits)
        except BadRequest:
            if not multipart:
                raise
            # TorchServe hands over a file part sent as text/* (an SVG, an
            # HTML page) as a str: it is the file, not base64, and the decoder
            # refuses it as a format (415) rather than as bad base64 (400).
            return value.encode("utf-8", "surrogatepass")
    raise BadRequest(name, f"{name}: expected an image file or a base64 string")


Fetcher = Callable[[str, str], bytes]  # (url, field) -> the image bytes


def parse_request(fields: Mapping[str, Any], limits: Limits, fetch: Fetcher | None = None, *,
                  multipart: bool = False) -> Request:
    """One request's fields (multipart parts or JSON keys; `multipart` says
    which) -> `Request`.

    Images: `content`, `style`, `style_2` ... (or `style` as a JSON list), or
    `content_url` / `style_url` when the server allows URLs and a `fetch` is
    given. Everything else must be a known parameter. Parameters are checked
    before anything is fetched."""
    fields = dict(fields)
    urls = {}
    for url_field, image_field in (("content_url", "content"), ("style_url", "style")):
        if url_field not in fields:
            continue
        if not limits.allow_urls or fetch is None:
            raise InvalidParameter(url_field, f"{url_field}: URL inputs are disabled on this server")
        if image_field in fields:
            raise BadRequest(url_field, f"{url_field}: give {image_field} or {url_field}, not both")
        url = fields.pop(url_field)
        # A form field or a gRPC input is bytes: the URL is its text. Not
        # UTF-8: malformed (400), as a URL that is no string is in fetch.
        urls[image_field] = _text(url, url_field, BadRequest) if isinstance(url, (bytes, bytearray)) else url
        fields[image_field] = b""  # placeholder until the parameters are known to be valid
    if "content" not in fields:
        raise BadRequest("content", "content: required image missing")
    if "style" not in fields:
        raise BadRequest("style", "style: required image missing")
    content = _image_bytes(fields.pop("content"), "content", limits, multipart)

    style_value = fields.pop("style")
    style_values = list(style_value) if isinstance(style_value, list) else [style_value]
    if not style_values:
        raise BadRequest("style", "style: required image missing (empty list)")
    names = ["style"] if len(style_values) == 1 else [f"style[{i}]" for i in range(len(style_values))]
    extra = sorted((k for k in fields if _STYLE_N.match(k)), key=lambda k: int(k.split("_")[1]))
    expected = [f"style_{i}" for i in range(2, 2 + len(extra))]
    if extra != expected:
        missing = next(e for e, k in zip(expected + [None], extra + [None]) if e != k)
        raise BadRequest(missing, f"{missing}: missing (style images are numbered style_2, style_3, ...)")
    for k in extra:
        style_values.append(fields.pop(k))
        names.append(k)
    if len(style_values) > limits.max_styles:
        raise InvalidParameter("style", f"style: {len(style_values)} style images, at most {limits.max_styles}")
    styles = [_image_bytes(v, n, limits, multipart) for v, n in zip(style_values, names)]

    unknown = sorted(set(fields) - set(PARSERS))
    if unknown:
        raise InvalidParameter(unknown[0], f"{quote_field(unknown[0])}: unknown parameter")
    params = build_params(fields, limits)
    stream = PARSERS["stream"](fields["stream"], limits) if "stream" in fields else False
    if params.style_blend is not None and len(params.style_blend) != len(styles):
        raise InvalidParameter(
            "style_blend", f"style_blend: {len(params.style_blend)} weights for {len(styles)} style images")
    content_field = "content"
    if "content" in urls:
        content, content_field = fetch(urls["content"], "content_url"), "content_url"
    if "style" in urls:
        styles[0], names[0] = fetch(urls["style"], "style_url"), "style_url"
    return Request(content, styles, params, content_field, tuple(names), stream)
