"""Frozen VGG19 feature extractor, truncated after the deepest layer the losses read.

Layer names follow the tutorial (`conv4_2` ...), but the activation returned
for `convB_I` is the post-ReLU one: the tutorial stores torchvision's conv
output and the in-place ReLU that follows overwrites it, so that is what the
reference recipe really optimizes against. `reluB_I` is accepted as an alias.
"""
from __future__ import annotations

import re
from typing import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FLOAT32_CHANNELS_LAST_DEVICES, RGB_PAD_CHANNELS, RGB_PAD_DEVICES

# VGG19 conv blocks up to conv5_1: (block, index in block, in_ch, out_ch,
# index of the conv in torchvision's `features` Sequential). Public: the
# memory model reads the layer shapes from it.
CONVS = (
    (1, 1, 3, 64, 0), (1, 2, 64, 64, 2),
    (2, 1, 64, 128, 5), (2, 2, 128, 128, 7),
    (3, 1, 128, 256, 10), (3, 2, 256, 256, 12), (3, 3, 256, 256, 14), (3, 4, 256, 256, 16),
    (4, 1, 256, 512, 19), (4, 2, 512, 512, 21), (4, 3, 512, 512, 23), (4, 4, 512, 512, 25),
    (5, 1, 512, 512, 28),
)
LAYER_NAMES = tuple(f"conv{b}_{i}" for b, i, *_ in CONVS)
TORCHVISION_INDEX = {f"conv{b}_{i}": idx for b, i, _, _, idx in CONVS}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NAME = re.compile(r"^(?:conv|relu)([1-5])_([1-4])$")


def feature_size(height: int, width: int, layer: str) -> tuple[int, int]:
    """(h, w) of `layer`'s activations for an (height, width) image: each
    block before the layer's ends in a 2x2 pooling, which floors odd sides."""
    pools = int(canonical_layer(layer)[4]) - 1  # conv{block}_{i}
    return height >> pools, width >> pools


def canonical_layer(name: str) -> str:
    """`relu3_1` -> `conv3_1`; raises ValueError for names VGG19 (up to conv5_1) lacks."""
    m = _NAME.match(name)
    if not m or f"conv{m.group(1)}_{m.group(2)}" not in TORCHVISION_INDEX:
        raise ValueError(f"unknown VGG19 layer {name!r} (use conv1_1 .. conv5_1)")
    return f"conv{m.group(1)}_{m.group(2)}"


def features_state_dict(raw: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Accept a full torchvision VGG19 checkpoint (`features.N.weight`) or a
    features-only one (`N.weight`); keep the convs up to conv5_1, keyed `N.weight`.
    ValueError where it is none of these: not a dict of tensors, a conv
    missing, or one of another shape (another network's checkpoint would
    otherwise fail only when a worker loads the archive)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"weights file holds a {type(raw).__name__}, not a state dict")
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ValueError(f"weights file has a key {key!r}: not a state dict")
        key = key[len("features."):] if key.startswith("features.") else key
        idx, _, kind = key.partition(".")
        if idx.isdigit() and kind in ("weight", "bias") and int(idx) <= TORCHVISION_INDEX["conv5_1"]:
            out[key] = value
    missing = [
        f"{i}.{k}" for i in TORCHVISION_INDEX.values() for k in ("weight", "bias") if f"{i}.{k}" not in out
    ]
    if missing:
        raise ValueError(f"weights file lacks VGG19 feature tensors: {', '.join(missing[:4])}...")
    for _, _, cin, cout, idx in CONVS:
        for name, shape in ((f"{idx}.weight", (cout, cin, 3, 3)), (f"{idx}.bias", (cout,))):
            got = tuple(getattr(out[name], "shape", ()))
            if got != shape:
                raise ValueError(f"weights file's {name} has shape {got}, VGG19's is {shape}")
    return out


class VGGFeatures(nn.Module):
    """VGG19 convs up to conv5_1, frozen. Pooling is chosen per call (max or avg)."""

    def __init__(self, state: Mapping[str, Tensor]):
        super().__init__()
        state = features_state_dict(state)
        self.convs = nn.ModuleList()
        for _, _, cin, cout, idx in CONVS:
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            conv.weight.data.copy_(state[f"{idx}.weight"])
            conv.bias.data.copy_(state[f"{idx}.bias"])
            self.convs.append(conv)
        self.requires_grad_(False)
        self.eval()
        # (dtype, channels_last, pad_rgb, device) -> the convs' weights cast once (_params)
        self._cast_cache: dict = {}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def normalize(self, pixels: Tensor) -> Tensor:
        """[0,1] RGB -> the ImageNet-normalized input VGG was trained on."""
        return (pixels - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        return x * self.std + self.mean

    def _params(self, dtype: torch.dtype, channels_last: bool, pad_rgb: bool = False) -> list[tuple[Tensor, Tensor]]:
        """Conv weights and biases in `dtype` (channels-last where asked), cast
        once and kept: autocast would re-cast frozen weights on every call.
        With `pad_rgb`, conv1_1's weights take zero input channels up to
        RGB_PAD_CHANNELS (RGB_PAD_DEVICES)."""
        if dtype == torch.float32 and not channels_last and not pad_rgb:
            return [(c.weight, c.bias) for c in self.convs]
        key = (dtype, channels_last, pad_rgb, self.mean.device)
        cache = self._cast_cache
        if key not in cache:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            weights = [c.weight for c in self.convs]
            if pad_rgb:  # (64, 3, 3, 3) -> (64, RGB_PAD_CHANNELS, 3, 3): zeros for the added channels
                weights[0] = F.pad(weights[0], (0, 0, 0, 0, 0, RGB_PAD_CHANNELS - weights[0].shape[1]))
            cache[key] = [(w.to(dtype, memory_format=fmt), c.bias.to(dtype)) for w, c in zip(weights, self.convs)]
        return cache[key]

    def forward(
        self, x: Tensor, layers: Collection[str], pooling: str = "max", dtype: torch.dtype = torch.float32
    ) -> dict[str, Tensor]:
        """Post-ReLU activations of `layers` for the normalized batch `x`,
        computed in `dtype`. Low precision runs channels-last (oneDNN's bf16
        and cuDNN's tensor-core kernels are fastest there), and so does
        float32 on FLOAT32_CHANNELS_LAST_DEVICES (a GPU).

        Stops after the deepest requested layer: nothing past it is computed."""
        wanted = frozenset(canonical_layer(n) for n in layers)
        return self.features(x, wanted, max(LAYER_NAMES.index(n) for n in wanted), pooling, dtype)

    def features(
        self, x: Tensor, wanted: frozenset[str], deepest: int, pooling: str, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """`forward` with the layer names already canonical and the deepest
        layer's index given: nothing here but tensor operations, so
        torch.compile traces it whole."""
        pool = F.max_pool2d if pooling == "max" else F.avg_pool2d
        channels_last = dtype != torch.float32 or x.device.type in FLOAT32_CHANNELS_LAST_DEVICES
        pad_rgb = x.device.type in RGB_PAD_DEVICES and x.shape[1] < RGB_PAD_CHANNELS
        if pad_rgb:
            x = F.pad(x, (0, 0, 0, 0, 0, RGB_PAD_CHANNELS - x.shape[1]))  # (B, 3, H, W) -> (B, 8, H, W), zeros
        if channels_last:
            x = x.to(dtype, memory_format=torch.channels_last)
        out: dict[str, Tensor] = {}
        params = self._params(dtype, channels_last, pad_rgb)
        for k in range(deepest + 1):
            if k > 0 and CONVS[k][0] != CONVS[k - 1][0]:  # a new block: the previous one ends in a 2x2 pool
                x = pool(x, 2)
            weight, bias = params[k]
            x = F.relu(_conv(x, weight, bias))
            if LAYER_NAMES[k] in wanted:
                out[LAYER_NAMES[k]] = x
        return out


def _conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A 3x3 'same' convolution, whole batch at once. (A CPU never passes a
    batch here: its objective runs row by row, config.ROW_BY_ROW_DEVICES,
    since oneDNN's kernels, among others, round differently with the batch
    size. bench/gpu_batch_equality.py swaps this for a per-image loop.)"""
    return F.conv2d(x, weight, bias, padding=1)


def random_features_state(seed: int = 0) -> dict[str, Tensor]:
    """torchvision's VGG19 initialization under `torch.manual_seed(seed)`: the
    deterministic stand-in used offline and in tests (texture transfer only)."""
    import torchvision

    saved_rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = torchvision.models.vgg19(weights=None)
    finally:
        torch.random.set_rng_state(saved_rng)
    return features_state_dict(model.features.state_dict())
