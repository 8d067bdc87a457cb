"""The Gatys objective exactly as the reference recipe defines it.

total = alpha * content + beta * style (+ tv_weight * tv), with
  content = mean((F - P)^2) at conv4_2,
  style   = sum_l w_l * mean((G_l - A_l)^2) / (d_l * h_l * w_l),
and G the *unnormalized* Gram matrix F F^T of one image's features.
Grams and losses are computed in float32 whatever the features' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .vgg import VGGFeatures, canonical_layer


def gram(features: Tensor) -> Tensor:
    """(1, C, H, W) -> (C, C) unnormalized Gram matrix, in float32."""
    _, c, h, w = features.shape
    if features.is_contiguous(memory_format=torch.channels_last) and c > 1:
        flat = features.permute(0, 2, 3, 1).reshape(h * w, c).float()  # (H*W, C): a view of NHWC
        return flat.t() @ flat
    flat = features.reshape(c, h * w).float()  # (C, H*W)
    return flat @ flat.t()


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    return torch.mean((features.float() - target) ** 2)


def style_layer_loss(features: Tensor, target_gram: Tensor) -> Tensor:
    """mean((G - A)^2) / (d*h*w): the recipe's per-layer normalization."""
    _, d, h, w = features.shape
    return torch.mean((gram(features) - target_gram) ** 2) / (d * h * w)


def tv_loss(pixels: Tensor) -> Tensor:
    """Mean squared difference of neighbouring pixels (anisotropic L2 TV)."""
    dx = pixels[..., :, 1:] - pixels[..., :, :-1]
    dy = pixels[..., 1:, :] - pixels[..., :-1, :]
    return dx.pow(2).mean() + dy.pow(2).mean()


@dataclass(frozen=True)
class Terms:
    total: Tensor
    content: Tensor
    style: Tensor
    tv: Tensor


Objective = Callable[..., Terms]  # (normalized image, dtype=float32) -> Terms


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
    content_layer: str = "conv4_2",
) -> Objective:
    """Targets are computed once here; the returned function maps a
    normalized image (1,3,H,W) to its loss terms.

    Several style images are blended by mixing their Gram targets with the
    normalized `style_blend` weights (equal weights when not given).
    Targets are always float32; the returned function takes the dtype of its
    VGG pass as a second argument (float32 by default)."""
    layer_weights = {canonical_layer(k): float(v) for k, v in style_layer_weights.items() if v != 0}
    content_layer = canonical_layer(content_layer)
    layers = set(layer_weights) | {content_layer}
    blend = list(style_blend) if style_blend is not None else [1.0] * len(styles)
    total_blend = sum(blend)
    blend = [b / total_blend for b in blend]

    with torch.no_grad():
        content_target = vgg(content, {content_layer}, pooling)[content_layer].float()
        targets: dict[str, Tensor] = {}
        for weight, style in zip(blend, styles):
            feats = vgg(style, set(layer_weights), pooling)
            for name in layer_weights:
                g = gram(feats[name]) * weight
                targets[name] = targets[name] + g if name in targets else g

    def objective(x: Tensor, dtype: torch.dtype = torch.float32) -> Terms:
        feats = vgg(x, layers, pooling, dtype)
        c = content_loss(feats[content_layer], content_target)
        s = sum(
            (w * style_layer_loss(feats[n], targets[n]) for n, w in layer_weights.items()),
            torch.zeros((), device=x.device),
        )
        tv = tv_loss(vgg.denormalize(x)) if tv_weight else torch.zeros((), device=x.device)
        total = content_weight * c + style_weight * s + tv_weight * tv
        return Terms(total, c, s, tv)

    return objective
