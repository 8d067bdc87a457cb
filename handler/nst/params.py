"""Request fields -> validated images and `Params`. Shared by the handler and the CLI.

Values arrive as bytes (multipart text fields), str (JSON strings, CLI
options) or JSON values; every parser accepts all three. Each error names
the field and carries the contract's status code.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
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
    Limits,
    Params,
)
from .errors import RequestError, quote_field
from .vgg import canonical_layer


def _text(value: Any, name: str) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise RequestError(422, name, f"{name}: not valid UTF-8 text") from None
    if isinstance(value, str):
        return value.strip()
    raise RequestError(422, name, f"{name}: expected a {type(value).__name__!s} to be text")


def _is_textual(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, str))


def parse_int(value: Any, name: str, lo: int, hi: int) -> int:
    if _is_textual(value):
        text = _text(value, name)
        if not re.fullmatch(r"[+-]?\d{1,19}", text):
            raise RequestError(422, name, f"{name}: expected an integer, got {text[:40]!r}")
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, name, f"{name}: expected an integer")
    if not lo <= value <= hi:
        raise RequestError(422, name, f"{name}: {value} is out of range [{lo}, {hi}]")
    return value


def parse_float(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if _is_textual(value):
        text = _text(value, name)
        try:
            value = float(text)
        except ValueError:
            raise RequestError(422, name, f"{name}: expected a number, got {text[:40]!r}") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(422, name, f"{name}: expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(422, name, f"{name}: must be a finite number")
    if value > hi or value < lo or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise RequestError(422, name, f"{name}: {value} is out of range {bracket}{lo}, {hi}]")
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
    raise RequestError(422, name, f"{name}: expected true/false/1/0")


def parse_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    text = _text(value, name).lower() if _is_textual(value) else None
    if text not in choices:
        raise RequestError(422, name, f"{name}: must be one of {', '.join(choices)}")
    return text


def _json_value(value: Any, name: str) -> Any:
    if _is_textual(value):
        try:
            return json.loads(_text(value, name))
        except ValueError:
            raise RequestError(422, name, f"{name}: not valid JSON") from None
    return value


def parse_layer_weights(value: Any, name: str) -> dict[str, float]:
    raw = _json_value(value, name)
    if not isinstance(raw, dict) or not raw:
        raise RequestError(422, name, f"{name}: expected a JSON object of layer -> weight")
    out: dict[str, float] = {}
    for key, weight in raw.items():
        try:
            layer = canonical_layer(str(key))
        except ValueError as e:
            raise RequestError(422, name, f"{name}: {e}") from None
        out[layer] = parse_float(weight, f"{name}.{key}", 0.0, 1e6)
    if not any(out.values()):
        raise RequestError(422, name, f"{name}: at least one weight must be > 0")
    return out


def parse_blend(value: Any, name: str) -> tuple[float, ...]:
    raw = _json_value(value, name)
    if not isinstance(raw, list) or not raw:
        raise RequestError(422, name, f"{name}: expected a JSON list of numbers")
    weights = tuple(parse_float(w, f"{name}[{i}]", 0.0, 1e6) for i, w in enumerate(raw))
    if not any(weights):
        raise RequestError(422, name, f"{name}: at least one weight must be > 0")
    return weights


# name -> parser(value, limits). The single list of request parameters: the
# handler rejects any other name and the CLI makes an option of each.
PARSERS: dict[str, Callable[[Any, Limits], Any]] = {
    "preset": lambda v, lim: parse_choice(v, "preset", PRESETS),
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


def build_params(given: Mapping[str, Any], limits: Limits) -> Params:
    """Parse the given parameters and lay them over the preset's defaults."""
    parsed = {name: PARSERS[name](value, limits) for name, value in given.items()}
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


_STYLE_N = re.compile(r"^style_([2-9]|[1-9]\d)$")
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def decode_base64(value: str, name: str, limits: Limits) -> bytes:
    """Strict standard-alphabet base64; padding optional, a data: prefix tolerated.
    The size is checked before decoding."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = re.sub(r"\s+", "", text)
    if len(text) * 3 // 4 > limits.max_input_bytes:
        raise RequestError(
            413, name, f"{name}: more than the limit of {limits.max_input_bytes} bytes once decoded"
        )
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, name, f"{name}: not valid base64") from None


def _image_bytes(value: Any, name: str, limits: Limits) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return decode_base64(value, name, limits)
    raise RequestError(400, name, f"{name}: expected an image file or a base64 string")


Fetcher = Callable[[str, str], bytes]  # (url, field) -> the image bytes


def parse_request(fields: Mapping[str, Any], limits: Limits, fetch: Fetcher | None = None) -> Request:
    """One request's fields (multipart parts or JSON keys) -> `Request`.

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
            raise RequestError(422, url_field, f"{url_field}: URL inputs are disabled on this server")
        if image_field in fields:
            raise RequestError(400, url_field, f"{url_field}: give {image_field} or {url_field}, not both")
        urls[image_field] = fields.pop(url_field)
        fields[image_field] = b""  # placeholder until the parameters are known to be valid
    if "content" not in fields:
        raise RequestError(400, "content", "content: required image missing")
    if "style" not in fields:
        raise RequestError(400, "style", "style: required image missing")
    content = _image_bytes(fields.pop("content"), "content", limits)

    style_value = fields.pop("style")
    style_values = list(style_value) if isinstance(style_value, list) else [style_value]
    if not style_values:
        raise RequestError(400, "style", "style: required image missing (empty list)")
    names = ["style"] if len(style_values) == 1 else [f"style[{i}]" for i in range(len(style_values))]
    extra = sorted((k for k in fields if _STYLE_N.match(k)), key=lambda k: int(k.split("_")[1]))
    expected = [f"style_{i}" for i in range(2, 2 + len(extra))]
    if extra != expected:
        missing = next(e for e, k in zip(expected + [None], extra + [None]) if e != k)
        raise RequestError(400, missing, f"{missing}: missing (style images are numbered style_2, style_3, ...)")
    for k in extra:
        style_values.append(fields.pop(k))
        names.append(k)
    if len(style_values) > limits.max_styles:
        raise RequestError(422, "style", f"style: {len(style_values)} style images, at most {limits.max_styles}")
    styles = [_image_bytes(v, n, limits) for v, n in zip(style_values, names)]

    unknown = sorted(set(fields) - set(PARSERS))
    if unknown:
        raise RequestError(422, unknown[0], f"{quote_field(unknown[0])}: unknown parameter")
    params = build_params(fields, limits)
    if params.style_blend is not None and len(params.style_blend) != len(styles):
        raise RequestError(
            422, "style_blend", f"style_blend: {len(params.style_blend)} weights for {len(styles)} style images"
        )
    content_field = "content"
    if "content" in urls:
        content, content_field = fetch(urls["content"], "content_url"), "content_url"
    if "style" in urls:
        styles[0], names[0] = fetch(urls["style"], "style_url"), "style_url"
    return Request(content, styles, params, content_field, tuple(names))
