"""Kept optimizations (nst.config.KEEP_PROGRAMS): a later request of the same
shape runs in the tensors (and, on a GPU, the CUDA graphs) of an earlier one.
Each request must still get exactly its own answer, a failed request must
leave nothing half-loaded, and what is kept must never make admission
control refuse a request. On the CPU, where nothing is kept in production,
keeping is switched on here so the loading and resetting are tested bit for
bit; the GPU tests check the captured graphs themselves."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

import nst.optimize as optimize_mod
from nst import memory, pipeline
from nst.config import Limits, Params
from nst.errors import OutOfMemory
from nst.optimize import Diverged, drop_programs, stylize, warm_up

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA graphs")


def images(seed: int, h: int = 32, w: int = 40, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, h, w, generator=gen).to(device), torch.rand(1, 3, 36, 44, generator=gen).to(device))


def params(**kw) -> Params:
    return dataclasses.replace(Params(), **kw)


@pytest.fixture
def keeping(monkeypatch):
    """Keep up to 2 optimizations on the CPU; bf16 for the first 4 steps, so
    that short requests cross both dtypes' steps. Nothing kept before or after."""
    monkeypatch.setattr(optimize_mod, "KEEP_PROGRAMS", {"cpu": 2, "cuda": 2})
    monkeypatch.setattr(optimize_mod, "LOWP_STEPS", 4)
    drop_programs()
    yield optimize_mod._KEPT
    drop_programs()


def fresh(vgg, content, style, p: Params, **kw):
    """The same request with nothing kept before it, and nothing kept after."""
    saved = dict(optimize_mod._KEPT)
    optimize_mod._KEPT.clear()
    limit = optimize_mod.KEEP_PROGRAMS
    optimize_mod.KEEP_PROGRAMS = {}
    try:
        return stylize(vgg, content, [style], p, **kw)
    finally:
        optimize_mod.KEEP_PROGRAMS = limit
        optimize_mod._KEPT.update(saved)


def assert_same(a, b):
    assert torch.equal(a.image, b.image)
    assert a.loss == b.loss
    assert [(p.step, p.loss) for p in a.history] == [(p.step, p.loss) for p in b.history]


def test_each_request_of_a_kept_shape_gets_its_own_answer(vgg, keeping):
    """Other images, weights, steps, seeds and an init of noise, one after the
    other in one kept optimization: each bit for bit what it is alone."""
    requests = [
        (images(1), params(steps=9)),
        (images(2), params(steps=6, style_weight=3e5, content_weight=2.0, seed=4, init="noise")),
        (images(3), params(steps=11, style_layer_weights={"conv1_1": 0.5, "conv2_1": 2, "conv3_1": 1,
                                                          "conv4_1": 1, "conv5_1": 0.1}, preserve_color=True)),
        (images(1), params(steps=9)),  # the first again, after the others
    ]
    kept = None
    for (content, style), p in requests:
        got = stylize(vgg, content, [style], p, progress_every=2)
        assert len(keeping) == 1  # one shape and structure: one program, loaded anew each time
        program = next(iter(keeping.values()))
        assert kept is None or program is kept
        kept = program
        assert_same(got, fresh(vgg, content, style, p, progress_every=2))


def test_a_request_after_a_failed_one_gets_its_own_answer(vgg, keeping):
    """A row that diverged (NaN in its image, its targets and its L-BFGS
    history) and one whose consumer raised leave the kept optimization in
    their state: the next request starts from scratch all the same."""
    content, style = images(5)
    poisoned = content.clone()
    poisoned[..., 3, 3] = float("nan")
    with pytest.raises(Diverged):  # found at step 4: NaN pairs fill slots the next request masks, not overwrites
        stylize(vgg, poisoned, [style], params(steps=8), progress_every=4)
    with pytest.raises(RuntimeError, match="client went away"):
        stylize(vgg, content, [style], params(steps=8), callback=_raise_at(3))
    assert len(keeping) == 1  # both ended as a row's outcome, not an exception out of the loop: kept
    p = params(steps=7)
    assert_same(stylize(vgg, content, [style], p), fresh(vgg, content, style, p))


def _raise_at(step: int):
    def callback(progress):
        if progress.step == step:
            raise RuntimeError("client went away")
    return callback


def test_an_optimization_that_raised_is_not_kept(vgg, keeping, monkeypatch):
    """An exception out of the step loop (here in the optimizer's step, as
    an allocation failure would be) may leave a half-run step behind: that
    program is dropped, and the next request builds a new one."""
    from nst import lbfgs

    content, style = images(6)
    stylize(vgg, content, [style], params(steps=3))
    (before,) = keeping.values()
    real = lbfgs.step
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory in step 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(lbfgs, "step", failing)
    with pytest.raises(MemoryError):
        stylize(vgg, content, [style], params(steps=5))
    assert len(keeping) == 0
    monkeypatch.setattr(lbfgs, "step", real)
    p = params(steps=5)
    assert_same(stylize(vgg, content, [style], p), fresh(vgg, content, style, p))
    (after,) = keeping.values()
    assert after is not before


def test_the_least_recently_used_goes_first_and_memory_bounds_what_is_kept(vgg, keeping, monkeypatch):
    shapes = [(32, 40), (40, 32), (48, 32)]
    for h, w in shapes:
        content, style = images(0, h=h, w=w)
        stylize(vgg, content, [style], params(steps=2))
    assert [key[1][-2:] for key in keeping] == [(40, 32), (48, 32)]  # KEEP_PROGRAMS: 2
    charge = memory.estimate_bytes(32, 48, 0, params(), "cpu")
    assert optimize_mod.held_bytes() == charge + memory.estimate_bytes(40, 32, 0, params(), "cpu")
    # room for one program's charge only
    monkeypatch.setattr(optimize_mod, "KEEP_PROGRAMS_MEMORY", 1.5 * charge / memory.total_bytes(vgg.mean.device))
    content, style = images(0, h=32, w=40)
    stylize(vgg, content, [style], params(steps=2))
    assert [key[1][-2:] for key in keeping] == [(32, 40)]
    monkeypatch.setattr(optimize_mod, "KEEP_PROGRAMS", {})  # keeping off: nothing is added
    drop_programs()
    stylize(vgg, content, [style], params(steps=2))
    assert len(keeping) == 0


def test_kept_optimizations_never_make_a_request_refused(vgg, keeping):
    """Admission charges the kept programs their estimates (the device's free
    count takes their graphs' pool as free); where a request would not fit
    beside them they are dropped, and it is admitted on what is then free.
    A request of a kept program's own key is not charged for it."""
    def pil(h, w):
        return Image.new("RGB", (w, h), (120, 80, 40))

    content, style = images(0, h=64, w=64)
    stylize(vgg, content, [style], params(steps=2))
    kept = optimize_mod.held_bytes()
    small = memory.estimate_bytes(32, 32, 32 * 32, params(), "cpu")
    same = memory.estimate_bytes(64, 64, 64 * 64, params(), "cpu")
    mib = 2**20
    # fits beside the kept program: admitted, and the program stays
    roomy = Limits(memory_budget_mb=(kept + small) // mib + 2)
    assert pipeline.admit(pil(32, 32), [pil(32, 32)], params(), roomy, vgg) == small
    assert len(keeping) == 1
    # its own shape: not charged for its own program
    tight = Limits(memory_budget_mb=same // mib + 2)
    assert same + kept > tight.memory_budget_mb * mib
    assert pipeline.admit(pil(64, 64), [pil(64, 64)], params(), tight, vgg) == same
    assert len(keeping) == 1
    # fits only without the kept program: the program goes, the request is admitted
    squeezed = Limits(memory_budget_mb=small // mib + 2)
    assert small + kept > squeezed.memory_budget_mb * mib
    assert pipeline.admit(pil(32, 32), [pil(32, 32)], params(), squeezed, vgg) == small
    assert len(keeping) == 0
    # and one that does not fit even alone is still refused
    with pytest.raises(OutOfMemory, match="max_size"):
        pipeline.admit(pil(64, 64), [pil(64, 64)], params(), squeezed, vgg)


def test_only_images_up_to_the_pixel_bound_are_kept(vgg, keeping, monkeypatch):
    monkeypatch.setattr(optimize_mod, "KEEP_PROGRAMS_MAX_PIXELS", 32 * 40)
    for h, w in ((32, 40), (40, 48)):
        content, style = images(0, h=h, w=w)
        stylize(vgg, content, [style], params(steps=2))
    assert [key[1][-2:] for key in keeping] == [(32, 40)]


def test_a_request_that_builds_a_kept_optimization_is_charged_its_first_pool(vgg, keeping, monkeypatch):
    """While a new kept optimization captures its float32 steps, its bf16
    steps' graph pool stays held (nst.memory.shared_pool_bytes): admission
    adds it for a request that builds one, and only then (as on a GPU here)."""
    import types

    monkeypatch.setattr(optimize_mod, "use_cuda_graphs", lambda device: True)
    monkeypatch.setattr(optimize_mod, "compute_dtype", lambda device, p: torch.bfloat16)
    shape = (1, 3, 64, 64)
    pool = memory.shared_pool_bytes(64, 64)
    assert pool > 0
    assert optimize_mod.build_bytes(vgg, shape, params()) == pool
    assert optimize_mod.build_bytes(vgg, shape, params(optimizer="adam")) == 0
    monkeypatch.setattr(optimize_mod, "KEEP_PROGRAMS_MAX_PIXELS", 64 * 64 - 1)
    assert optimize_mod.build_bytes(vgg, shape, params()) == 0  # above the bound: built the old way, not kept
    monkeypatch.setattr(optimize_mod, "KEEP_PROGRAMS_MAX_PIXELS", 64 * 64)
    limits = Limits(memory_budget_mb=4096)
    image = Image.new("RGB", (64, 64), (120, 80, 40))
    alone = memory.estimate_bytes(64, 64, 64 * 64, params(), "cpu")
    assert pipeline.admit(image, [image], params(), limits, vgg) == alone + pool
    keeping[optimize_mod.program_key(vgg, shape, params())] = types.SimpleNamespace(held_bytes=0)  # now kept
    assert optimize_mod.build_bytes(vgg, shape, params()) == 0
    assert pipeline.admit(image, [image], params(), limits, vgg) == alone
    monkeypatch.setattr(optimize_mod, "compute_dtype", lambda device, p: torch.float32)
    keeping.clear()
    assert optimize_mod.build_bytes(vgg, shape, params()) == 0  # one dtype: one graph, nothing held beside it


def test_running_out_of_memory_drops_what_is_kept(vgg, keeping):
    content, style = images(0)
    stylize(vgg, content, [style], params(steps=2))
    assert len(keeping) == 1
    pipeline.free_memory(vgg.mean.device)
    assert len(keeping) == 0


@GPU
def test_warm_up_captures_graphs_that_serve_the_first_request(vgg_state, keeping, monkeypatch):
    """After warm_up, the first request of a warmed shape replays graphs
    captured at start: no eager step and no capture of its own, and the same
    answer as with nothing kept (to rounding: the kept run's first steps are
    replays, a fresh run's are eager)."""
    from nst.vgg import VGGFeatures

    vgg = VGGFeatures(vgg_state).to("cuda")
    monkeypatch.setattr(optimize_mod, "COMPILE", False)  # capturing is under test, not compiling (slow)
    warm_up(vgg, [(64, 48)])
    (program,) = keeping.values()
    assert set(program.runner.captured) == set(optimize_mod.step_dtypes(vgg.mean.device, params()))
    calls = dict(program.runner.calls)
    content, style = images(7, h=48, w=64, device="cuda")
    p = params(steps=12)
    got = stylize(vgg, content, [style], p)
    assert next(iter(keeping.values())) is program and program.runner.calls == calls
    alone = fresh(vgg, content, style, p)
    # to rounding: on an H100, 14.159 against 14.137 after 12 steps
    assert got.loss == pytest.approx(alone.loss, rel=1e-2)
    assert (got.image - alone.image).abs().mean() < 1 / 255
    content, style = images(8, h=48, w=64, device="cuda")  # and the next one
    again, alone = stylize(vgg, content, [style], p), fresh(vgg, content, style, p)
    assert again.loss == pytest.approx(alone.loss, rel=1e-2)
    assert (again.image - alone.image).abs().mean() < 1 / 255


def test_a_kept_float16_optimization_starts_each_request_at_the_initial_gradient_scale(vgg, keeping, monkeypatch):
    """float16 steps (a GPU's) keep a per-image gradient scale in the kept
    program: a request whose gradients overflowed (style_weight 1e12) leaves
    it shrunk, and the next request must start from GRAD_SCALE_INIT as it
    would alone, bit for bit."""
    monkeypatch.setattr(optimize_mod, "compute_dtype", lambda device, p: torch.float16)
    (content, style), loud = images(11, h=24, w=24), params(steps=6, style_weight=1e12)
    stylize(vgg, content, [style], loud)
    (program,) = keeping.values()
    assert program.scale[0].item() < optimize_mod.GRAD_SCALE_INIT  # the overflow shrank it
    (content, style), p = images(12, h=24, w=24), params(steps=6, style_weight=1e12)
    got = stylize(vgg, content, [style], p)
    assert next(iter(keeping.values())) is program
    assert_same(got, fresh(vgg, content, style, p))
