"""One request end to end, without any server: bytes in, encoded image out."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from PIL import Image
from torch import Tensor

from . import imageio, memory, optimize
from .config import Limits
from .errors import InvalidParameter, OutOfMemory
from .request import Request
from .optimize import BudgetExceeded, Callback, Result, Row, batch_key, check_deadline, stylize, stylize_batch
from .vgg import VGGFeatures


@dataclass(frozen=True)
class Output:
    data: bytes  # the encoded image
    content_type: str
    result: Result
    decode_ms: float  # decoding and resizing the inputs, before the optimization
    encode_ms: float
    batch: int = 1  # requests that shared this one's optimization


def size_style(style: Image.Image, content: Image.Image, style_scale: float, normalized_space: bool,
               limits: Limits) -> Image.Image:
    """In the recipe's space (at style_scale 1) the style is resized to the
    content's exact shape, as the recipe does; otherwise it keeps its aspect
    and its longest side becomes `style_scale` times the content's."""
    if normalized_space and style_scale == 1.0:
        return imageio.resize_to(style, content.size)
    longest = round(style_scale * max(content.size))
    longest = max(limits.min_input_side, min(longest, limits.max_size))
    w, h = style.size
    scale = longest / max(w, h)
    size = (max(limits.min_input_side, round(w * scale)), max(limits.min_input_side, round(h * scale)))
    return imageio.resize_to(style, size)


def budget_bytes(limits: Limits, device, own_key: tuple | None = None) -> int:
    """What one worker may spend now: the configured budget, else the device's
    free memory; less what its kept optimizations are charged, since the
    device's count takes their graphs' pool for free (see KEEP_PROGRAMS),
    but for the one of `own_key`, which the request will run in."""
    budget = limits.memory_budget_mb * 2**20 if limits.memory_budget_mb else memory.available_bytes(device)
    return budget - optimize.held_bytes(except_key=own_key)


def free_memory(device) -> None:
    """After running out of memory: drop the kept optimizations, then give
    the allocator's cache back (memory.release)."""
    optimize.drop_programs()
    memory.release(device)


def admit(content: Image.Image, styles: list[Image.Image], params, limits: Limits, vgg: VGGFeatures) -> int:
    """Refuse (507) a request whose estimated peak memory is over the budget,
    before allocating it. Kept optimizations never cause a refusal: where the
    request would not fit beside them, they are dropped and it is checked
    again. Returns the estimate, in bytes."""
    device = vgg.mean.device
    w, h = content.size
    need = memory.estimate_bytes(h, w, sum(s.size[0] * s.size[1] for s in styles), params, device.type,
                                 optimize.step_dtypes(device, params))
    need += optimize.build_bytes(vgg, (1, 3, h, w), params)
    budget = budget_bytes(limits, device, own_key=optimize.program_key(vgg, (1, 3, h, w), params))
    if need > budget and optimize.held_bytes():
        free_memory(device)
        budget = budget_bytes(limits, device)
    if need > budget:
        raise OutOfMemory("max_size", f"max_size: this request needs about {need // 2**20} MiB, the worker can "
                                      f"spend {budget // 2**20} MiB now; ask for a smaller max_size or retry later")
    return need


@dataclass(frozen=True)
class Prepared:
    """A request decoded and admitted, ready to optimize."""

    request: Request
    content: Tensor  # (1, 3, H, W) on the extractor's device
    styles: list[Tensor]
    decode_ms: float
    need_bytes: int  # the admission estimate of its peak memory


def prepare(request: Request, vgg: VGGFeatures, limits: Limits, *, deadline: float | None = None) -> Prepared:
    """Decode and size the inputs, and admit the request (507 if it alone
    would not fit); decoding counts against `deadline`."""
    p = request.params
    device = vgg.mean.device
    start = time.monotonic()
    field = request.content_field
    content_img = imageio.fit(imageio.decode(request.content, field, limits, draft_size=p.max_size), p.max_size)
    if min(content_img.size) < limits.min_input_side:  # an elongated image scaled down to max_size
        w, h = content_img.size
        raise InvalidParameter(field, f"{field}: scaled to max_size {p.max_size} it is {w}x{h} px, "
                                      f"each side must be at least {limits.min_input_side} px")
    style_imgs = [
        size_style(imageio.decode(data, name, limits), content_img, p.style_scale, p.normalized_space, limits)
        for data, name in zip(request.styles, request.style_fields, strict=True)
    ]
    decode_ms = (time.monotonic() - start) * 1e3
    if deadline is not None and time.monotonic() > deadline:
        # A decoder cannot be interrupted; the scan limit bounds it, the budget still counts it.
        raise BudgetExceeded(f"ran out before the first step (decoding took {decode_ms / 1e3:.1f} s)")
    need = admit(content_img, style_imgs, p, limits, vgg)
    return Prepared(request, imageio.to_tensor(content_img, device),
                    [imageio.to_tensor(s, device) for s in style_imgs], decode_ms, need)


def finish(prepared: Prepared, result: Result, batch: int = 1) -> Output:
    """Encode the delivered image."""
    p = prepared.request.params
    start = time.monotonic()
    data = imageio.encode(result.image, p.format, p.quality)
    encode_ms = (time.monotonic() - start) * 1e3
    return Output(data, imageio.CONTENT_TYPES[p.format], result, prepared.decode_ms, encode_ms, batch)


def run(
    request: Request,
    vgg: VGGFeatures,
    limits: Limits,
    *,
    callback: Callback | None = None,
    deadline: float | None = None,
) -> Output:
    prepared = prepare(request, vgg, limits, deadline=deadline)
    result = stylize(vgg, prepared.content, prepared.styles, prepared.request.params, callback=callback,
                     deadline=deadline, progress_every=limits.progress_every,
                     progress_every_s=limits.progress_every_s)
    return finish(prepared, result)


@dataclass(frozen=True)
class Job:
    """One prepared request of a batch, with its own progress and deadline."""

    prepared: Prepared
    callback: Callback | None = None
    deadline: float | None = None


def groups(jobs: Sequence[Job], limits: Limits, device) -> list[list[int]]:
    """Indices of `jobs` that share one optimization: equal batch keys, in
    arrival order, each group's summed memory estimate within the budget (a
    group that would not fit is cut, and the rest forms a later group)."""
    budget = budget_bytes(limits, device)
    by_key: dict = {}
    out: list[list[int]] = []
    for i, job in enumerate(jobs):
        key = batch_key(job.prepared.content, job.prepared.request.params)
        if key is None:
            out.append([i])
            continue
        need = job.prepared.need_bytes
        group, used = by_key.get(key, (None, 0))
        if group is None or used + need > budget:
            group, used = [], 0
            out.append(group)
        group.append(i)
        by_key[key] = (group, used + need)
    return out


def run_batch(jobs: Sequence[Job], vgg: VGGFeatures, limits: Limits) -> list:
    """Run prepared requests, sharing one optimization where they can
    (`groups`). Returns, per job, its `Output` or the exception that ended
    it. A group that runs out of memory is retried one job at a time, so only
    a job that cannot run even alone fails (with the allocation error)."""
    device = vgg.mean.device
    outcomes: list = [None] * len(jobs)
    for group in groups(jobs, limits, device):
        # Groups run one after another: a job whose deadline an earlier group
        # used up ends here, before its targets' VGG passes (seconds on a
        # CPU) would push the whole call toward responseTimeout.
        group = [i for i in group if not _expired(jobs[i], outcomes, i)]
        if not group:
            continue
        rows = [Row(jobs[i].prepared.content, jobs[i].prepared.styles, jobs[i].prepared.request.params,
                    jobs[i].callback, jobs[i].deadline) for i in group]
        if len(group) > 1:
            results = _batch_or_none(vgg, rows, limits)
            if results is not None:
                for i, r in zip(group, results):
                    outcomes[i] = r if isinstance(r, BaseException) else _finish_or_error(jobs[i].prepared, r,
                                                                                         len(group), device)
                continue
        for i, row in zip(group, rows):  # alone: a group of one, or a group that ran out of memory
            try:
                result = stylize(vgg, row.content, row.styles, row.params, callback=row.callback,
                                 deadline=row.deadline, progress_every=limits.progress_every,
                                 progress_every_s=limits.progress_every_s)
                outcomes[i] = finish(jobs[i].prepared, result)
            except Exception as e:  # noqa: BLE001  the job's own failure, mapped by the caller
                outcomes[i] = e.with_traceback(None)  # its frames hold tensors: let them go
                if memory.is_out_of_memory(e):
                    free_memory(device)
    return outcomes


def _expired(job: Job, outcomes: list, i: int) -> bool:
    """Whether `job`'s deadline has passed before it started (its outcome is then set)."""
    try:
        check_deadline(job.deadline, 0, job.prepared.request.params.steps, time.monotonic())
    except BudgetExceeded as e:
        outcomes[i] = e.with_traceback(None)
        return True
    return False


def _finish_or_error(prepared: Prepared, result: Result, batch: int, device):
    try:
        return finish(prepared, result, batch)
    except Exception as e:  # noqa: BLE001  encoding can run out of memory too
        if memory.is_out_of_memory(e):
            free_memory(device)
        return e.with_traceback(None)


def _batch_or_none(vgg: VGGFeatures, rows: list[Row], limits: Limits) -> list | None:
    """stylize_batch, or None if the batch ran out of memory (memory released).
    Any other failure of the batch as a whole is every row's outcome."""
    try:
        # A row's exception holds its traceback, whose frames hold the whole
        # batch (images, every row's L-BFGS history) until the cycle
        # collector runs: dropped here, as a lone row's is.
        return [r.with_traceback(None) if isinstance(r, BaseException) else r
                for r in stylize_batch(vgg, rows, progress_every=limits.progress_every,
                                       progress_every_s=limits.progress_every_s)]
    except Exception as e:  # noqa: BLE001
        if not memory.is_out_of_memory(e):
            return [e.with_traceback(None)] * len(rows)
    free_memory(vgg.mean.device)  # outside the except block: its frames held the tensors
    return None
