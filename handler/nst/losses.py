"""The Gatys objective exactly as the reference recipe defines it.

total = alpha * content + beta * style (+ tv_weight * tv), with
  content = mean((F - P)^2) at conv4_2,
  style   = sum_l w_l * mean((G_l - A_l)^2) / (d_l * h_l * w_l),
and G the *unnormalized* Gram matrix F F^T of one image's features.
Grams and losses are computed in float32 whatever the features' dtype.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .config import RECIPE_CONTENT_LAYER
from .vgg import LAYER_NAMES, VGGFeatures, canonical_layer


def gram(features: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, C): each image's unnormalized Gram matrix, in float32."""
    b, c, h, w = features.shape
    if features.is_contiguous(memory_format=torch.channels_last) and c > 1:
        flat = features.permute(0, 2, 3, 1).reshape(b, h * w, c).float()  # (B, H*W, C): a view of NHWC
        return torch.bmm(flat.transpose(1, 2), flat)
    flat = features.reshape(b, c, h * w).float()  # (B, C, H*W)
    return torch.bmm(flat, flat.transpose(1, 2))


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

    with torch.no_grad():
        content_target = vgg(content, {content_layer}, pooling)[content_layer].float()
        targets: dict[str, Tensor] = {}
        for weight, style in zip(blend, styles):
            feats = vgg(style, set(layer_weights), pooling)
            for name in layer_weights:
                g = gram(feats[name]) * weight
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
