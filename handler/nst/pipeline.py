"""One request end to end, without any server: bytes in, encoded image out."""
from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image

from . import imageio, memory
from .config import Limits
from .errors import RequestError
from .params import Request
from .optimize import BudgetExceeded, Callback, Result, stylize
from .vgg import VGGFeatures


@dataclass(frozen=True)
class Output:
    data: bytes  # the encoded image
    content_type: str
    result: Result
    decode_ms: float  # decoding and resizing the inputs, before the optimization
    encode_ms: float


def size_style(style: Image.Image, content: Image.Image, style_scale: float, recipe_mode: bool, limits: Limits) -> Image.Image:
    """The recipe resizes the style to the content's exact shape; otherwise
    keep the style's aspect and make its longest side `style_scale` times the content's."""
    if recipe_mode and style_scale == 1.0:
        return imageio.resize_to(style, content.size)
    longest = round(style_scale * max(content.size))
    longest = max(limits.min_input_side, min(longest, limits.max_size))
    w, h = style.size
    scale = longest / max(w, h)
    size = (max(limits.min_input_side, round(w * scale)), max(limits.min_input_side, round(h * scale)))
    return imageio.resize_to(style, size)


def admit(content: Image.Image, styles: list[Image.Image], params, limits: Limits, device) -> None:
    """Refuse (507) a request whose estimated peak memory is over the budget, before allocating it."""
    w, h = content.size
    need = memory.estimate_bytes(h, w, sum(s.size[0] * s.size[1] for s in styles), params, device.type)
    budget = limits.memory_budget_mb * 2**20 if limits.memory_budget_mb else memory.available_bytes(device)
    if need > budget:
        raise RequestError(
            507, "max_size", f"max_size: this request needs about {need // 2**20} MiB, the worker can spend "
            f"{budget // 2**20} MiB now; ask for a smaller max_size or retry later",
        )


def run(
    request: Request,
    vgg: VGGFeatures,
    limits: Limits,
    *,
    callback: Callback | None = None,
    deadline: float | None = None,
) -> Output:
    p = request.params
    device = vgg.mean.device
    start = time.monotonic()
    field = request.content_field
    content_img = imageio.fit(imageio.decode(request.content, field, limits, draft_size=p.max_size), p.max_size)
    if min(content_img.size) < limits.min_input_side:  # an elongated image scaled down to max_size
        w, h = content_img.size
        raise RequestError(
            422, field, f"{field}: scaled to max_size {p.max_size} it is {w}x{h} px, "
            f"each side must be at least {limits.min_input_side} px"
        )
    style_imgs = [
        size_style(imageio.decode(data, name, limits), content_img, p.style_scale, p.recipe_mode, limits)
        for data, name in zip(request.styles, request.style_fields, strict=True)
    ]
    decode_ms = (time.monotonic() - start) * 1e3
    if deadline is not None and time.monotonic() > deadline:
        # A decoder cannot be interrupted; the scan limit bounds it, the budget still counts it.
        raise BudgetExceeded(f"ran out before the first step (decoding took {decode_ms / 1e3:.1f} s)")
    admit(content_img, style_imgs, p, limits, device)
    content = imageio.to_tensor(content_img, device)
    styles = [imageio.to_tensor(s, device) for s in style_imgs]
    result = stylize(
        vgg, content, styles, p, callback=callback, deadline=deadline, progress_every=limits.progress_every
    )
    start = time.monotonic()
    data = imageio.encode(result.image, p.format, p.quality)
    encode_ms = (time.monotonic() - start) * 1e3
    return Output(data, imageio.CONTENT_TYPES[p.format], result, decode_ms, encode_ms)
