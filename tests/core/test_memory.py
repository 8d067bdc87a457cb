"""Admission control: the memory estimate against the real network, and refusal before allocating."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import nst.pipeline as pipeline_mod
from nst import Limits, RequestError, parse_request, run
from nst.config import Params
from nst.memory import activation_elements_per_pixel, estimate_bytes, is_out_of_memory
from nst.optimize import stylize


def test_activation_count_matches_a_real_forward(vgg):
    """Count, with the real extractor, every conv output and ReLU output up to conv5_1."""
    h, w = 128, 128
    x = torch.rand(1, 3, h, w)
    counted = 3 * h * w  # the input
    with torch.no_grad():
        feats = vgg(x, [f"conv{b}_{i}" for b, i in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (3, 4),
                                                     (4, 1), (4, 2), (4, 3), (4, 4), (5, 1))])
    counted += sum(2 * f.numel() for f in feats.values())  # conv output + ReLU output
    pools = [feats["conv1_2"], feats["conv2_2"], feats["conv3_4"], feats["conv4_4"]]
    counted += sum(2 * p.numel() // 4 for p in pools)  # int64 indices of each 2x2 max pool
    assert activation_elements_per_pixel() == pytest.approx(counted / (h * w), rel=1e-6)


def test_estimate_grows_with_pixels_and_history():
    small = estimate_bytes(128, 128, 128 * 128, Params())
    big = estimate_bytes(512, 512, 512 * 512, Params())
    assert big > 10 * (small - 64 * 2**20)
    adam = estimate_bytes(512, 512, 512 * 512, dataclasses.replace(Params(), optimizer="adam"))
    assert adam < big  # no L-BFGS history


def test_over_budget_is_refused_before_optimizing(vgg, images, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline_mod, "stylize", lambda *a, **k: calls.append(1))
    limits = Limits(memory_budget_mb=70)
    fields = {"content": images.png(images.content(96, 96)), "style": images.png(images.style(96, 96))}
    with pytest.raises(RequestError) as e:
        run(parse_request({**fields, "max_size": "96"}, limits), vgg, limits)
    assert e.value.code == 507 and e.value.message.startswith("max_size")
    assert calls == []


def test_within_budget_runs(vgg, images):
    limits = Limits(memory_budget_mb=512)
    fields = {"content": images.png(images.content(40, 32)), "style": images.png(images.style(32, 32)), "steps": "2"}
    assert run(parse_request(fields, limits), vgg, limits).result.steps == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: peak memory is measured there")
@pytest.mark.parametrize("size", [256, 512])
def test_estimate_bounds_the_measured_gpu_peak(vgg_state, size):
    from nst.vgg import VGGFeatures

    device = torch.device("cuda")
    model = VGGFeatures(vgg_state).to(device)
    content = torch.rand(1, 3, size, size, device=device)
    style = torch.rand(1, 3, size, size, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    stylize(model, content, [style], dataclasses.replace(Params(), steps=3))
    peak = torch.cuda.max_memory_allocated() - before
    assert estimate_bytes(size, size, size * size, Params()) >= peak


def _caught(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the exception itself is under test
        return e
    raise AssertionError("no exception")


def test_real_allocation_failures_are_out_of_memory():
    """torch's host allocator raises a plain RuntimeError; it must count as OOM (507), not a bug (500)."""
    host = _caught(lambda: torch.empty(2**50, dtype=torch.uint8))
    assert type(host) is RuntimeError and is_out_of_memory(host)
    assert is_out_of_memory(_caught(lambda: bytearray(2**62)))  # Python's own MemoryError
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))


@pytest.mark.parametrize("text", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
])
def test_gpu_library_allocation_failures_are_out_of_memory(text):
    """How cuBLAS, cuDNN and C10_CUDA_CHECK word them (RuntimeError or its subclass AcceleratorError)."""
    assert is_out_of_memory(RuntimeError(text))


def test_other_runtime_errors_are_not_out_of_memory():
    shape = _caught(lambda: torch.ones(2, 3) @ torch.ones(2, 3))
    assert isinstance(shape, RuntimeError) and not is_out_of_memory(shape)
    assert not is_out_of_memory(ValueError("can't allocate memory"))
