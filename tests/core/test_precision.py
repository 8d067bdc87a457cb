"""The fast preset's speed measures: bf16 warm-up steps, L-BFGS history cap, clamped objective."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import nst.optimize as optimize_mod
from nst.config import LBFGS_HISTORY, LBFGS_MEMORY, Limits, Params
from nst.request import build_params
from nst.lbfgs import history_pairs
from nst.optimize import compute_dtype, stylize

BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_seed_preset_never_uses_low_precision():
    seed = build_params({"preset": "seed"}, Limits())
    assert compute_dtype(torch.device("cpu"), seed) == torch.float32


@pytest.mark.skipif(not BF16, reason="this CPU has no bf16 support")
def test_fast_preset_uses_bf16_where_the_cpu_has_it():
    assert compute_dtype(torch.device("cpu"), Params()) == torch.bfloat16


def test_bf16_features_approximate_float32(vgg):
    x = vgg.normalize(torch.rand(1, 3, 40, 48))
    with torch.no_grad():
        exact = vgg(x, ["conv1_1", "conv3_1", "conv5_1"])
        low = vgg(x, ["conv1_1", "conv3_1", "conv5_1"], dtype=torch.bfloat16)
    for name, ref in exact.items():
        assert low[name].dtype == torch.bfloat16
        err = (low[name].float() - ref).norm() / ref.norm()
        assert err < 0.05, name  # bf16 keeps 8 mantissa bits: ~1% per layer


def test_lbfgs_history_is_capped_by_memory():
    assert history_pairs(64 * 64) == LBFGS_HISTORY
    big = 4096 * 4096
    assert history_pairs(big) == max(5, LBFGS_MEMORY // (2 * 3 * big * 4))
    assert history_pairs(big) < LBFGS_HISTORY


def test_switch_to_float32_after_lowp_steps(vgg, monkeypatch):
    """Steps up to LOWP_STEPS run the VGG pass in the low dtype, later ones in float32."""
    seen = []
    real = vgg.features

    def spy(x, wanted, deepest, pooling, dtype):
        seen.append(dtype)
        return real(x, wanted, deepest, pooling, dtype)

    monkeypatch.setattr(vgg, "features", spy)
    monkeypatch.setattr(optimize_mod, "LOWP_STEPS", 2)
    monkeypatch.setattr(optimize_mod, "compute_dtype", lambda device, params: torch.bfloat16)
    content, style = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    stylize(vgg, content, [style], dataclasses.replace(Params(), steps=4))
    # targets (content, style) in float32, then 4 steps, then the final score in float32
    per_step = seen[2:-1]
    assert per_step == [torch.bfloat16] * 2 + [torch.float32] * 2
    assert seen[:2] == [torch.float32] * 2 and seen[-1] == torch.float32



def test_gram_of_channels_last_features_equals_the_reference():
    """The NHWC path (bf16 on a CPU, every dtype on a GPU) is the same F F^T."""
    from nst.losses import gram

    f = torch.rand(1, 8, 5, 7)
    reference = (f.reshape(8, 35) @ f.reshape(8, 35).t()).unsqueeze(0)  # (1, C, C): a batch of one
    assert torch.allclose(gram(f.contiguous(memory_format=torch.channels_last)), reference, atol=1e-5)
    assert torch.allclose(gram(f), reference, atol=1e-5)
