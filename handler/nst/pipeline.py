"""One request end to end, without any server: bytes in, encoded image out."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from . import imageio
from .config import Limits
from .errors import RequestError
from .params import Request
from .optimize import Callback, Result, stylize
from .vgg import VGGFeatures


@dataclass(frozen=True)
class Output:
    data: bytes  # the encoded image
    content_type: str
    result: Result


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
    content_img = imageio.fit(imageio.decode(request.content, "content", limits, draft_size=p.max_size), p.max_size)
    if min(content_img.size) < limits.min_input_side:  # an elongated image scaled down to max_size
        w, h = content_img.size
        raise RequestError(
            422, "content", f"content: scaled to max_size {p.max_size} it is {w}x{h} px, "
            f"each side must be at least {limits.min_input_side} px"
        )
    names = ["style"] + [f"style_{i}" for i in range(2, len(request.styles) + 1)]
    style_imgs = [
        size_style(imageio.decode(data, name, limits), content_img, p.style_scale, p.recipe_mode, limits)
        for data, name in zip(request.styles, names)
    ]
    content = imageio.to_tensor(content_img, device)
    styles = [imageio.to_tensor(s, device) for s in style_imgs]
    result = stylize(
        vgg, content, styles, p, callback=callback, deadline=deadline, progress_every=limits.progress_every
    )
    return Output(imageio.encode(result.image, p.format, p.quality), imageio.CONTENT_TYPES[p.format], result)
