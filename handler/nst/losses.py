"""The Gatys objective exactly as the reference recipe defines it.

total = alpha * content + beta * style (+ tv_weight * tv), with
  content = mean((F - P)^2) at conv4_2,
  style   = sum_l w_l * mean((G_l - A_l)^2) / (d_l * h_l * w_l),
and G the *unnormalized* Gram matrix F F^T of one image's features. A style
target A_l is the style's Gram scaled to the content's pixel count at layer l
(exactly the recipe's when the style has the content's shape, as the recipe
makes it).
Grams and losses are computed in float32 whatever the features' dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .config import (GRAM_LOWP_DEVICES, GRAM_ONE_PRODUCT_DEVICES, GRAM_ONE_PRODUCT_MIN_PIXELS, RECIPE_CONTENT_LAYER,
                     ROW_BY_ROW_DEVICES)
from .vgg import LAYER_NAMES, VGGFeatures, canonical_layer, feature_size

LOWP = (torch.float16, torch.bfloat16)


def bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 16-bit a and b of one dtype, (B, n, k) @ (B, k, p) -> (B, n, p),
    accumulated and returned in float32: on a GPU by one matmul that reads
    the 16-bit operands as they are (out_dtype, CUDA only), elsewhere by the
    same sums of the same numbers in float32."""
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


class _LowpGram(torch.autograd.Function):
    """flat^T flat for 16-bit features flat (B, N, C), in float32 (GRAM_LOWP_DEVICES).

    The float32 path first writes a float32 copy of the features (twice their
    bytes), which its matmul then reads, and its backward writes a float32
    gradient for the cast back. Here the matmuls read the 16-bit features.
    The forward sees the same numbers: a 16-bit value is exact in float32,
    and TF32 (which rounds a float32 matmul's inputs to 10 mantissa bits)
    keeps every float16 bit. The backward's (dG + dG^T) is rounded to the
    features' dtype after scaling it by a power of two that brings its
    largest entry to [1, 2), so float16's range cannot clip it; a non-finite
    dG gives a non-finite gradient, which the loss scaling then skips."""

    @staticmethod
    def forward(ctx, flat: Tensor) -> Tensor:
        ctx.save_for_backward(flat)
        return bmm_f32(flat.transpose(1, 2), flat)  # (B, C, C)

    @staticmethod
    def backward(ctx, d_gram: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors
        sym = d_gram + d_gram.transpose(1, 2)  # d(F^T F) = F (dG + dG^T): (B, C, C)
        top = sym.abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        scale = torch.exp2(-torch.floor(torch.log2(top)))  # (B, 1, 1), exact powers of two
        return (bmm_f32(flat, (sym * scale).to(flat.dtype)) / scale).to(flat.dtype)  # (B, N, C)


class _Gram(torch.autograd.Function):
    """flat^T flat for float32 flat (B, N, C), with the backward as one
    matmul (GRAM_ONE_PRODUCT_DEVICES, GRAM_ONE_PRODUCT_MIN_PIXELS):
    d(F^T F) = F (dG + dG^T). Autograd's own bmm backward takes one product
    per operand, both (B, N, C), and adds them: twice the matmul work and two
    more feature-sized tensors written. dG + dG^T is exactly symmetric
    (a + b = b + a), so F (dG + dG^T) is also ((dG + dG^T) F^T)^T, taken in
    whichever orientation F lies in memory so that the gradient comes out in
    the features' own layout."""

    @staticmethod
    def forward(ctx, flat: Tensor) -> Tensor:
        ctx.save_for_backward(flat)
        return torch.bmm(flat.transpose(1, 2), flat)  # (B, C, C)

    @staticmethod
    def backward(ctx, d_gram: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors
        sym = d_gram + d_gram.transpose(1, 2)  # (B, C, C)
        if flat.transpose(1, 2).is_contiguous():  # NCHW features: (B, C, N) in memory
            return torch.bmm(sym, flat.transpose(1, 2)).transpose(1, 2)  # (B, C, N) -> (B, N, C) view
        return torch.bmm(flat, sym)  # (B, N, C)


def gram(features: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, C): each image's unnormalized Gram matrix, in float32."""
    b, c, h, w = features.shape
    nhwc = features.is_contiguous(memory_format=torch.channels_last) and c > 1
    # (B, H*W, C): a view either way (of NHWC, or transposed from NCHW)
    flat = features.permute(0, 2, 3, 1).reshape(b, h * w, c) if nhwc else \
        features.reshape(b, c, h * w).transpose(1, 2)
    device = features.device.type
    if device in GRAM_LOWP_DEVICES and features.dtype in LOWP and c > 1:
        return _LowpGram.apply(flat)
    if device in GRAM_ONE_PRODUCT_DEVICES and h * w >= GRAM_ONE_PRODUCT_MIN_PIXELS:
        return _Gram.apply(flat.float())  # a 16-bit flat's float32 copy; a float32 one as it is
    if nhwc:
        flat = flat.float()
        return torch.bmm(flat.transpose(1, 2), flat)
    rows = flat.transpose(1, 2).float()  # (B, C, H*W): the NCHW features' own view
    return torch.bmm(rows, rows.transpose(1, 2))


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    """(B, C, H, W) against (B, C, H, W) -> (B,): mean squared difference per image."""
    return ((features.float() - target) ** 2).mean(dim=(1, 2, 3))


def style_layer_loss(features: Tensor, target_gram: Tensor) -> Tensor:
    """mean((G - A)^2) / (d*h*w) per image: the recipe's per-layer normalization. -> (B,)"""
    _, d, h, w = features.shape
    return ((gram(features) - target_gram) ** 2).mean(dim=(1, 2)) / (d * h * w)


def tv_loss(pixels: Tensor) -> Tensor:
    """Mean squared difference of neighbouring pixels (anisotropic L2 TV), per image. -> (B,)"""
    dx = pixels[..., :, 1:] - pixels[..., :, :-1]
    dy = pixels[..., 1:, :] - pixels[..., :-1, :]
    return dx.pow(2).mean(dim=(1, 2, 3)) + dy.pow(2).mean(dim=(1, 2, 3))


@dataclass(frozen=True)
class Terms:
    """Each (B,): one value per image of the batch."""

    total: Tensor
    content: Tensor
    style: Tensor
    tv: Tensor


@dataclass(frozen=True)
class Objective:
    """The loss of a batch of B images, each against its own targets with its
    own weights, sharing the structure of the pass (which layers, which
    pooling). Called as `objective(x, dtype)` on normalized images (B,3,H,W),
    it returns each image's loss terms; images do not interact, so the
    gradient of the terms' sum is each image's own gradient.

    Every number a request can change is a tensor here, never a Python float:
    a compiled objective (torch.compile, on a GPU) then serves every request
    of the same shape and structure, where a float would be baked into the
    compiled code and force a recompile per value."""

    vgg: VGGFeatures
    content_target: Tensor  # (B, C, h, w) float32, post-ReLU `content_layer`
    grams: tuple[Tensor, ...]  # (B, C_l, C_l) float32 per style layer, in `style_layers` order
    style_layer_weights: Tensor  # (B, L) float32
    weights: Tensor  # (B, 3) float32: alpha, beta, tv weight
    style_layers: tuple[str, ...]  # canonical names
    content_layer: str
    pooling: str
    use_tv: bool

    def __call__(self, x: Tensor, dtype: torch.dtype = torch.float32) -> Terms:
        if x.shape[0] > 1 and x.device.type in ROW_BY_ROW_DEVICES:  # bit for bit each row alone (config)
            rows = [row(self, b)(x[b:b + 1], dtype) for b in range(x.shape[0])]
            return Terms(*(torch.cat(parts) for parts in zip(*((r.total, r.content, r.style, r.tv) for r in rows))))
        feats = self.vgg.features(x, self.layers, self.deepest, self.pooling, dtype)
        c = content_loss(feats[self.content_layer], self.content_target)
        s = torch.zeros(x.shape[0], device=x.device)
        for k, name in enumerate(self.style_layers):
            s = s + self.style_layer_weights[:, k] * style_layer_loss(feats[name], self.grams[k])
        tv = tv_loss(self.vgg.denormalize(x)) if self.use_tv else torch.zeros(x.shape[0], device=x.device)
        total = self.weights[:, 0] * c + self.weights[:, 1] * s + self.weights[:, 2] * tv
        return Terms(total, c, s, tv)

    @property
    def layers(self) -> frozenset[str]:
        return frozenset(self.style_layers) | {self.content_layer}

    @property
    def deepest(self) -> int:
        return max(LAYER_NAMES.index(n) for n in self.layers)


def make_objective(
    vgg: VGGFeatures,
    content: Tensor,
    styles: Sequence[Tensor],
    *,
    style_layer_weights: Mapping[str, float],
    content_weight: float,
    style_weight: float,
    tv_weight: float = 0.0,
    style_blend: Sequence[float] | None = None,
    pooling: str = "max",
    content_layer: str = RECIPE_CONTENT_LAYER,
) -> Objective:
    """Targets are computed once here; the returned objective maps a
    normalized image (1,3,H,W) to its loss terms.

    Several style images are blended by mixing their Gram targets with the
    normalized `style_blend` weights (equal weights when not given).
    Targets are always float32; the objective takes the dtype of its VGG pass
    as a second argument (float32 by default)."""
    layer_weights = {canonical_layer(k): float(v) for k, v in style_layer_weights.items() if v != 0}
    content_layer = canonical_layer(content_layer)
    blend = list(style_blend) if style_blend is not None else [1.0] * len(styles)
    total_blend = sum(blend)
    blend = [b / total_blend for b in blend]

    # A Gram matrix sums over pixels, so a style of more pixels than the
    # content (another aspect, a style_scale above 1) asked for features the
    # content's size cannot have: a square style on an 8:1 content set a target
    # 8x what the style's own statistics give there, and a larger style
    # outweighed the others in a blend. Each target is scaled to the content's
    # pixel count at its layer: the same per-pixel statistics, whatever the
    # style's size. A style of the content's exact shape (the recipe resizes it
    # so) is scaled by exactly 1, which keeps the recipe's objective.
    height, width = content.shape[-2:]
    with torch.no_grad():
        content_target = vgg(content, {content_layer}, pooling)[content_layer].float()
        targets: dict[str, Tensor] = {}
        for weight, style in zip(blend, styles):
            feats = vgg(style, set(layer_weights), pooling)
            for name in layer_weights:
                h, w = feature_size(height, width, name)
                ratio = (h * w) / (feats[name].shape[-2] * feats[name].shape[-1])
                g = gram(feats[name]) * (weight * ratio)
                targets[name] = targets[name] + g if name in targets else g

    names = tuple(sorted(layer_weights, key=LAYER_NAMES.index))
    f32 = dict(device=content.device, dtype=torch.float32)
    return Objective(
        vgg=vgg,
        content_target=content_target,
        grams=tuple(targets[n] for n in names),
        style_layer_weights=torch.tensor([[layer_weights[n] for n in names]], **f32),
        weights=torch.tensor([[content_weight, style_weight, tv_weight]], **f32),
        style_layers=names,
        content_layer=content_layer,
        pooling=pooling,
        use_tv=bool(tv_weight),
    )


def row(objective: Objective, b: int) -> Objective:
    """Image b of a batch's objective, as a batch of one: its targets and
    weights are views of the batch's."""
    if objective.content_target.shape[0] == 1:
        return objective
    return dataclasses.replace(
        objective,
        content_target=objective.content_target[b:b + 1],
        grams=tuple(g[b:b + 1] for g in objective.grams),
        style_layer_weights=objective.style_layer_weights[b:b + 1],
        weights=objective.weights[b:b + 1],
    )


def stack(objectives: Sequence[Objective]) -> Objective:
    """One objective for the batch of the given ones' images, in order. They
    must share the structure (layers, pooling, TV on or off) and image size."""
    first = objectives[0]
    structure = (first.style_layers, first.content_layer, first.pooling, first.use_tv, first.vgg)
    for o in objectives[1:]:
        if (o.style_layers, o.content_layer, o.pooling, o.use_tv, o.vgg) != structure:
            raise ValueError("objectives of different structure cannot share a batch")
    if len(objectives) == 1:
        return first
    return dataclasses.replace(
        first,
        content_target=torch.cat([o.content_target for o in objectives]),
        grams=tuple(torch.cat(g) for g in zip(*(o.grams for o in objectives))),
        style_layer_weights=torch.cat([o.style_layer_weights for o in objectives]),
        weights=torch.cat([o.weights for o in objectives]),
    )
