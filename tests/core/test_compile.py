"""The compiled loss (torch.compile on a GPU): compiled only by the warm-up,
never by a request, and the same numbers as the uncompiled one.

On the CPU the policy is tested with torch.compile's "eager" backend (dynamo's
guards and stances are the same, compiling takes no time); the GPU tests use
the real compiler."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import torch._inductor.config
from torch._dynamo.utils import counters

import nst.optimize as optimize_mod
from nst.config import Params
from nst.losses import make_objective
from nst.optimize import loss_function, pixels_loss, stylize, warm_up
from nst.vgg import VGGFeatures

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the compiled loss runs there")


@pytest.fixture
def fresh_compile(monkeypatch):
    """A process-wide compile cache of its own, torch.compile's state reset around the test."""
    torch._dynamo.reset()
    monkeypatch.setattr(optimize_mod, "_COMPILED", {})
    monkeypatch.setattr(optimize_mod, "COMPILE", True)
    yield
    torch._dynamo.reset()


@pytest.fixture
def eager_backend_on_cpu(monkeypatch, fresh_compile):
    """Compile on the CPU with the 'eager' backend: dynamo traces and guards as
    for the GPU, without inductor's code generation."""
    real = torch.compile
    monkeypatch.setattr(optimize_mod, "use_compile", lambda device: True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", **kw))


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def images(h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=gen), torch.rand(1, 3, h, w, generator=gen)


def test_requests_never_compile_only_the_warm_up_does(vgg, eager_backend_on_cpu):
    params = dataclasses.replace(Params(), steps=3)
    content, style = images(32, 48, 0)
    before = graphs_compiled()  # the counter is process-wide: earlier tests compiled too
    stylize(vgg, content, [style], params)
    assert graphs_compiled() == before  # a request before any warm-up runs uncompiled

    warm_up(vgg, [(48, 32)])
    warmed = graphs_compiled()
    assert warmed > before
    # Other images, other weights, the same shape: the warmed code serves them
    # (every number a request sets is a tensor input, not a constant baked in).
    other = dataclasses.replace(params, style_weight=3e5, content_weight=2.0,
                                style_layer_weights={"conv1_1": 0.5, "conv2_1": 1, "conv3_1": 1,
                                                     "conv4_1": 1, "conv5_1": 1})
    c2, s2 = images(32, 48, 1)
    stylize(vgg, c2, [s2], other)
    # A shape nobody warmed runs uncompiled rather than compiling on the request's time.
    c3, s3 = images(40, 56, 2)
    result = stylize(vgg, c3, [s3], params)
    assert graphs_compiled() == warmed
    assert result.image.shape == (1, 3, 40, 56)


def test_a_compiler_that_fails_on_the_update_leaves_it_uncompiled_and_the_worker_starts(vgg, fresh_compile,
                                                                                       monkeypatch, caplog):
    """LBFGS_COMPILE_OPTIONS were never compiled on every torch and card: where
    the compiler fails on the update (here a backend that raises, for the
    compile that carries options), the warm-up logs it and goes on, and the
    steps run the update uncompiled, the loss still compiled."""
    real = torch.compile

    def failing(gm, example_inputs):
        raise RuntimeError("this compiler cannot do it")

    def compile_(fn, **kw):
        options = kw.pop("options", None)
        return real(fn, backend=failing if options else "eager", **kw)

    monkeypatch.setattr(optimize_mod, "use_compile", lambda device: True)
    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(optimize_mod, "_UPDATE_EAGER", set())
    monkeypatch.setattr(optimize_mod, "LBFGS_COMPILE", True)
    with caplog.at_level("ERROR", logger="nst.optimize"):
        warm_up(vgg, [(48, 32)])
    assert "compiling the L-BFGS update failed" in caplog.text
    assert optimize_mod._UPDATE_EAGER == {"cpu"} and optimize_mod.lbfgs_update not in optimize_mod._COMPILED
    assert pixels_loss in optimize_mod._COMPILED  # the loss is compiled still
    content, style = images(32, 48, 3)
    result = stylize(vgg, content, [style], dataclasses.replace(Params(), steps=3))
    assert result.steps == 3 and torch.isfinite(result.image).all()


def test_a_warm_up_with_the_seed_presets_params_compiles_the_recipes_loss(vgg, eager_backend_on_cpu,
                                                                          monkeypatch):
    """preset=seed optimizes normalized values (the recipe's loss, another
    function than the fast preset's): warmed with its params, every step of
    a seed request of that shape runs the compiled code (its guards pass:
    "fail_on_recompile" would raise), compiles nothing more and takes the
    uncompiled steps."""
    from nst.config import SEED_PRESET
    from nst.optimize import input_loss

    seed = dataclasses.replace(Params(), preset="seed", **{**SEED_PRESET, "steps": 4})
    content, style = images(32, 48, 8)
    plain = stylize(vgg, content, [style], seed)  # nothing compiled yet: runs uncompiled
    warm_up(vgg, [(48, 32)], params=seed)
    compiled, calls = optimize_mod._COMPILED[input_loss], []

    def strict(*args, **kwargs):
        calls.append(1)
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled(*args, **kwargs)

    monkeypatch.setitem(optimize_mod._COMPILED, input_loss, strict)
    warmed = graphs_compiled()
    again = stylize(vgg, content, [style], seed)
    assert len(calls) == seed.steps
    assert graphs_compiled() == warmed
    torch.testing.assert_close(again.image, plain.image, rtol=0, atol=0)


def test_warmed_code_serves_other_images_and_weights_of_the_same_shape(vgg, eager_backend_on_cpu):
    """With "fail_on_recompile", calling the compiled function raises unless a
    warmed program's guards accept the call: other images and weights of the
    warmed shape are accepted, another shape is not."""
    warm_up(vgg, [(48, 32)])
    compiled = optimize_mod._COMPILED[pixels_loss]

    def call(h, w, seed, **weights):
        content, style = images(h, w, seed)
        p = dataclasses.replace(Params(), **weights)
        objective = make_objective(vgg, vgg.normalize(content), [vgg.normalize(style)],
                                   style_layer_weights=p.style_layer_weights, content_weight=p.content_weight,
                                   style_weight=p.style_weight)
        with torch.compiler.set_stance("fail_on_recompile"):
            x = content.clone().requires_grad_(True)  # as in a request: the optimized variable
            return compiled(objective, x, torch.float32), pixels_loss(objective, x, torch.float32)

    a, b = call(32, 48, 3, style_weight=2e5, content_weight=3.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    with pytest.raises(RuntimeError, match="recompile"):
        call(40, 48, 3)


@pytest.mark.parametrize("lowp", ["bfloat16", "float16"])
def test_compiled_lbfgs_update_is_the_eager_one_and_serves_every_program_of_its_shape(vgg, monkeypatch, lowp,
                                                                                       fresh_compile):
    """LBFGS_COMPILE, traced here with AOTAutograd's functionalization (the
    "aot_eager" backend: the in-place state updates go through the same
    rewriting as under inductor): the warm-up compiles the update; every step
    of a request (a new program: new states, new image) then runs the
    compiled code, compiles nothing and takes the very same steps as the
    eager update; another shape does not pass its guards. float16 steps (the
    GPU's, forced on the CPU) compile the unscaling with it."""
    real = torch.compile
    monkeypatch.setattr(optimize_mod, "use_compile", lambda device: True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(optimize_mod, "LOWP_DTYPE", {"cpu": lowp})
    monkeypatch.setattr(optimize_mod, "LOWP_STEPS", 3)  # bf16 steps, then float32 ones
    params = dataclasses.replace(Params(), steps=6)
    content, style = images(32, 48, 6)
    eager = stylize(vgg, content, [style], params)
    monkeypatch.setattr(optimize_mod, "LBFGS_COMPILE", True)
    warm_up(vgg, [(48, 32)])
    warmed = graphs_compiled()
    update, calls = optimize_mod._COMPILED[optimize_mod.lbfgs_update], []

    def strict(*args, **kwargs):  # raises where the request's call would not run the warmed code
        calls.append(1)
        with torch.compiler.set_stance("fail_on_recompile"):
            return update(*args, **kwargs)

    monkeypatch.setitem(optimize_mod._COMPILED, optimize_mod.lbfgs_update, strict)
    compiled = stylize(vgg, content, [style], params)
    assert len(calls) == params.steps
    assert graphs_compiled() == warmed
    torch.testing.assert_close(compiled.image, eager.image, rtol=0, atol=0)
    assert compiled.loss == eager.loss

    def call(h, w):
        from nst import lbfgs

        n = 3 * h * w
        x, grad = torch.rand(1, 3, h, w), torch.randn(1, 3, h, w)
        state = lbfgs.init_state(1, n, lbfgs.history_pairs(h * w, "cpu"), x.device)
        scale = optimize_mod.scale_state(1, x.device)
        counter, last, loss_buf = torch.zeros((), dtype=torch.long), torch.full((1,), 5), torch.zeros(1)
        with torch.compiler.set_stance("fail_on_recompile"):
            update(x, grad, torch.ones(1), scale, counter, last, loss_buf, (lbfgs.tensors(state),), [slice(0, 1)],
                   half=lowp == "float16", lr=params.lr, max_move=optimize_mod.LBFGS_MAX_MOVE, bounded=True)
        return counter.item()

    assert call(32, 48) == 1
    with pytest.raises(RuntimeError, match="recompile"):
        call(40, 48)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code generation needs a C++ compiler")
@pytest.mark.parametrize("half, history", [(False, "float32"), (True, "float32"), (False, "bfloat16")],
                         ids=["plain", "float16_unscaling", "bf16_history"])
def test_lbfgs_update_compiled_by_inductor_takes_the_eager_steps(half, history, fresh_compile, monkeypatch):
    """The real compiler (inductor, here its CPU code generation): eight
    updates of a small state, compiled and eager, agree to float32 rounding
    in the image and in every state tensor (to bf16's in a bf16 history:
    LBFGS_HISTORY_DTYPE). (A first version that wrote the image inside the
    compiled function left the new image in x_prev too.)"""
    from nst import lbfgs

    monkeypatch.setattr(lbfgs, "LBFGS_HISTORY_DTYPE", {"cpu": history, "cuda": history})

    h, w, n = 8, 8, 3 * 8 * 8
    compiled = optimize_mod._compiled(optimize_mod.lbfgs_update, True, optimize_mod.LBFGS_COMPILE_OPTIONS)

    def run(update):
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(1, 3, h, w, generator=gen)
        state = lbfgs.init_state(1, n, 5, x.device)
        scale = optimize_mod.scale_state(1, x.device)
        counter, last, loss_buf = torch.zeros((), dtype=torch.long), torch.full((1,), 100), torch.zeros(1)
        for k in range(8):
            grad = torch.randn(1, 3, h, w, generator=gen) + 3 * (x - 0.5)  # a bowl, with noise
            if half and k == 3:
                grad[0, 0, 0, 0] = float("inf")  # an overflowed float16 step: skipped
            x.copy_(update(x, grad, torch.full((1,), float(k)), scale, counter, last, loss_buf,
                           (lbfgs.tensors(state),), [slice(0, 1)], half=half, lr=1.0,
                           max_move=optimize_mod.LBFGS_MAX_MOVE, bounded=True))
        return x, lbfgs.tensors(state), scale, counter

    eager = run(optimize_mod.lbfgs_update)
    # compiled as the engine compiles it: with LBFGS_COMPILE_OPTIONS, whose
    # emulate_precision_casts also keeps the CPU's stand-in for the GPU's
    # bf16 matmul (float32 vectors rounded to bf16 and back) rounding
    fused = run(compiled)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(fused[1], eager[1]):
        tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-4  # one float32 ulp apart can round a bf16 ulp apart
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(fused[2], eager[2])
    assert fused[3].item() == eager[3].item() == 8
    if half:
        assert eager[2][2].item() == 1  # the overflowed step was counted as skipped


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code generation needs a C++ compiler")
def test_compiled_bf16_history_tests_the_pair_as_stored(fresh_compile, monkeypatch):
    """The curvature test of a bf16 history reads s and y rounded to bf16, as
    they will be stored (nst.lbfgs.update_history). Inductor drops a cast to
    bf16 and straight back unless told to emulate it (LBFGS_COMPILE_OPTIONS):
    compiled without, every one of 200 near-orthogonal pairs took a slot
    (105 eager) and gamma came from the unrounded pair. Compiled as the engine
    compiles, the history is the eager one, slot for slot."""
    from nst import lbfgs

    monkeypatch.setattr(lbfgs, "LBFGS_HISTORY_DTYPE", {"cpu": "bfloat16", "cuda": "bfloat16"})
    compiled = optimize_mod._compiled(lbfgs.update_history, True, optimize_mod.LBFGS_COMPILE_OPTIONS)

    def run(update):
        gen = torch.Generator().manual_seed(3)
        n, m = 4096, 4
        state = lbfgs.init_state(1, n, m, torch.device("cpu"))
        state.started.fill_(True)
        x, g, slots, gammas = torch.zeros(1, n), torch.zeros(1, n), [], []
        for _ in range(60):
            s = torch.randn(1, n, generator=gen)
            y = torch.randn(1, n, generator=gen)
            y = y - (s * y).sum() / (s * s).sum() * s + 1e-6 * s  # cos(s, y) about 1e-6, s.y > 0
            state.x_prev.copy_(x)
            state.g_prev.copy_(g)
            x, g = x + s, g + y
            update(state, x, g)
            slots.append(int(state.slot))
            gammas.append(float(state.gamma[0]))
        return slots, gammas

    eager_slots, eager_gammas = run(lbfgs.update_history)
    slots, gammas = run(compiled)
    kept = sum(a != b for a, b in zip([0] + eager_slots, eager_slots))  # the slot moves on for a kept pair
    assert 0 < kept < len(eager_slots)  # both cases arose
    assert slots == eager_slots
    assert gammas == pytest.approx(eager_gammas, rel=1e-3)


def _off_then_on(vgg_state, monkeypatch, seed, module, name, off, on):
    """60 steps at 64x48 on a GPU, in a shape the worker warmed: with
    `module.name` set to `off`, then to `on`, each warmed as a worker with
    that setting would be (each run sets its own value: the shipped one may
    be either). The second request compiles nothing. -> (the objective's
    ingredients (vgg, content, style), the result with `off`, with `on`)."""
    device = torch.device("cuda")
    vgg = VGGFeatures(vgg_state).to(device)
    content, style = (t.to(device) for t in images(48, 64, seed))
    params = dataclasses.replace(Params(), steps=60)
    monkeypatch.setattr(module, name, off)
    warm_up(vgg, [(64, 48)])
    before = stylize(vgg, content, [style], params)
    optimize_mod.drop_programs()
    monkeypatch.setattr(module, name, on)
    warm_up(vgg, [(64, 48)])
    warmed = graphs_compiled()
    after = stylize(vgg, content, [style], params)
    assert graphs_compiled() == warmed
    return (vgg, content, style), before, after


@GPU
def test_compiled_lbfgs_update_on_the_gpu_takes_the_eager_steps(vgg_state, fresh_compile, monkeypatch):
    """Real inductor, inside the CUDA graphs: a request after the warm-up
    compiles nothing and reaches the eager update's loss (fused kernels
    round otherwise, which the steps amplify: the losses compare)."""
    _, eager, compiled = _off_then_on(vgg_state, monkeypatch, 7, optimize_mod, "LBFGS_COMPILE", False, True)
    assert optimize_mod.lbfgs_update in optimize_mod._COMPILED
    print(f"compiled L-BFGS update vs eager at 64x48, 60 steps: loss {compiled.loss:.4g} vs {eager.loss:.4g}")
    assert compiled.loss == pytest.approx(eager.loss, rel=0.2)


@GPU
def test_compiled_loss_and_gradient_match_the_uncompiled_ones(vgg_state, fresh_compile):
    device = torch.device("cuda")
    vgg = VGGFeatures(vgg_state).to(device)
    warm_up(vgg, [(64, 48)])
    content, style = (t.to(device) for t in images(48, 64, 4))
    p = Params()
    objective = make_objective(vgg, vgg.normalize(content), [vgg.normalize(style)],
                               style_layer_weights=p.style_layer_weights, content_weight=1.0, style_weight=1e6)
    compiled = loss_function(False, device)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        x = (content + 0.05 * torch.randn_like(content)).requires_grad_(True)
        a = compiled(objective, x, dtype).sum()  # a batch of one
        (ga,) = torch.autograd.grad(a, x)
        b = pixels_loss(objective, x, dtype).sum()
        (gb,) = torch.autograd.grad(b, x)
        assert a.item() == pytest.approx(b.item(), rel=tol), dtype
        cosine = torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0).item()
        assert cosine > 1 - tol, (dtype, cosine)


@GPU
def test_the_lowp_gram_compiled_on_the_gpu_takes_the_float32_grams_steps(vgg_state, fresh_compile, monkeypatch):
    """GRAM_LOWP_DEVICES through inductor (its float32-accumulating bmm) inside the
    CUDA graphs: a request after its warm-up compiles nothing and ends at
    the float32 Grams' loss, and the compiled float16 loss and gradient
    match the uncompiled float32 Grams'."""
    from nst import losses

    (vgg, content, style), plain, lowp = _off_then_on(vgg_state, monkeypatch, 9, losses, "GRAM_LOWP_DEVICES",
                                                      (), ("cuda",))
    print(f"float16 Grams vs float32 Grams at 64x48, 60 steps: loss {lowp.loss:.4g} vs {plain.loss:.4g}")
    assert lowp.loss == pytest.approx(plain.loss, rel=0.2)
    p = Params()
    objective = make_objective(vgg, vgg.normalize(content), [vgg.normalize(style)],
                               style_layer_weights=p.style_layer_weights, content_weight=1.0, style_weight=1e6)
    x = (content + 0.05 * torch.randn_like(content)).requires_grad_(True)
    b = loss_function(False, content.device)(objective, x, torch.float16).sum()
    (gb,) = torch.autograd.grad(b, x)
    monkeypatch.setattr(losses, "GRAM_LOWP_DEVICES", ())
    a = pixels_loss(objective, x, torch.float16).sum()
    (ga,) = torch.autograd.grad(a, x)
    assert b.item() == pytest.approx(a.item(), rel=1e-2)
    assert torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0).item() > 0.999


@GPU
def test_the_rgb_padded_compiled_on_the_gpu_takes_the_unpadded_steps(vgg_state, fresh_compile, monkeypatch):
    """RGB_PAD_DEVICES through inductor and cuDNN's 8-channel conv1_1 inside
    the CUDA graphs: a request after its warm-up compiles nothing and ends at
    the unpadded steps' loss."""
    from nst import vgg as vgg_mod

    _, plain, padded = _off_then_on(vgg_state, monkeypatch, 10, vgg_mod, "RGB_PAD_DEVICES", (), ("cuda",))
    print(f"RGB padded to 8 channels vs 3 at 64x48, 60 steps: loss {padded.loss:.4g} vs {plain.loss:.4g}")
    assert padded.loss == pytest.approx(plain.loss, rel=0.2)


@GPU
def test_a_warmed_shape_runs_fused_kernels_and_a_cold_one_does_not(vgg_state, fresh_compile, monkeypatch):
    """The compiled program's kernels are Triton's; a shape nobody warmed runs
    cuDNN/ATen kernels only, and nothing is compiled for it."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    vgg = VGGFeatures(vgg_state).to(device)
    warm_up(vgg, [(64, 48)])
    warmed = graphs_compiled()
    monkeypatch.setattr(optimize_mod, "CUDA_GRAPHS", False)  # kernels visible to the profiler one by one

    def kernels(h, w):
        content, style = (t.to(device) for t in images(h, w, 5))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            stylize(vgg, content, [style], dataclasses.replace(Params(), steps=2))
            torch.cuda.synchronize()
        return [e.key for e in prof.key_averages()]

    assert any("triton" in k for k in kernels(48, 64))
    assert not any("triton" in k for k in kernels(56, 72))
    assert graphs_compiled() == warmed


def test_one_warmed_program_serves_every_batch_of_2_or_more_rows(vgg, eager_backend_on_cpu, monkeypatch):
    """A worker with TorchServe batching on warms each size for one row and
    for batches: the batch dimension is dynamic, so batches of any size find
    compiled code, and a size nobody warmed still does not."""
    import nst.losses
    from nst.losses import stack

    # Evaluate the batch whole, as on a GPU (on the CPU the objective loops
    # over the rows, which fixes the batch size in the traced program).
    monkeypatch.setattr(nst.losses, "ROW_BY_ROW_DEVICES", ())

    warm_up(vgg, [(48, 32)], max_batch=4)
    compiled = optimize_mod._COMPILED[pixels_loss]
    p = Params()

    def call(rows, h=32, w=48):
        pairs = [images(h, w, 10 + r) for r in range(rows)]
        objective = stack([make_objective(vgg, vgg.normalize(c), [vgg.normalize(s)],
                                          style_layer_weights=p.style_layer_weights, content_weight=1.0 + r,
                                          style_weight=1e6) for r, (c, s) in enumerate(pairs)])
        x = torch.cat([c for c, _ in pairs]).requires_grad_(True)
        with torch.compiler.set_stance("fail_on_recompile"):
            return compiled(objective, x, torch.float32), pixels_loss(objective, x, torch.float32)

    for rows in (1, 2, 3, 4, 6):
        a, b = call(rows)
        assert a.shape == (rows,)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="recompile"):
        call(3, h=40)  # a size nobody warmed


@GPU
def test_a_batch_runs_the_warmed_batch_program_on_the_gpu(vgg_state, fresh_compile, monkeypatch):
    """Real inductor: a worker warmed with max_batch=4 serves a batch of three
    rows compiled, with nothing compiled on the request's path, each row as
    good as uncompiled (fused kernels round otherwise, and at 64x48 the steps
    amplify that to about 2/255 of pixel difference: the losses compare)."""
    from nst.optimize import Row, stylize_batch

    device = torch.device("cuda")
    monkeypatch.setattr(optimize_mod, "BATCH_MIN_PIXELS", {})  # a GPU shares nothing by default
    vgg = VGGFeatures(vgg_state).to(device)
    warm_up(vgg, [(64, 48)], max_batch=4)
    warmed = graphs_compiled()
    rows = []
    for i in range(3):
        content, style = (t.to(device) for t in images(48, 64, 20 + i))
        rows.append(Row(content, [style], dataclasses.replace(Params(), steps=30 + 5 * i)))
    compiled = stylize_batch(vgg, rows)
    assert graphs_compiled() == warmed > 0
    optimize_mod.COMPILE = False  # fresh_compile restores it
    plain = stylize_batch(vgg, rows)
    for a, b in zip(compiled, plain):
        diff = (a.image - b.image).abs().mean().item()
        print(f"compiled vs uncompiled batch row: {diff * 255:.3f}/255, loss {a.loss:.4g} vs {b.loss:.4g}")
        # float16 steps (a GPU's default) round more: on an H100, 7.33 against 6.62
        assert a.loss == pytest.approx(b.loss, rel=0.2)
        assert diff <= 5 / 255


def test_no_batch_program_where_rows_never_share(vgg, eager_backend_on_cpu, monkeypatch):
    """A worker whose device shares no optimization (nst.config.BATCH_MIN_PIXELS
    None, as on a GPU) compiles for one row only, whatever its batchSize."""
    monkeypatch.setattr(optimize_mod, "BATCH_MIN_PIXELS", {"cpu": None})
    before = graphs_compiled()
    warm_up(vgg, [(48, 32)], max_batch=4)
    one_row = graphs_compiled() - before
    torch._dynamo.reset()
    optimize_mod._COMPILED.clear()
    monkeypatch.setattr(optimize_mod, "BATCH_MIN_PIXELS", {})
    before = graphs_compiled()
    warm_up(vgg, [(48, 32)], max_batch=4)
    assert graphs_compiled() - before > one_row > 0


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code generation needs a C++ compiler")
@pytest.mark.parametrize("setting", ["GRAM_LOWP_DEVICES", "GRAM_ONE_PRODUCT_DEVICES"])
def test_the_gram_functions_compile_whole_and_give_the_eager_loss_and_gradient(fresh_compile, monkeypatch, setting):
    """The Grams' autograd Functions (GRAM_LOWP_DEVICES's, and
    GRAM_ONE_PRODUCT_DEVICES's on float16 features' float32 copy) traced by
    dynamo in one graph (fullgraph: no break around them, so the compiled
    loss keeps its fused kernels on both sides) and compiled by inductor (its
    CPU code generation here; a GPU's float32-accumulating bmm is the GPU
    test's): the eager style loss and gradient, to float16 rounding."""
    from nst import losses

    monkeypatch.setattr(losses, "GRAM_LOWP_DEVICES", ("cpu",) if setting == "GRAM_LOWP_DEVICES" else ())
    monkeypatch.setattr(losses, "GRAM_ONE_PRODUCT_DEVICES", ("cpu",))
    monkeypatch.setattr(losses, "GRAM_ONE_PRODUCT_MIN_PIXELS", 1)  # these 6x5 features too
    gen = torch.Generator().manual_seed(3)
    f = (torch.randn(1, 8, 6, 5, generator=gen).relu() * 3).half().contiguous(memory_format=torch.channels_last)
    target = losses.gram((torch.randn(1, 8, 6, 5, generator=gen).relu() * 3).half())
    function = "_LowpGram" if setting == "GRAM_LOWP_DEVICES" else "_Gram"
    assert type(losses.gram(f.clone().requires_grad_(True)).grad_fn).__name__ == function + "Backward"

    def loss_and_grad(fn):
        x = f.clone().requires_grad_(True)
        loss = fn(x, target).sum()
        (g,) = torch.autograd.grad(loss, x)
        return loss, g

    eager = loss_and_grad(losses.style_layer_loss)
    compiled = loss_and_grad(torch.compile(losses.style_layer_loss, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=0)
    torch.testing.assert_close(compiled[1].float(), eager[1].float(), rtol=2e-3,
                               atol=1e-3 * eager[1].abs().max().item())
