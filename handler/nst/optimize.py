"""The optimization loop: content + style tensors in, the delivered image out."""
from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import imageio, lbfgs, memory
from .config import (ADAM_CUDA_GRAPHS, BATCH_MIN_PIXELS, COARSE_FRACTION, COARSE_TO_FINE_FROM, COMPILE,
                     COMPILE_CACHE_SIZE, COMPILE_DYNAMIC, CUDA_GRAPHS, DEADLINE_SLACK, DEADLINE_SLACK_S,
                     GRAD_SCALE_BACKOFF, GRAD_SCALE_GROWTH_STEPS, GRAD_SCALE_INIT, GRAD_SCALE_MAX, GRAD_SCALE_MIN,
                     KEEP_PROGRAMS, KEEP_PROGRAMS_MAX_PIXELS, KEEP_PROGRAMS_MEMORY, LAST_STEP_OVERRUN_S,
                     LBFGS_COMPILE, LBFGS_COMPILE_OPTIONS, LBFGS_MAX_MOVE, LBFGS_ONE_STATE_DEVICES, LOWP_DTYPE,
                     LOWP_STEPS, Params)
from .losses import Objective, make_objective
from .losses import row as row_objective
from .losses import stack as stack_objectives
from .vgg import VGGFeatures, canonical_layer

log = logging.getLogger(__name__)


class BudgetExceeded(Exception):
    """The request's time budget ran out before the last step."""


class WouldExceedBudget(BudgetExceeded):
    """Stopped before its deadline, which the request could not meet: at the
    pace of its steps so far the steps left would end past it
    (DEADLINE_SLACK in config.py), or its next step would
    (LAST_STEP_OVERRUN_S; see `check_deadline`)."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Pace:
    """The progress record an optimization's steady pace is measured from:
    the first one after its steps took their current dtype (the stretch up to
    it holds that dtype's slow first step)."""

    dtype: torch.dtype
    step: int
    at: float  # time.monotonic() of the record


def pace_at(pace: Pace | None, dtype: torch.dtype, step: int, now: float) -> tuple[Pace, float | None]:
    """At a progress record after `step` (its steps of `dtype`) at `now`: the
    record to measure from next, and the seconds per step since `pace`, or
    None where this record becomes the one to measure from (the first, or the
    first since the dtype changed)."""
    if pace is None or pace.dtype != dtype:
        return Pace(dtype, step, now), None
    if step <= pace.step:
        return pace, None
    return pace, (now - pace.at) / (step - pace.step)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def check_deadline(deadline: float | None, step: int, steps: int, now: float,
                   per_step: float | None = None, shortest: float | None = None) -> None:
    """After `step` of `steps`, at `now`: raise BudgetExceeded where the
    deadline has passed with steps left. Raise WouldExceedBudget where the
    next step, taking at least `shortest` seconds (the request's shortest
    step so far), would end past the deadline with steps after it (they
    would be cut there), or, being the last, more than LAST_STEP_OVERRUN_S
    past it; and where at `per_step` seconds a step (`pace_at`) the steps
    left would end past the deadline by more than the slack
    (DEADLINE_SLACK, DEADLINE_SLACK_S)."""
    if deadline is None or step >= steps:
        return
    if now > deadline:
        raise BudgetExceeded(f"time budget ran out after {step} of {steps} steps")
    left = deadline - now
    if shortest is not None:
        last = step + 1 == steps
        if shortest > left + (LAST_STEP_OVERRUN_S if last else 0.0):
            raise WouldExceedBudget(
                f"stopped after {step} of {steps} steps: the {'last' if last else 'next'} step, at least "
                f"{_duration(shortest)}, would end past the deadline "
                + (f"by more than {LAST_STEP_OVERRUN_S:g} s" if last else f"({_duration(left)} away)"))
    if per_step is None:
        return
    need = per_step * (steps - step)
    if need > max(DEADLINE_SLACK * left, left + DEADLINE_SLACK_S):
        fit = int(left / per_step)
        raise WouldExceedBudget(
            f"stopped after {step} of {steps} steps: at {_duration(per_step)} per step the {steps - step} left "
            f"would take about {_duration(need)}, and {_duration(left)} is left (about {fit} more "
            f"step{'' if fit == 1 else 's'} would fit)")


@dataclass(frozen=True)
class Progress:
    step: int  # steps finished so far
    steps: int  # steps asked for
    loss: float  # loss of the image before this step's update
    elapsed_ms: float


@dataclass(frozen=True)
class Result:
    image: Tensor  # (1, 3, H, W) in [0, 1], on 8-bit levels: what is delivered
    loss: float  # the recipe's loss of `image` itself
    steps: int
    elapsed_ms: float
    history: list[Progress] = field(default_factory=list)
    # float16 steps skipped because their gradient overflowed (GRAD_SCALE_* in
    # config.py): counted in `steps`, but they left the image where it was
    skipped_steps: int = 0


Callback = Callable[[Progress], None]


def clamp_pixels(pixels: Tensor) -> Tensor:
    """Clamp to [0,1] with the gradient passing AT the bounds. torch.clamp's
    gradient is zero there, so a pixel exactly at 0 or 1 (saturated colours
    in the content, or a pixel the bounded L-BFGS put on a bound) would never
    move again: the default stalled on saturated primaries (issue #11)."""
    inside = (pixels >= 0) & (pixels <= 1)
    return torch.where(inside, pixels, pixels.clamp(0, 1))


def _as_delivered(pixels: Tensor, params: Params) -> Tensor:
    """What the client decodes of the 8-bit `pixels` in the requested format:
    the image the reported loss scores."""
    return imageio.as_delivered(pixels, params.format, params.quality)


def quantize(pixels: Tensor) -> Tensor:
    """Clamp to [0,1] and round to 8-bit levels, as the encoded PNG will be."""
    return torch.round(pixels.clamp(0, 1) * 255) / 255


def transfer_luminance(stylized: Tensor, content: Tensor) -> Tensor:
    """Stylized luminance with the content's chrominance (Gatys et al. 2016,
    'Preserving colour'), using the BT.601 YCbCr transform."""
    def to_ycc(rgb: Tensor) -> Tensor:
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        y = 0.299 * r + 0.587 * g + 0.114 * b
        return torch.stack([y, (b - y) * 0.564, (r - y) * 0.713], 1)

    y = to_ycc(stylized)[:, :1]
    cc = to_ycc(content)[:, 1:]
    cb, cr = cc[:, 0:1], cc[:, 1:2]
    r = y + 1.403 * cr
    b = y + 1.773 * cb
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return torch.cat([r, g, b], 1).clamp(0, 1)


def _initial_image(content: Tensor, params: Params) -> Tensor:
    if params.init == "content":
        return content.clone()
    gen = torch.Generator(device="cpu")
    # No seed: fresh entropy, without reseeding torch's global generator.
    gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return torch.rand(content.shape, generator=gen).to(content.device)


def _start(vgg: VGGFeatures, contents: Sequence[Tensor], params: Sequence[Params],
           init: Sequence[Tensor] | None) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The optimization variable's first value, (B, 3, H, W) for B images
    (`init`, pixels in [0,1], replaces their start images in space=pixels),
    and the map from the variable to pixels: the recipe's denormalization
    (unclamped: delivery rounds and clips), or the clamp the objective sees."""
    if params[0].normalized_space:
        return vgg.normalize(torch.cat([_initial_image(c, p) for c, p in zip(contents, params)])), vgg.denormalize
    starts = list(init) if init is not None else [_initial_image(c, p) for c, p in zip(contents, params)]
    return torch.cat(starts), lambda v: v.clamp(0, 1)


def compute_dtype(device: torch.device, params: Params) -> torch.dtype:
    """The low-precision dtype of the VGG passes in `space=pixels`
    (LOWP_DTYPE) where the hardware does it (Grams and losses stay float32:
    see losses.py). `space=normalized` stays float32 so it matches the recipe
    step for step."""
    name = LOWP_DTYPE.get(device.type)
    if params.normalized_space or name is None:
        return torch.float32
    if name == "float16":
        return torch.float16
    if LOWP_STEPS == 0:
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def step_dtype(lowp: torch.dtype, step: int) -> torch.dtype:
    """The dtype of step `step` (from 1) of an optimization whose low
    precision is `lowp`: bf16 gradients are good enough to get near the
    optimum and stall there, so bf16 steps end after LOWP_STEPS; float16
    runs throughout."""
    return lowp if lowp == torch.float16 or step <= LOWP_STEPS else torch.float32


def step_dtypes(device: torch.device, params: Params) -> tuple[torch.dtype, ...]:
    """Every dtype an optimization's steps use, in order."""
    lowp = compute_dtype(device, params)
    return (lowp,) if lowp in (torch.float16, torch.float32) else (lowp, torch.float32)


def gradient(loss_of: Callable, objective: Objective, x: Tensor, dtype: torch.dtype,
             scale: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Each image's loss (B,) and gradient (same shape as x) at `x`, and
    whether that gradient is usable (B,) bool, or None where it always is.

    float16 steps use loss scaling (GRAD_SCALE_* in config.py): the
    gradient is taken of the loss times `scale` (B,), so the float16
    gradients inside the backward pass stay in range, and divided by it in
    float32. `scale` (see `scale_state`) is updated in place, on the
    device: divided by GRAD_SCALE_BACKOFF after a non-finite gradient (which
    is then zeroed: not to be used, and counted as skipped), doubled after
    GRAD_SCALE_GROWTH_STEPS usable ones in a row. Other dtypes' gradients
    are plain."""
    loss, grad = scaled_gradient(loss_of, objective, x, dtype, scale)
    if dtype != torch.float16:
        return loss, grad, None
    grad, usable = unscale(grad, scale)
    return loss, grad, usable


def scaled_gradient(loss_of: Callable, objective: Objective, x: Tensor, dtype: torch.dtype,
                    scale: Tensor) -> tuple[Tensor, Tensor]:
    """`gradient`'s loss (B,) and backward pass: for float16 steps the
    gradient of the loss times the scale, still to go through `unscale`."""
    xv = x.detach().requires_grad_(True)
    loss = loss_of(objective, xv, dtype)  # (B,)
    if dtype != torch.float16:
        (grad,) = torch.autograd.grad(loss.sum(), xv)  # each image's own gradient: they do not interact
        return loss, grad
    (grad,) = torch.autograd.grad((loss * scale[0]).sum(), xv)
    return loss, grad


def unscale(grad: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """`gradient`'s second half for float16 steps: the scaled gradient divided
    by the scale, zeroed where it is not finite, and whether it is usable
    (B,) bool; the scale state is updated in place."""
    factor, streak, skipped = scale[0], scale[1], scale[2]  # (B,) each
    per_image = (-1,) + (1,) * (grad.dim() - 1)  # (B,) -> (B, 1, ...): broadcast over each image
    grad = grad / factor.view(per_image)
    usable = torch.isfinite(grad).flatten(1).all(1)  # (B,)
    grown = streak + 1 >= GRAD_SCALE_GROWTH_STEPS
    factor.copy_(torch.where(usable, torch.where(grown, factor * 2, factor), factor / GRAD_SCALE_BACKOFF)
                 .clamp(GRAD_SCALE_MIN, GRAD_SCALE_MAX))
    streak.copy_(torch.where(usable & ~grown, streak + 1, torch.zeros_like(streak)))
    skipped.add_((~usable).float())
    grad = torch.where(usable.view(per_image), grad, torch.zeros_like(grad))
    return grad, usable


def scale_state(batch: int, device: torch.device) -> Tensor:
    """(3, B) float32 for `gradient`: each image's gradient scale (row 0),
    its count of usable float16 steps since the scale last changed (row 1)
    and of steps skipped (row 2)."""
    state = torch.empty(3, batch, device=device)
    reset_scale(state)
    return state


def reset_scale(state: Tensor) -> None:
    state[0].fill_(GRAD_SCALE_INIT)
    state[1:].zero_()


def _skipped(scale: Tensor, steps: int) -> list[int]:
    """Each image's skipped float16 steps, read once the steps are done (and
    logged: they are steps the client asked for that left its image as it was)."""
    factors, _, skipped = scale.tolist()  # the one read of the scales
    counts = [int(c) for c in skipped]
    for b, c in enumerate(counts):
        if c:
            log.warning("image %d: %d of %d float16 steps skipped (gradient overflow; loss scaling shrank the "
                        "scale to %.3g)", b, c, steps, factors[b])
    return counts


def _finite_or_raise(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise Diverged(f"loss became {loss} at step {step}")


def shape_pixels(x: Tensor) -> int:
    return x.shape[-2] * x.shape[-1]


def use_cuda_graphs(device: torch.device) -> bool:
    return CUDA_GRAPHS and device.type == "cuda"


def use_compile(device: torch.device) -> bool:
    return COMPILE and device.type == "cuda"


def pixels_loss(objective: Objective, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The fast preset's loss of [0,1] pixels `x`: clamped, then normalized."""
    return objective(objective.vgg.normalize(clamp_pixels(x)), dtype).total


def input_loss(objective: Objective, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The recipe's loss: `x` already is VGG's normalized input."""
    return objective(x, dtype).total


# The loss functions (and the L-BFGS update) through torch.compile, keyed by
# the Python function: one each for the process's life, like the kept
# programs (_KEPT), since its compiled code is what warm-up paid for.
_COMPILED: dict = {}
# Device types whose worker could not compile the L-BFGS update at its
# warm-up: their steps run the update uncompiled (see warm_up).
_UPDATE_EAGER: set = set()


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch raises when a compiler (inductor, its code generation) fails;
    each where this torch has it."""
    found = []
    for module, name in (("torch._dynamo.exc", "BackendCompilerFailed"), ("torch._inductor.exc", "InductorError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_COMPILE_ERRORS = _compile_errors()


def loss_function(normalized_space: bool, device: torch.device, compile_new: bool = False) -> Callable:
    """The loss of the optimization variable. Compiled (on a GPU) once per
    process and function; `compile_new` lets torch.compile compile a shape or
    dtype it has not seen, which only the warm-up does: a request gets the
    compiled code where it exists and runs uncompiled otherwise."""
    fn = input_loss if normalized_space else pixels_loss
    if not use_compile(device):
        return fn
    return _compiled(fn, compile_new)


def _compiled(fn: Callable, compile_new: bool, options: Mapping[str, Any] | None = None) -> Callable:
    """`fn` through torch.compile (with inductor `options`), one compiled
    function per process; see `loss_function` for `compile_new`."""
    compiled = _COMPILED.get(fn)
    if compiled is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILE_CACHE_SIZE)
        options = options or {}
        known = {k: v for k, v in options.items() if hasattr(torch._inductor.config, k)}
        if len(known) < len(options):  # the pinned 2.14 has emulate_precision_casts; the GPU's 2.11 is unchecked
            log.warning("torch %s's inductor lacks %s: %s compiled without", torch.__version__,
                        ", ".join(sorted(set(options) - set(known))), fn.__name__)
        extra = {"options": known} if known else {}
        compiled = _COMPILED[fn] = torch.compile(fn, dynamic=COMPILE_DYNAMIC, **extra)
    if compile_new:
        return compiled

    def run_only(*args, **kwargs):
        # "eager_on_recompile" only runs compiled code whose guards match
        # (same shape, dtype and structure) and never compiles: anything else
        # runs uncompiled.
        with torch.compiler.set_stance("eager_on_recompile"):
            return compiled(*args, **kwargs)

    return run_only


def warm_up(vgg: VGGFeatures, sizes: Sequence[tuple[int, int]], params: Params | None = None,
            max_batch: int = 1) -> dict:
    """Compile the fast preset's loss and its backward for each (width, height)
    in `sizes` and each dtype its steps use, so that requests of those shapes
    find compiled code (they never compile themselves: see `loss_function`).
    With `max_batch` > 1 (the worker's TorchServe batchSize) each size also
    gets one program for batches of rows, compiled at max_batch rows with the
    batch dimension dynamic: it serves every batch of 2 or more.
    Where optimizations are kept (KEEP_PROGRAMS), each size's one-image
    optimization is then run once through both dtypes' steps, so its CUDA
    graphs are captured and kept for the first request.
    With LBFGS_COMPILE, each size's L-BFGS update is compiled too. With
    `params` of space=normalized (preset=seed's) the recipe's loss is compiled.
    For a worker's start, inside TorchServe's startupTimeout. Returns seconds
    per size; nothing is done where neither compiling nor keeping is on."""
    params = params or Params()
    device = vgg.mean.device
    seconds: dict = {}
    compiling = use_compile(device)
    capturing = use_cuda_graphs(device) and keep_count(device) > 0  # for the sizes it keeps
    if not (compiling or capturing):
        return seconds
    loss_of = loss_function(params.normalized_space, device, compile_new=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shared = max_batch > 1 and BATCH_MIN_PIXELS.get(device.type, 0) is not None  # rows may share here
    batches = ((1, max_batch) if shared else (1,)) if compiling else ()
    for w, h in sizes:
        t0 = time.monotonic()
        for batch in batches:
            content, style = (torch.rand((batch, 3, h, w), generator=gen).to(device) for _ in range(2))
            # built as a request's are: one objective per row, stacked
            objective = stack_objectives([request_objective(vgg, content[b:b + 1], [style[b:b + 1]], params)
                                          for b in range(batch)])
            for dtype in step_dtypes(device, params):
                x = content.clone().requires_grad_(True)
                if batch > 1:
                    _mark_batch_dynamic(objective, x)
                with torch.enable_grad():
                    torch.autograd.grad(loss_of(objective, x, dtype).sum(), x)
        if compiling and LBFGS_COMPILE and params.optimizer == "lbfgs" and device.type not in _UPDATE_EAGER:
            # The L-BFGS update, compiled through one eager step per dtype of
            # a program built for it and then dropped (its key says compile_new).
            content, style = (torch.rand((1, 3, h, w), generator=gen).to(device) for _ in range(2))
            program = _program(vgg, request_objective(vgg, content, [style], params), content, params, True)
            try:
                with torch.enable_grad():
                    for dtype in step_dtypes(device, params):
                        program.runner.step_fn(dtype)
            except _COMPILE_ERRORS as e:
                # A compiler that fails on the update (its options, LBFGS_COMPILE_OPTIONS,
                # were never run on every torch and card) leaves the update
                # uncompiled, a slower step, rather than a worker that cannot start.
                log.error("compiling the L-BFGS update failed on %s (%s: %s); its steps run it uncompiled",
                          device, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                _UPDATE_EAGER.add(device.type)
                _COMPILED.pop(lbfgs_update, None)
            del program
        if capturing and keeps(device, (h, w)):
            content, style = (torch.rand((1, 3, h, w), generator=gen).to(device) for _ in range(2))
            # through the eager and captured step of each dtype (LOWP_STEPS of bf16 first)
            steps = (LOWP_STEPS if len(step_dtypes(device, params)) > 1 else 0) + SETUP_STEPS
            stylize(vgg, content, [style], dataclasses.replace(params, steps=steps), progress_every=steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[f"{w}x{h}"] = time.monotonic() - t0
    return seconds


def _mark_batch_dynamic(objective: Objective, x: Tensor) -> None:
    """Let torch.compile treat the batch dimension of every per-row tensor as
    one variable (any batch of 2 or more rows; 1 gets its own program, since
    torch.compile always specializes a dimension of size 1). "maybe": the
    dimensions are all the same variable, which strict marks would refuse."""
    for t in (x, *_objective_tensors(objective)):
        torch._dynamo.maybe_mark_dynamic(t, 0)


class _Heartbeat:
    """Whether a progress record is due by time: on a CPU, once `every_s`
    seconds have passed since the last record (Limits.progress_every_s), so a
    stream whose records come by steps minutes apart still shows it is alive.
    Never on a GPU, where reading the loss is a host sync: records come by
    steps alone there (and its steps take milliseconds)."""

    def __init__(self, device: torch.device, every_s: float | None, start: float):
        self.every_s = every_s if device.type == "cpu" and every_s else None
        self.last = start

    def due(self) -> bool:
        return self.every_s is not None and time.monotonic() - self.last >= self.every_s

    def recorded(self, now: float) -> None:
        self.last = now


def _timed(run: Callable[[torch.dtype], None], dtype: torch.dtype, seen: dict, shortest: float | None) -> float | None:
    """Run one step of `dtype` and return the bound on the steps after it:
    the shortest step of `dtype` so far, on the host's clock (on a GPU that
    is the launch, which is never longer than the step), or `shortest` as it
    was until `dtype` has one. Each dtype has its own (`seen`: dtype -> steps
    run, shortest): after a CPU's bf16 steps, float32 ones take about twice
    as long, and a bound from the bf16 ones let a float32 step start that
    ended past the deadline. The first SETUP_STEPS of each dtype do not
    count: they set up (oneDNN's or cuDNN's kernels, a CUDA graph's
    capture), and a step bound from them would be too long."""
    began = time.monotonic()
    run(dtype)
    took = time.monotonic() - began
    count, fastest = seen.get(dtype, (0, None))
    count += 1
    if count > SETUP_STEPS:
        fastest = took if fastest is None else min(fastest, took)
    seen[dtype] = (count, fastest)
    return shortest if fastest is None else fastest


class _GraphRunner:
    """Runs `step_fn(dtype)` eagerly for WARMUP_STEPS calls per dtype (real
    optimization steps, where the lazy setup that capture cannot record is
    done: cuBLAS and cuDNN handles and workspaces, Adam's state), then captures it in a
    CUDA graph and replays that: one launch per step instead of hundreds.
    Every tensor the step touches lives in place (the image, the L-BFGS
    state, the loss), so the replays continue the same optimization.

    `keep`: the graphs of every dtype are kept (for the next request of a
    kept optimization), in one memory pool: a step leaves nothing alive in
    the pool (it writes only into tensors allocated outside), and the graphs
    never run at the same time, so they can share it."""

    WARMUP_STEPS = 1  # the lazy setup is done in the first; later ones only delay the graph

    def __init__(self, step_fn: Callable[[torch.dtype], None], enabled: bool, keep: bool = False):
        self.step_fn = step_fn
        self.enabled = enabled
        self.keep = keep
        self.pool = torch.cuda.graph_pool_handle() if enabled and keep else None
        self.graphs: dict[torch.dtype, "torch.cuda.CUDAGraph"] = {}
        self.calls: dict[torch.dtype, int] = {}

    def run(self, dtype: torch.dtype) -> None:
        if not self.enabled:
            self.step_fn(dtype)
            return
        graph = self.graphs.get(dtype)
        if graph is not None:
            graph.replay()
            return
        if not self.keep:
            # Steps never go back to an earlier dtype: free that graph's memory
            # pool before this dtype's steps allocate their own.
            self.graphs.clear()
        done = self.calls.get(dtype, 0)
        self.calls[dtype] = done + 1
        if done < self.WARMUP_STEPS:
            # Warm-up off the default stream, as graph capture requires.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step_fn(dtype)
            torch.cuda.current_stream().wait_stream(side)
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step_fn(dtype)  # recorded, not run
        self.graphs[dtype] = graph
        graph.replay()

    @property
    def captured(self) -> tuple[torch.dtype, ...]:
        return tuple(self.graphs)


SETUP_STEPS = _GraphRunner.WARMUP_STEPS + 1  # a dtype's eager warm-up steps, then its capture


def use_coarse_to_fine(content: Tensor, params: Params) -> bool:
    return (COARSE_TO_FINE_FROM is not None and max(content.shape[-2:]) >= COARSE_TO_FINE_FROM
            and not params.normalized_space and params.init == "content" and params.steps >= 4)


def _half(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 3, H/2, W/2), antialiased: what a smaller request would see."""
    h, w = images.shape[-2:]
    return F.interpolate(images, size=(max(1, h // 2), max(1, w // 2)), mode="bilinear", antialias=True,
                         align_corners=False)


def _coarse_to_fine(vgg, content, styles, params, *, callback, deadline, progress_every,
                    progress_every_s) -> Result:
    """The first COARSE_FRACTION of the steps at half size, the rest at full
    size from the coarse result's stylization carried onto the content. Steps
    are numbered across both stages, so progress runs 1..steps once."""
    coarse_steps = max(1, int(params.steps * COARSE_FRACTION))
    small = _half(content)
    coarse = stylize(vgg, small, [_half(s) for s in styles], dataclasses.replace(params, steps=coarse_steps,
                     preserve_color=False), callback=None if callback is None else
                     (lambda p: callback(Progress(p.step, params.steps, p.loss, p.elapsed_ms))),
                     deadline=deadline, progress_every=progress_every, progress_every_s=progress_every_s,
                     init=small)
    # The coarse stage changed the image by (coarse - small); upsampled, that
    # change lands on the full-size content, whose detail a plain upsampling
    # of the coarse image would have blurred away.
    delta = F.interpolate(coarse.image - small, size=content.shape[-2:], mode="bilinear", align_corners=False)
    init = (content + delta).clamp(0, 1)
    offset = coarse.elapsed_ms  # the fine stage's clock starts at 0: report time since the request began
    fine = stylize(vgg, content, styles, params, deadline=deadline, progress_every=progress_every,
                   progress_every_s=progress_every_s, callback=None if callback is None else
                   (lambda p: callback(dataclasses.replace(p, elapsed_ms=p.elapsed_ms + offset))),
                   init=init, first_step=coarse_steps + 1)
    history = [dataclasses.replace(p, steps=params.steps) for p in coarse.history] + [
        dataclasses.replace(p, elapsed_ms=p.elapsed_ms + offset) for p in fine.history]
    return dataclasses.replace(fine, elapsed_ms=offset + fine.elapsed_ms, history=history,
                               skipped_steps=coarse.skipped_steps + fine.skipped_steps)


def request_objective(vgg: VGGFeatures, content: Tensor, styles: Sequence[Tensor], params: Params) -> Objective:
    """One image's objective (a batch of one) from its [0,1] content and styles."""
    return make_objective(
        vgg,
        vgg.normalize(content),
        [vgg.normalize(s) for s in styles],
        style_layer_weights=params.style_layer_weights,
        content_weight=params.content_weight,
        style_weight=params.style_weight,
        tv_weight=params.tv_weight,
        style_blend=params.style_blend,
        pooling=params.pooling,
    )


@dataclass(frozen=True)
class Row:
    """One image of a batched optimization: a request's inputs and settings."""

    content: Tensor  # (1, 3, H, W) in [0, 1]
    styles: Sequence[Tensor]  # each (1, 3, h, w)
    params: Params
    callback: Callback | None = None
    deadline: float | None = None  # time.monotonic() value


def batch_key(content: Tensor, params: Params) -> tuple | None:
    """Rows whose keys are equal can share one optimization (`stylize_batch`);
    None for a row that always runs alone. What may differ within a batch:
    the images, every weight, the steps, init, seed, colours and deadlines."""
    if params.optimizer != "lbfgs" or use_coarse_to_fine(content, params):
        return None
    bound = BATCH_MIN_PIXELS.get(content.device.type, 0)
    if bound is None or shape_pixels(content) < bound:
        return None  # batched, it would not get its own answer (see BATCH_MIN_PIXELS)
    return _structure(content, params)


def _structure(content: Tensor, params: Params) -> tuple:
    return _structure_of(tuple(content.shape[-2:]), content.device, params)


def _structure_of(hw: tuple, device: torch.device, params: Params) -> tuple:
    """What one L-BFGS batch must share: the shape, the optimization space and
    the objective's structure (the step scale is one number for all)."""
    layers = tuple(sorted({canonical_layer(k) for k, v in params.style_layer_weights.items() if v}))
    return (hw, str(device), params.normalized_space, params.pooling, layers, bool(params.tv_weight), params.lr)


@dataclass
class _Program:
    """One L-BFGS optimization's device tensors and its CUDA graphs: every
    tensor a captured step reads or writes, so that a later request of the
    same key can load its own values into them and replay the graphs."""

    key: tuple
    x: Tensor  # (B, 3, H, W) the optimization variable
    objective: Objective  # its targets and weights, loaded per request
    states: list  # lbfgs.State: one for all rows, or one per row
    counter: Tensor  # () int64: steps done, on the device
    last: Tensor  # (B,) int64: each row's last step
    loss_buf: Tensor  # (B,) each row's loss at the latest step
    scale: Tensor  # (3, B) float16 steps' loss scaling (scale_state)
    runner: _GraphRunner
    held_bytes: int  # what keeping it is charged (its admission estimate)


# Kept programs, least recently used first (KEEP_PROGRAMS). A program is taken
# out while a request runs it and put back only when that request ends
# normally, so an exception anywhere leaves nothing half-loaded behind.
_KEPT: "OrderedDict[tuple, _Program]" = OrderedDict()


def keep_count(device: torch.device) -> int:
    return KEEP_PROGRAMS.get(device.type, 0)


def keeps(device: torch.device, shape: Sequence[int]) -> bool:
    """Whether an optimization of images of `shape` (..., H, W) is kept here."""
    return keep_count(device) > 0 and shape[-2] * shape[-1] <= KEEP_PROGRAMS_MAX_PIXELS


def build_bytes(vgg: VGGFeatures, shape: Sequence[int], params: Params) -> int:
    """Memory a request needs beyond its estimate because it builds a kept
    optimization: its first dtype's graph pool, held while it captures the
    float32 steps (nst.memory.shared_pool_bytes). 0 where it reuses one, where
    nothing is kept or captured, and where its steps have one dtype only."""
    device = vgg.mean.device
    if (params.optimizer != "lbfgs" or not keeps(device, shape) or not use_cuda_graphs(device)
            or len(step_dtypes(device, params)) == 1 or program_key(vgg, shape, params) in _KEPT):
        return 0
    return shape[0] * memory.shared_pool_bytes(shape[-2], shape[-1])


def program_key(vgg: VGGFeatures, shape: Sequence[int], params: Params, compile_new: bool = False) -> tuple:
    """What a kept program must match: the extractor (a kept program holds
    it, so its id stays its own), the batch's shape (B, 3, H, W) and
    structure, and every setting that a captured step bakes in."""
    device = vgg.mean.device
    one_state = device.type in LBFGS_ONE_STATE_DEVICES
    return (id(vgg), tuple(shape), _structure_of(tuple(shape[-2:]), device, params), one_state, LBFGS_MAX_MOVE,
            lbfgs.history_pairs(shape[-2] * shape[-1], device.type), lbfgs.history_dtype(device.type),
            use_cuda_graphs(device), use_compile(device), compile_new, LBFGS_COMPILE)


def held_bytes(except_key: tuple | None = None) -> int:
    """What the kept programs are charged, but the one of `except_key`."""
    return sum(p.held_bytes for k, p in _KEPT.items() if k != except_key)


def drop_programs() -> int:
    """Forget every kept program (their memory goes back to the allocator's
    cache). Returns how many there were."""
    n = len(_KEPT)
    _KEPT.clear()
    return n


def _keep(program: _Program) -> None:
    device = program.x.device
    limit = keep_count(device)
    if not keeps(device, program.x.shape):
        return
    _KEPT[program.key] = program
    _KEPT.move_to_end(program.key)
    allowed = KEEP_PROGRAMS_MEMORY * memory.total_bytes(device)
    while _KEPT and (len(_KEPT) > limit or held_bytes() > allowed):
        _KEPT.popitem(last=False)


def _program(vgg: VGGFeatures, objective: Objective, x0: Tensor, p0: Params, compile_new: bool) -> _Program:
    """The kept program of this batch's key with `objective`'s targets and
    weights and the initial image `x0` (B, 3, H, W) loaded, its L-BFGS
    history emptied; or a new one around these very tensors."""
    device = x0.device
    key = program_key(vgg, x0.shape, p0, compile_new)
    program = _KEPT.pop(key, None)
    if program is not None:
        with torch.no_grad():
            program.x.copy_(x0)
            for kept, new in zip(_objective_tensors(program.objective), _objective_tensors(objective)):
                kept.copy_(new)
            for state in program.states:
                lbfgs.reset(state)
            program.loss_buf.zero_()
            reset_scale(program.scale)
        return program
    B, n = x0.shape[0], x0[0].numel()
    x = x0.contiguous()  # updated in place, so a CUDA graph can hold it
    one_state = device.type in LBFGS_ONE_STATE_DEVICES
    pairs = lbfgs.history_pairs(shape_pixels(x), device.type)
    # One single-image state per row, each stepped by the very code that steps
    # a request alone: a batched reduction (a B-row bmm or sum) orders its
    # additions differently from a one-row one, and the optimization amplified
    # those last bits to several levels of 255 over a few dozen steps.
    states = [lbfgs.init_state(B, n, pairs, device)] if one_state else [
        lbfgs.init_state(1, n, pairs, device) for _ in range(B)]
    rows_of = [slice(0, B)] if one_state else [slice(b, b + 1) for b in range(B)]  # each state's rows
    counter = torch.zeros((), device=device, dtype=torch.long)
    last = torch.zeros(B, device=device, dtype=torch.long)
    loss_buf = torch.zeros(B, device=device)
    bounded = not p0.normalized_space
    loss_of = loss_function(p0.normalized_space, device, compile_new)
    lr, max_move = p0.lr, LBFGS_MAX_MOVE

    scale = scale_state(B, device)
    update = (_compiled(lbfgs_update, compile_new, LBFGS_COMPILE_OPTIONS)
              if use_compile(device) and LBFGS_COMPILE and device.type not in _UPDATE_EAGER else lbfgs_update)
    state_tensors = tuple(lbfgs.tensors(state) for state in states)

    def one_step(dtype: torch.dtype) -> None:
        loss, grad = scaled_gradient(loss_of, objective, x, dtype, scale)  # (B,), like x
        x.copy_(update(x, grad, loss.detach(), scale, counter, last, loss_buf, state_tensors, rows_of,
                       half=dtype == torch.float16, lr=lr, max_move=max_move, bounded=bounded))

    keep = keeps(device, x.shape)
    charge = B * memory.estimate_bytes(x.shape[-2], x.shape[-1], 0, p0, device.type,
                                       step_dtypes(device, p0)) if keep else 0
    return _Program(key, x, objective, states, counter, last, loss_buf, scale,
                    _GraphRunner(one_step, enabled=use_cuda_graphs(device), keep=keep), charge)


def lbfgs_update(x: Tensor, grad: Tensor, loss: Tensor, scale: Tensor, counter: Tensor, last: Tensor,
                 loss_buf: Tensor, state_tensors: tuple, rows_of: Sequence[slice], *, half: bool, lr: float,
                 max_move: float, bounded: bool) -> Tensor:
    """Everything an L-BFGS step does after its backward pass but moving the
    image: the float16 gradient unscaled (`half`), each state's step
    (`lbfgs.step`) on its rows, the loss and the step counter recorded, in
    place. Returns the image's next value (like x), x itself where its row
    has run its steps (counter >= last). Tensors in (the states as
    `lbfgs.tensors`), so that torch.compile (LBFGS_COMPILE) guards on shapes
    alone and serves every program of the same shape.

    x is not written here: compiled by inductor (torch 2.14.1), a function
    that copied x into another input (x_prev) and then overwrote x left x's
    new value in both (tests/core/test_compile.py)."""
    B = x.shape[0]
    usable = None
    if half:
        grad, usable = unscale(grad, scale)
    flat, g = x.view(B, -1), grad.reshape(B, -1)  # (B, n)
    parts = [lbfgs.step(
        lbfgs.State(*tensors), flat[rows], g[rows], lr=lr, max_move=max_move,
        lower=0.0 if bounded else None, upper=1.0 if bounded else None,
        usable=None if usable is None else usable[rows],
    ) for rows, tensors in zip(rows_of, state_tensors)]
    x_next = parts[0] if len(parts) == 1 else torch.cat(parts)  # one state (a GPU's): no copy
    active = (counter < last).view(B, 1)
    loss_buf.copy_(loss)
    counter.add_(1)
    return torch.where(active, x_next, flat).view_as(x)


def _objective_tensors(objective: Objective) -> tuple[Tensor, ...]:
    """The objective's per-request values, in a fixed order."""
    return (objective.content_target, objective.style_layer_weights, objective.weights, *objective.grams)


def stylize_batch(
    vgg: VGGFeatures,
    rows: Sequence[Row],
    *,
    progress_every: int = 1,
    progress_every_s: float | None = None,
    init: Sequence[Tensor] | None = None,
    first_step: int = 1,
) -> list:
    """L-BFGS for several images at once (rows with equal `batch_key`s): one
    VGG pass and one optimizer step per step for all of them, each image with
    its own loss, targets, weights, curvature history, step bound and step
    count. Returns, per row, its `Result` or the exception that ended it
    (`BudgetExceeded` past its deadline, `Diverged`, or whatever its
    callback raised): one row's failure never stops the others.

    A row that has run its steps stays in the batch, frozen (its update is
    masked), so the shapes, and a captured CUDA graph, never change. The host
    reads the device only when some row is due a progress record (every
    `progress_every` steps, and each row's last step; on a CPU also once
    `progress_every_s` seconds have passed since the last record)."""
    start = time.monotonic()
    B = len(rows)
    p0 = rows[0].params
    if len({_structure(r.content, r.params) for r in rows}) != 1 or p0.optimizer != "lbfgs":
        raise ValueError("rows of different shapes or structures cannot share an optimization")
    device = rows[0].content.device
    lowp = compute_dtype(device, p0)
    content = torch.cat([r.content for r in rows])  # (B, 3, H, W)
    x0, to_pixels = _start(vgg, [r.content for r in rows], [r.params for r in rows], init)
    steps = [r.params.steps for r in rows]
    program = _program(vgg, stack_objectives([request_objective(vgg, r.content, r.styles, r.params) for r in rows]),
                       x0, p0, compile_new=False)
    x, objective, counter, last, loss_buf, runner = (program.x, program.objective, program.counter, program.last,
                                                     program.loss_buf, program.runner)
    # Device-side step counter and per-row last step: a row updates while
    # counter < its last step, decided on the device, inside the graph.
    counter.fill_(first_step - 1)
    last.copy_(torch.tensor(steps, dtype=torch.long))
    outcome: list = [None] * B
    history: list[list[Progress]] = [[] for _ in rows]
    finished_ms = [0.0] * B
    # One pace and one step bound for all rows: they run the same steps.
    pace: Pace | None = None
    shortest: float | None = None  # the bound on the next step (_timed)
    seen: dict = {}  # per dtype: steps run, the shortest (_timed)

    def fail(b: int, exc: BaseException, step: int) -> None:
        outcome[b] = exc
        finished_ms[b] = (time.monotonic() - start) * 1e3
        last[b] = step  # frozen from here (a host write between steps, outside any graph)
        with torch.no_grad():
            x[b].copy_(content[b] if not p0.normalized_space else vgg.normalize(content[b:b + 1])[0])  # stays finite

    def running(b: int, step: int) -> bool:
        return outcome[b] is None and step <= steps[b]

    def hold_to_deadline(b: int, step: int, per_step: float | None = None) -> None:
        try:
            check_deadline(rows[b].deadline, step, steps[b], time.monotonic(), per_step, shortest)
        except BudgetExceeded as e:
            fail(b, e, step)

    for b in range(B):
        hold_to_deadline(b, first_step - 1)
    beat = _Heartbeat(device, progress_every_s, start)
    with torch.enable_grad():
        for step in range(first_step, max(steps) + 1):
            if not any(running(b, step) for b in range(B)):
                break
            shortest = _timed(runner.run, step_dtype(lowp, step), seen, shortest)
            due_now = beat.due()
            due = [b for b in range(B)
                   if running(b, step) and (due_now or step % progress_every == 0 or step == steps[b])]
            for b in range(B):
                if running(b, step) and b not in due:
                    # Between records too, on the host's clock alone (no device
                    # read): records may be minutes apart on a CPU, past
                    # responseTimeout, where TorchServe kills the worker.
                    hold_to_deadline(b, step)
            if not due:
                continue
            losses = loss_buf.tolist()  # the one host sync of this stretch of steps
            now = time.monotonic()
            beat.recorded(now)
            pace, per_step = pace_at(pace, step_dtype(lowp, step), step, now)
            for b in due:
                if not math.isfinite(losses[b]):
                    fail(b, Diverged(f"loss became {losses[b]} at step {step}"), step)
                    continue
                p = Progress(step, steps[b], losses[b], (now - start) * 1e3)
                history[b].append(p)
                try:
                    if rows[b].callback is not None:
                        rows[b].callback(p)
                except Exception as e:  # noqa: BLE001  the row's own consumer failed: that row ends
                    fail(b, e, step)
                    continue
                if step == steps[b]:
                    finished_ms[b] = (time.monotonic() - start) * 1e3
                else:
                    hold_to_deadline(b, step, per_step)

    with torch.no_grad():
        delivered = quantize(to_pixels(x.detach()))
        for b, r in enumerate(rows):
            if r.params.preserve_color and outcome[b] is None:
                delivered[b:b + 1] = quantize(transfer_luminance(delivered[b:b + 1], r.content))
        # Each image scored on its own: a batched pass reduces in another
        # order, and a row's loss would differ from its loss alone in the last bits.
        # A row that failed is not scored: a float32 VGG pass nobody reads.
        finals = [row_objective(objective, b)(vgg.normalize(_as_delivered(delivered[b:b + 1], rows[b].params)),
                                              torch.float32).total.item()
                  if outcome[b] is None else math.nan for b in range(B)]
    skipped = _skipped(program.scale, max(steps))
    _keep(program)  # only here: a program whose request raised is dropped, whatever state it was left in
    for b in range(B):
        if outcome[b] is not None:
            continue
        if not math.isfinite(finals[b]):
            outcome[b] = Diverged(f"loss of the delivered image is {finals[b]}")
            continue
        outcome[b] = Result(delivered[b:b + 1].clone(), finals[b], steps[b], finished_ms[b], history[b], skipped[b])
    return outcome


def stylize(
    vgg: VGGFeatures,
    content: Tensor,
    styles: Sequence[Tensor],
    params: Params,
    *,
    callback: Callback | None = None,
    deadline: float | None = None,
    progress_every: int = 1,
    progress_every_s: float | None = None,
    init: Tensor | None = None,
    first_step: int = 1,
) -> Result:
    """Optimize an image against `content` (1,3,H,W) and `styles` (each
    (1,3,h,w)), all [0,1] RGB on the extractor's device.

    `space=normalized` (the seed preset's) optimizes ImageNet-normalized
    values with no constraint, step for step as the tutorial does.
    `space=pixels` (the fast preset's) optimizes pixels in [0,1] with the
    device-resident L-BFGS of `nst.lbfgs` (bounded steps, pixels held at the
    bounds), or Adam; the objective sees the pixels
    clamped, so the image it scores is the image it delivers.

    The host reads the device only every `progress_every` steps (the loss for
    progress, the NaN check, the deadline; on a CPU also once
    `progress_every_s` seconds have passed since the last record) and at the
    end: between those the GPU runs unattended. `deadline` is a `time.monotonic()` value; past it,
    `BudgetExceeded` is raised. A request never compiles (see `loss_function`).

    Outputs of COARSE_TO_FINE_FROM px and more run coarse-to-fine (see
    config.py). `init` (pixels in [0,1]) replaces the initial image and
    `first_step` numbers the steps from there (both for the fine stage).
    """
    # Before the targets' VGG passes (seconds on a CPU at 1024 px): a request
    # whose deadline has passed costs nothing more.
    check_deadline(deadline, first_step - 1, params.steps, time.monotonic())
    if use_coarse_to_fine(content, params) and init is None:
        return _coarse_to_fine(vgg, content, styles, params, callback=callback, deadline=deadline,
                               progress_every=progress_every, progress_every_s=progress_every_s)
    if params.optimizer == "lbfgs":
        (outcome,) = stylize_batch(vgg, [Row(content, styles, params, callback, deadline)],
                                   progress_every=progress_every, progress_every_s=progress_every_s,
                                   init=None if init is None else [init], first_step=first_step)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    start = time.monotonic()
    lowp = compute_dtype(content.device, params)
    objective = request_objective(vgg, content, styles, params)
    var, to_pixels = _start(vgg, [content], [params], None if init is None else [init])
    loss_of = loss_function(params.normalized_space, content.device)
    var = var.contiguous().requires_grad_(True)

    history: list[Progress] = []
    check_deadline(deadline, first_step - 1, params.steps, time.monotonic())
    pace: Pace | None = None
    shortest: float | None = None  # the bound on the next step (_timed)
    seen: dict = {}  # per dtype: steps run, the shortest (_timed)

    beat = _Heartbeat(content.device, progress_every_s, start)

    def report(step: int, loss: Tensor) -> None:
        nonlocal pace
        value = loss.item()  # the one host sync of this stretch of steps
        now = time.monotonic()
        beat.recorded(now)
        pace, per_step = pace_at(pace, step_dtype(lowp, step), step, now)
        _finite_or_raise(value, step)
        p = Progress(step, params.steps, value, (now - start) * 1e3)
        history.append(p)
        if callback is not None:
            callback(p)
        check_deadline(deadline, step, params.steps, time.monotonic(), per_step, shortest)

    def due(step: int) -> bool:
        return beat.due() or step % progress_every == 0 or step == params.steps

    graphs = ADAM_CUDA_GRAPHS and use_cuda_graphs(content.device)
    opt = torch.optim.Adam([var], lr=params.lr, capturable=graphs)  # capturable: its step count on the device
    scale = scale_state(1, content.device)
    loss_buf = torch.zeros(1, device=content.device)

    def one_step(dtype: torch.dtype) -> None:
        # a float16 gradient that overflowed is zeroed: Adam coasts on its moments for that step
        loss, var.grad, _ = gradient(loss_of, objective, var, dtype, scale)
        opt.step()
        loss_buf.copy_(loss.detach())

    runner = _GraphRunner(one_step, enabled=graphs)
    with torch.enable_grad():
        for step in range(first_step, params.steps + 1):
            shortest = _timed(runner.run, step_dtype(lowp, step), seen, shortest)
            if due(step):
                report(step, loss_buf)
            else:  # between records too, on the host's clock alone (see stylize_batch)
                check_deadline(deadline, step, params.steps, time.monotonic(), shortest=shortest)

    with torch.no_grad():
        delivered = quantize(to_pixels(var.detach()))
        if params.preserve_color:
            delivered = quantize(transfer_luminance(delivered, content))
        final = objective(vgg.normalize(_as_delivered(delivered, params)), torch.float32).total.item()  # (1,)
    if not math.isfinite(final):
        raise Diverged(f"loss of the delivered image is {final}")
    (skipped,) = _skipped(scale, params.steps)
    return Result(delivered, final, params.steps, (time.monotonic() - start) * 1e3, history, skipped)
