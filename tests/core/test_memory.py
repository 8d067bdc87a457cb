"""Admission control: the memory estimate against the real network, and refusal before allocating."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import nst.pipeline as pipeline_mod
from nst import Limits, RequestError, parse_request, run
from nst.config import Params
from nst.lbfgs import history_pairs, pair_bytes
from nst.memory import estimate_bytes, float32_copies_per_pixel, is_out_of_memory, saved_bytes_per_pixel, saved_elements_per_pixel
from nst.optimize import stylize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_saved_tensor_count_matches_what_autograd_saves(vgg, dtype):
    """Count, with autograd's own saved-tensor hooks, the distinct storage one
    step of the real objective keeps for backward: float32, and float16 (a
    GPU's steps: half-size activations, plus the losses' float32 copies)."""
    from nst.losses import make_objective

    h, w = 128, 128
    content, style = torch.rand(1, 3, h, w), torch.rand(1, 3, h, w)
    objective = make_objective(vgg, vgg.normalize(content), [vgg.normalize(style)],
                               style_layer_weights=Params().style_layer_weights, content_weight=1.0,
                               style_weight=1e6)
    storages: dict[int, int] = {}

    def pack(t):
        if not (t.dim() in (2, 3) and t.shape[-1] == t.shape[-2]):  # Gram-sized (B x C x C): in the fixed BASE
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = content.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective(vgg.normalize(x.clamp(0, 1)), dtype)
    weights = {p.untyped_storage().data_ptr() for p in vgg.parameters()}
    weights |= {t.untyped_storage().data_ptr() for pair in vgg.__dict__.get("_cast_cache", {}).values()
                for wb in pair for t in wb}  # the float16 copies of the weights, cast once and kept
    saved = sum(n for ptr, n in storages.items() if ptr not in weights)
    if dtype == torch.float32:
        expected = saved_elements_per_pixel() * 4
    else:
        expected = saved_bytes_per_pixel(2) + float32_copies_per_pixel() * 4
    assert expected * h * w == pytest.approx(saved, rel=0.05)


def test_estimate_grows_with_pixels_and_history():
    small = estimate_bytes(128, 128, 128 * 128, Params())
    big = estimate_bytes(512, 512, 512 * 512, Params())
    assert big > 10 * (small - 64 * 2**20)
    adam = estimate_bytes(512, 512, 512 * 512, dataclasses.replace(Params(), optimizer="adam"))
    assert adam < big  # no L-BFGS history


def test_estimate_counts_half_size_activations_only_where_every_step_is_half():
    """A bf16-then-float32 request peaks in its float32 steps; one whose every
    step is float16 saves half-size activations plus the losses' float32 copies."""
    p = Params()
    fp32 = estimate_bytes(512, 512, 512 * 512, p, "cuda")
    assert estimate_bytes(512, 512, 512 * 512, p, "cuda", (torch.bfloat16, torch.float32)) == fp32
    fp16 = estimate_bytes(512, 512, 512 * 512, p, "cuda", (torch.float16,))
    history = history_pairs(512 * 512, "cuda") * pair_bytes(512 * 512, "cuda")
    saved = (saved_bytes_per_pixel(2) + float32_copies_per_pixel("cuda") * 4) * 512 * 512
    assert history + saved < fp16 < fp32


def test_lowp_grams_drop_the_deeper_style_layers_copies_and_padding_adds_the_padded_input():
    """Where the Grams read 16-bit features (GRAM_LOWP_DEVICES: a GPU) only
    conv1_1's float32 copy stays in the count (its Gram's backward writes a
    float32 product of that size) beside conv4_2's; elsewhere every style
    layer's. The padded image (RGB_PAD_DEVICES) is saved for conv1_1."""
    from nst.config import GRAM_LOWP_DEVICES, RGB_PAD_CHANNELS, RGB_PAD_DEVICES
    from nst.memory import padded_input_bytes_per_pixel

    every = 64 + 128 / 4 + 256 / 16 + 512 / 64 + 512 / 256 + 512 / 64  # conv1_1..conv5_1, conv4_2
    assert float32_copies_per_pixel("cpu") == every
    assert "cuda" in GRAM_LOWP_DEVICES and "cpu" not in GRAM_LOWP_DEVICES
    assert float32_copies_per_pixel("cuda") == 64 + 512 / 64
    assert "cuda" in RGB_PAD_DEVICES and "cpu" not in RGB_PAD_DEVICES
    assert padded_input_bytes_per_pixel("cuda", 2) == RGB_PAD_CHANNELS * 2
    assert padded_input_bytes_per_pixel("cpu", 4) == 0


@pytest.mark.parametrize("lowp", ["bfloat16", "float16"])
def test_admission_estimates_with_the_steps_dtypes(vgg, images, monkeypatch, lowp):
    """Admission asks the optimizer which dtypes the request's steps run in:
    float16 on every step (a GPU's default, forced here on the CPU) is
    admitted at the half-size estimate, bf16 then float32 at the float32 one."""
    import nst.optimize as optimize_mod

    monkeypatch.setattr(optimize_mod, "LOWP_DTYPE", {"cpu": lowp})
    content, style = images.content(64, 48), images.style(32, 32)
    need = pipeline_mod.admit(content, [style], Params(), Limits(memory_budget_mb=4096), vgg)
    dtypes = (torch.float16,) if lowp == "float16" else (torch.float32,)
    assert need == estimate_bytes(48, 64, 32 * 32, Params(), "cpu", dtypes)


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
@pytest.mark.parametrize("size", [(512, 512), (1024, 768), (2048, 1536)])
def test_estimate_bounds_the_measured_gpu_peak(vgg_state, size):
    """Never below the measured peak (admission control would let an OOM in),
    at most 1.3x above it (it would refuse requests that fit)."""
    from nst.optimize import LOWP_STEPS, step_dtypes

    from nst.vgg import VGGFeatures

    device = torch.device("cuda")
    model = VGGFeatures(vgg_state).to(device)
    w, h = size
    content = torch.rand(1, 3, h, w, device=device)
    style = torch.rand(1, 3, h, w, device=device)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    stylize(model, content, [style], dataclasses.replace(Params(), steps=LOWP_STEPS + 5))
    peak = torch.cuda.max_memory_allocated() - before
    estimate = estimate_bytes(h, w, w * h, Params(), "cuda", step_dtypes(device, Params()))
    print(f"{w}x{h}: peak {peak / 2**30:.3f} GiB, estimate {estimate / 2**30:.3f} GiB, ratio {estimate / peak:.3f}")
    assert peak <= estimate <= 1.3 * peak


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
