"""The fast preset's speed measures: low-precision steps (bf16 first on a CPU,
float16 throughout on a GPU, with loss scaling), L-BFGS history cap, clamped objective."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import nst.optimize as optimize_mod
from nst.config import FAST_ADAM_LR, LBFGS_HISTORY, LBFGS_HISTORY_DTYPE, LBFGS_MEMORY, Limits, Params
from nst.request import build_params
from nst.lbfgs import history_pairs
from nst.optimize import compute_dtype, gradient, scale_state, step_dtype, step_dtypes, stylize

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


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_lbfgs_history_is_capped_by_memory(device_type):
    """Per device type: a bf16 history (a GPU's, LBFGS_HISTORY_DTYPE) fits twice the pixels."""
    assert history_pairs(64 * 64, device_type) == LBFGS_HISTORY
    big = 4096 * 4096
    itemsize = {"float32": 4, "bfloat16": 2}[LBFGS_HISTORY_DTYPE.get(device_type, "float32")]
    assert history_pairs(big, device_type) == max(5, LBFGS_MEMORY // (2 * 3 * big * itemsize))
    assert history_pairs(big, device_type) < LBFGS_HISTORY


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


def _features(dtype, channels_last, seed=0, shape=(2, 16, 6, 5)):
    gen = torch.Generator().manual_seed(seed)
    f = (torch.randn(*shape, generator=gen).relu() * 3).to(dtype)  # post-ReLU-like
    return f.contiguous(memory_format=torch.channels_last) if channels_last else f


def _gram64(f):
    flat = f.double().flatten(2)  # (B, C, H*W)
    return torch.bmm(flat, flat.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_lowp_gram_is_the_float32_gram_of_the_same_numbers(dtype, channels_last, monkeypatch):
    """GRAM_LOWP_DEVICES: the 16-bit features' Gram, accumulated in float32, is the
    float32 path's (the same exactly representable numbers; here the same
    sums), and the reference formula's to float32 rounding."""
    from nst import losses

    f = _features(dtype, channels_last)
    plain = losses.gram(f)
    monkeypatch.setattr(losses, "GRAM_LOWP_DEVICES", ("cuda",))  # another device type's setting: not here
    assert "LowpGram" not in type(losses.gram(f.clone().requires_grad_(True)).grad_fn).__name__
    monkeypatch.setattr(losses, "GRAM_LOWP_DEVICES", ("cpu",))
    assert "LowpGram" in type(losses.gram(f.clone().requires_grad_(True)).grad_fn).__name__
    lowp = losses.gram(f)
    assert lowp.dtype == torch.float32 and lowp.shape == (2, 16, 16)
    assert torch.equal(lowp, plain)
    torch.testing.assert_close(lowp.double(), _gram64(f), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_lowp_gram_gradient_matches_the_float64_reference(dtype, tol, monkeypatch):
    """The style loss's gradient through the 16-bit Gram against the
    reference formula in float64, within the dtype's rounding, as close as
    the float32 path's."""
    from nst import losses

    f = _features(dtype, True, seed=1)
    target = _gram64(_features(dtype, True, seed=2)).float()
    ref = f.double().requires_grad_(True)
    _, d, h, w = f.shape
    (((_gram64(ref) - target.double()) ** 2).mean(dim=(1, 2)) / (d * h * w)).sum().backward()

    def grad(lowp: bool):
        monkeypatch.setattr(losses, "GRAM_LOWP_DEVICES", ("cpu",) if lowp else ())
        x = f.clone().requires_grad_(True)
        losses.style_layer_loss(x, target).sum().backward()
        assert x.grad.dtype == dtype
        return (x.grad.double() - ref.grad).abs().max().item() / ref.grad.abs().max().item()

    plain, lowp = grad(False), grad(True)
    assert lowp < tol and lowp < 2 * plain + tol / 4, (lowp, plain)


def test_lowp_gram_backward_scales_dG_into_float16s_range(monkeypatch):
    """dG + dG^T is rounded to float16 only after a power-of-two scaling: a
    dG past 65504 still gives the finite, exact gradient F (dG + dG^T) when
    that fits; a non-finite dG gives a non-finite gradient (which the loss
    scaling skips), never a silently finite one."""
    from nst import losses

    monkeypatch.setattr(losses, "GRAM_LOWP_DEVICES", ("cpu",))
    f = torch.full((1, 2, 2, 2), 2.0 ** -8, dtype=torch.float16)  # F = 2^-8 everywhere
    x = f.clone().requires_grad_(True)
    d_gram = torch.full((1, 2, 2), 2.0 ** 20)  # 16x float16's largest value
    losses.gram(x).backward(d_gram)
    # dF[c, p] = sum_k F[k, p] (dG[c, k] + dG[k, c]) = 2 * 2^-8 * 2 * 2^20 = 2^14
    assert torch.equal(x.grad, torch.full_like(f, 2.0 ** 14))
    y = f.clone().requires_grad_(True)
    d_gram[0, 0, 1] = float("inf")
    losses.gram(y).backward(d_gram)
    assert not torch.isfinite(y.grad).all()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_one_product_gram_is_autograds_gram_with_the_reference_gradient(dtype, tol, channels_last, monkeypatch):
    """GRAM_ONE_PRODUCT_DEVICES (the CPU's default), for layers of at least
    GRAM_ONE_PRODUCT_MIN_PIXELS: bit for bit the Gram of autograd's bmm, and
    a style-loss gradient F (dG + dG^T) from one product that matches the
    reference formula's in float64 as closely as autograd's two products
    do, in the features' dtype and memory layout."""
    from nst import losses

    shape = (2, 16, 12, 11)  # a batch of two; 132 pixels, at least GRAM_ONE_PRODUCT_MIN_PIXELS
    assert 12 * 11 >= losses.GRAM_ONE_PRODUCT_MIN_PIXELS
    f = _features(dtype, channels_last, seed=4, shape=shape)
    target = _gram64(_features(dtype, channels_last, seed=5, shape=shape)).float()
    _, d, h, w = f.shape
    ref = f.double().requires_grad_(True)
    (((_gram64(ref) - target.double()) ** 2).mean(dim=(1, 2)) / (d * h * w)).sum().backward()
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def run(devices):
        monkeypatch.setattr(losses, "GRAM_ONE_PRODUCT_DEVICES", devices)
        x = f.clone().requires_grad_(True)
        g = losses.gram(x)
        (grad,) = torch.autograd.grad((((g - target) ** 2).mean(dim=(1, 2)) / (d * h * w)).sum(), x)
        assert grad.dtype == dtype and grad.is_contiguous(memory_format=layout)
        err = (grad.double() - ref.grad).abs().max().item() / ref.grad.abs().max().item()
        return g, err, type(g.grad_fn).__name__

    one, one_err, one_fn = run(("cpu",))
    two, two_err, two_fn = run(("cuda",))  # another device type's setting: autograd's bmm here
    assert one_fn == "_GramBackward" and two_fn != one_fn
    assert torch.equal(one, two)
    assert one_err < tol and one_err <= 2 * two_err + tol / 4, (one_err, two_err)
    # a layer of fewer pixels takes autograd's bmm: there dG + dG^T costs more than the product saved
    monkeypatch.setattr(losses, "GRAM_ONE_PRODUCT_DEVICES", ("cpu",))
    monkeypatch.setattr(losses, "GRAM_ONE_PRODUCT_MIN_PIXELS", 12 * 11 + 1)
    assert type(losses.gram(f.clone().requires_grad_(True)).grad_fn).__name__ == two_fn


def test_float16_steps_with_the_lowp_gram_take_the_float32_grams_steps(vgg, monkeypatch):
    """Thirty float16 L-BFGS steps (a GPU's, forced on the CPU) end at the
    same loss with GRAM_LOWP_DEVICES on as off, with none skipped."""
    from nst import losses

    gen = torch.Generator().manual_seed(8)
    content, style = torch.rand(1, 3, 32, 32, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    params = dataclasses.replace(Params(), steps=30)
    monkeypatch.setattr(optimize_mod, "compute_dtype", lambda device, p: torch.float16)
    plain = stylize(vgg, content, [style], params)
    monkeypatch.setattr(losses, "GRAM_LOWP_DEVICES", ("cpu",))
    lowp = stylize(vgg, content, [style], params)
    assert lowp.skipped_steps == plain.skipped_steps == 0
    assert lowp.loss == pytest.approx(plain.loss, rel=0.05)
    assert lowp.loss < 0.2 * lowp.history[0].loss  # it optimized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rgb_padded_to_8_channels_gives_the_same_features_and_gradient(vgg, dtype, monkeypatch):
    """RGB_PAD_DEVICES: the image padded with zero channels and conv1_1's
    weights with zero input channels are the same convolution: every
    layer's features and the image's gradient (3 channels) as unpadded."""
    from nst import vgg as vgg_mod

    gen = torch.Generator().manual_seed(4)
    x = torch.rand(1, 3, 24, 20, generator=gen)

    def run(devices):
        monkeypatch.setattr(vgg_mod, "RGB_PAD_DEVICES", devices)
        xg = x.clone().requires_grad_(True)
        feats = vgg.features(vgg.normalize(xg), frozenset(vgg_mod.LAYER_NAMES), len(vgg_mod.LAYER_NAMES) - 1,
                             "max", dtype)
        sum(f.float().square().mean() for f in feats.values()).backward()
        return feats, xg.grad

    plain, padded = run(()), run(("cpu",))
    assert padded[0].keys() == plain[0].keys()
    for name in plain[0]:
        torch.testing.assert_close(padded[0][name], plain[0][name], rtol=1e-5, atol=1e-6)
    assert padded[1].shape == (1, 3, 24, 20)
    torch.testing.assert_close(padded[1], plain[1], rtol=1e-5, atol=1e-9)
    w = vgg._params(dtype, dtype != torch.float32, True)[0][0]
    assert w.shape == (64, 8, 3, 3) and not w[:, 3:].any()  # the added input channels weigh nothing


def test_float32_passes_run_channels_last_only_on_the_device_types_named(vgg, monkeypatch):
    """FLOAT32_CHANNELS_LAST_DEVICES (a GPU by default; preset=seed's layout
    experiment empties it): float32 features in either layout, the same
    numbers."""
    from nst import vgg as vgg_mod

    x = vgg.normalize(torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(6)))
    layers = frozenset(vgg_mod.LAYER_NAMES)
    assert vgg_mod.FLOAT32_CHANNELS_LAST_DEVICES == ("cuda",)
    nchw = vgg.features(x, layers, len(layers) - 1, "max", torch.float32)
    monkeypatch.setattr(vgg_mod, "FLOAT32_CHANNELS_LAST_DEVICES", ("cpu",))
    nhwc = vgg.features(x, layers, len(layers) - 1, "max", torch.float32)
    for name in vgg_mod.LAYER_NAMES:
        assert nhwc[name].is_contiguous(memory_format=torch.channels_last) and nchw[name].is_contiguous(), name
        torch.testing.assert_close(nhwc[name], nchw[name], rtol=1e-4, atol=1e-5)


def test_steps_with_the_rgb_padded_take_the_unpadded_steps(vgg, monkeypatch):
    """Thirty default steps (bf16, then float32) end at the same loss with
    RGB_PAD_DEVICES on as off."""
    from nst import vgg as vgg_mod

    gen = torch.Generator().manual_seed(8)
    content, style = torch.rand(1, 3, 32, 48, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    params = dataclasses.replace(Params(), steps=30)
    plain = stylize(vgg, content, [style], params)
    monkeypatch.setattr(vgg_mod, "RGB_PAD_DEVICES", ("cpu",))
    padded = stylize(vgg, content, [style], params)
    assert padded.image.shape == plain.image.shape
    assert padded.loss == pytest.approx(plain.loss, rel=1e-3)


def test_a_gpu_runs_every_step_in_float16_and_a_cpu_finishes_bf16_in_float32():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert compute_dtype(cuda, Params()) == torch.float16
    assert step_dtypes(cuda, Params()) == (torch.float16,)
    assert [step_dtype(torch.float16, n) for n in (1, optimize_mod.LOWP_STEPS + 1, 10**6)] == [torch.float16] * 3
    assert [step_dtype(torch.bfloat16, n) for n in (optimize_mod.LOWP_STEPS, optimize_mod.LOWP_STEPS + 1)] == [
        torch.bfloat16, torch.float32]
    assert step_dtypes(cuda, build_params({"preset": "seed"}, Limits())) == (torch.float32,)
    if BF16:
        assert step_dtypes(cpu, Params()) == (torch.bfloat16, torch.float32)


def _half_loss(objective, x, dtype):
    """sum(w * x^2) per image, with x^2 formed in `dtype`: a loss whose
    float16 backward overflows where w * x is past 65504 / 2."""
    return (objective * x.to(dtype).pow(2).float()).flatten(1).sum(1)


def test_loss_scaling_skips_an_overflowing_float16_step_and_shrinks_the_scale():
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])  # (B=2, n=2)
    w = torch.tensor([[1.0], [1e5]])  # row 1's gradient 2 * w * x overflows float16
    scale = scale_state(2, x.device)
    loss, grad, usable = gradient(_half_loss, w, x, torch.float16, scale)
    assert usable.tolist() == [True, False]
    assert torch.equal(grad[0], 2 * w[0] * x[0])  # the reference formula, exactly (powers of two)
    assert torch.equal(grad[1], torch.zeros(2))  # not used, and finite
    assert scale[0].tolist() == [1.0, 1 / optimize_mod.GRAD_SCALE_BACKOFF] and scale[1].tolist() == [1.0, 0.0]
    for _ in range(20):  # shrunk until the scaled gradient fits
        loss, grad, usable = gradient(_half_loss, w, x, torch.float16, scale)
        if usable[1]:
            break
    assert usable.all()
    assert torch.allclose(grad, 2 * w * x, rtol=1e-3)
    assert scale[0, 1] * 2 * 1e5 * 3.0 < 65504  # the scale that made it fit


def test_loss_scaling_grows_the_scale_after_a_run_of_usable_steps(monkeypatch):
    monkeypatch.setattr(optimize_mod, "GRAD_SCALE_GROWTH_STEPS", 3)
    x, w = torch.tensor([[0.25, 0.5]]), torch.tensor([[1.0]])
    scale = scale_state(1, x.device)
    factors = []
    for _ in range(7):
        gradient(_half_loss, w, x, torch.float16, scale)
        factors.append(scale[0, 0].item())
    assert factors == [1.0, 1.0, 2.0, 2.0, 2.0, 4.0, 4.0]
    _, grad, usable = gradient(_half_loss, w, x, torch.float32, scale)  # other dtypes: plain, scale untouched
    assert usable is None and scale[0, 0].item() == 4.0 and torch.equal(grad, 2 * w * x)


def test_float16_steps_survive_gradients_past_float16s_range(vgg, monkeypatch):
    """At style_weight 1e12 the float16 backward overflows at once: with the
    scale pinned at 1 every step is skipped and the image never moves (plain
    float16 steps would turn it to NaN); with loss scaling it ends near
    float32's loss, a few skipped steps behind."""
    gen = torch.Generator().manual_seed(5)
    content, style = torch.rand(1, 3, 32, 32, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    params = dataclasses.replace(Params(), steps=30, style_weight=1e12)
    monkeypatch.setattr(optimize_mod, "compute_dtype", lambda device, p: torch.float32)
    exact = stylize(vgg, content, [style], params).loss
    monkeypatch.setattr(optimize_mod, "compute_dtype", lambda device, p: torch.float16)
    result = stylize(vgg, content, [style], params)
    scaled = result.loss
    assert scaled < 1.5 * exact
    assert 1 <= result.skipped_steps <= 10  # the scale found its range within a few steps
    monkeypatch.setattr(optimize_mod, "GRAD_SCALE_MAX", 1.0)
    monkeypatch.setattr(optimize_mod, "GRAD_SCALE_MIN", 1.0)  # the scale pinned at 1: no loss scaling
    pinned = stylize(vgg, content, [style], dataclasses.replace(params, steps=4))
    assert pinned.loss == pytest.approx(pinned.history[0].loss, rel=1e-3)  # the content's loss, still
    assert pinned.loss > 10 * scaled
    assert pinned.skipped_steps == 4  # every one, and each reported


def test_steps_that_never_overflow_report_none_skipped(vgg):
    gen = torch.Generator().manual_seed(6)
    content, style = torch.rand(1, 3, 32, 32, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    for optimizer in ("lbfgs", "adam"):
        result = stylize(vgg, content, [style], dataclasses.replace(Params(), steps=3, optimizer=optimizer))
        assert result.skipped_steps == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: float16 steps in CUDA graphs")
def test_loss_scaling_inside_cuda_graphs_survives_an_overflow(vgg_state, monkeypatch):
    """A GPU's default steps (float16, captured and replayed) at style_weight
    1e12: the overflowing steps are skipped and reported, the scale settles
    on the device, and the image ends near float32's."""
    from nst.vgg import VGGFeatures

    vgg = VGGFeatures(vgg_state).to("cuda")
    gen = torch.Generator().manual_seed(5)
    content, style = (torch.rand(1, 3, 48, 64, generator=gen).cuda() for _ in range(2))
    params = dataclasses.replace(Params(), steps=40, style_weight=1e12)
    assert compute_dtype(vgg.mean.device, params) == torch.float16
    result = stylize(vgg, content, [style], params, progress_every=10)
    monkeypatch.setattr(optimize_mod, "LOWP_DTYPE", {})
    exact = stylize(vgg, content, [style], params, progress_every=10)
    print(f"float16 at style_weight 1e12: loss {result.loss:.4g} (float32 {exact.loss:.4g}), "
          f"{result.skipped_steps} steps skipped")
    assert 1 <= result.skipped_steps <= 10 and exact.skipped_steps == 0
    assert result.loss < 1.5 * exact.loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: float16 Adam steps in CUDA graphs")
def test_adam_float16_steps_in_a_cuda_graph_coast_over_an_overflow_as_eager_ones_do(vgg_state, monkeypatch):
    """optimizer=adam on a GPU (ADAM_CUDA_GRAPHS): float16 steps, captured
    and replayed, at style_weight 1e12. The overflowing steps are skipped and
    reported inside the graph as outside it, and the image improves without
    turning to NaN, near the eager steps' loss."""
    from nst.vgg import VGGFeatures

    vgg = VGGFeatures(vgg_state).to("cuda")
    gen = torch.Generator().manual_seed(8)
    content, style = (torch.rand(1, 3, 48, 64, generator=gen).cuda() for _ in range(2))
    params = dataclasses.replace(Params(), steps=30, optimizer="adam", lr=FAST_ADAM_LR, style_weight=1e12)
    assert compute_dtype(vgg.mean.device, params) == torch.float16
    runs = {}
    for graphs in (False, True):
        monkeypatch.setattr(optimize_mod, "ADAM_CUDA_GRAPHS", graphs)
        runs[graphs] = stylize(vgg, content, [style], params, progress_every=10)
    eager, graphed = runs[False], runs[True]
    # the same steps overflow, up to one at the edge of float16's range (replayed kernels round apart)
    assert 1 <= graphed.skipped_steps <= 10 and abs(graphed.skipped_steps - eager.skipped_steps) <= 1
    assert torch.isfinite(graphed.image).all() and graphed.loss < 0.9 * graphed.history[0].loss
    assert graphed.loss == pytest.approx(eager.loss, rel=0.1)


def test_adam_with_float16_steps_coasts_over_an_overflow(vgg, monkeypatch):
    """optimizer=adam gets the same loss scaling: the overflowing steps are
    skipped (zero gradient: Adam moves on its moments) and reported, and the
    image still improves instead of turning to NaN."""
    monkeypatch.setattr(optimize_mod, "compute_dtype", lambda device, p: torch.float16)
    gen = torch.Generator().manual_seed(7)
    content, style = torch.rand(1, 3, 32, 32, generator=gen), torch.rand(1, 3, 32, 32, generator=gen)
    result = stylize(vgg, content, [style], dataclasses.replace(Params(), steps=12, optimizer="adam",
                                                                lr=FAST_ADAM_LR, style_weight=1e12))
    assert 1 <= result.skipped_steps <= 10
    assert torch.isfinite(result.image).all()
    assert result.loss < 0.9 * result.history[0].loss
