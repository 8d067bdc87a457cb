"""TorchServe adapter for the `nst` core: parse rows, run, encode, set status and headers.

TorchServe requires exactly one class in this module.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nst import Limits, RequestError, VGGFeatures, parse_request
from nst.errors import InternalError, InvalidParameter, OutOfMemory, TimedOut, TooLarge
from nst import weights as nst_weights
from nst.fetch import fetch
from nst.memory import is_out_of_memory
from nst.config import CUDNN_AUTOTUNE, PRESETS, WARM_UP_PRESETS, WARM_UP_SIZES, Params
from nst.imageio import fit_size
from nst.optimize import BudgetExceeded, Diverged, Progress, WouldExceedBudget, warm_up
from nst.request import build_params, parse_json_body
from nst.pipeline import Job, Output, Prepared, free_memory, prepare, run_batch

log = logging.getLogger(__name__)

# What the frontend applies when the model config names no responseTimeout.
TORCHSERVE_DEFAULT_RESPONSE_TIMEOUT_S = 120
JSON = "application/json"
NDJSON = "application/x-ndjson"
# Bodies TorchServe's frontend reads as fields (Netty's HttpPostRequestDecoder)
MULTIPART, FORM_URLENCODED = "multipart/form-data", "application/x-www-form-urlencoded"
TS_STREAM_NEXT = "ts_stream_next"  # the frontend's "more responses follow" header (RequestInput.TS_STREAM_NEXT)


def _send_intermediate(line: bytes, idx: int, context: Any) -> None:
    # Imported lazily so the handler's tests need no running frontend.
    from ts.handler_utils.utils import send_intermediate_predict_response

    send_intermediate_predict_response(
        {idx: line}, {idx: context.request_ids[idx]}, "Intermediate Prediction success", 200, context
    )


class StyleTransferHandler:
    """Loads the frozen VGG19 once per worker; rows of a batch with the same
    output shape share one optimization where the device and optimizer allow
    (nst.optimize.batch_key: a CPU's L-BFGS), and each row gets its own answer."""

    @dataclass
    class _Row:
        """What the handler knows of one row while it runs (nested: TorchServe
        requires exactly one class at the module level)."""

        idx: int
        request_id: str  # TorchServe's, which the client gets as x-request-id: logs name the row by it
        taken: float  # time.monotonic() when the worker took it
        deadline: float  # the server's budget or the client's earlier deadline
        grpc: bool
        deadline_field: str | None = None  # the client's parameter when its deadline is the earlier one
        streaming: bool = False  # True once a progress record (and with it the 200 status) went out
        callback: Any = None
        prepared: Prepared | None = None
        error: RequestError | None = None  # what the row was answered with, if it failed

    class _LevelledFormatter(logging.Formatter):
        """TorchServe's worker logs bare messages (basicConfig's
        "%(message)s" on stdout: its metrics travel that way, as "[METRICS]"
        lines) and the frontend stamps every line INFO in model_log.log, so
        a warning or a 500's traceback looked like any other line. This
        product's own records (OWN: the handler's and the core's loggers)
        get their level and logger in front; every other record is
        formatted as before."""

        OWN = ("nst", __name__)

        def format(self, record: logging.LogRecord) -> str:
            text = super().format(record)
            if record.name.split(".")[0] in self.OWN:
                return f"{record.levelname} {record.name}: {text}"
            return text

    def __init__(self) -> None:
        self.initialized = False
        self.vgg: VGGFeatures | None = None
        self.limits = Limits()
        self.weights_kind = "custom"
        self.device = torch.device("cpu")
        self.send_intermediate = _send_intermediate

    def initialize(self, context: Any) -> None:
        _show_levels(self._LevelledFormatter("%(message)s"))
        props = context.system_properties
        gpu_id = props.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.backends.cudnn.benchmark = CUDNN_AUTOTUNE
            torch.set_float32_matmul_precision("high")  # TF32 Grams, as TorchServe's base handler sets
        config = getattr(context, "model_yaml_config", None) or {}
        self.limits = Limits.from_mapping(config.get("limits")).for_device(self.device.type)
        self.limits.check_response_timeout(config.get("responseTimeout", TORCHSERVE_DEFAULT_RESPONSE_TIMEOUT_S))
        serialized = context.manifest["model"].get("serializedFile", nst_weights.FILE_NAME)
        state, self.weights_kind = nst_weights.load(Path(props["model_dir"]) / serialized)
        self.vgg = VGGFeatures(state).to(self.device)
        # Compile the common shapes now, inside startupTimeout: requests never
        # compile (a shape not warmed runs uncompiled), so none waits for it.
        # With TorchServe batching on, batches of those shapes too. On a GPU
        # their steps are captured and kept for the first request (KEEP_PROGRAMS).
        # Another preset (warm_up_presets: preset=seed) gets the sizes its own
        # requests come out at by default: each fit to its max_size. Adam's
        # requests never share an optimization, so only L-BFGS presets compile batches.
        if "warm_up_sizes" in config:
            sizes = parse_sizes(config["warm_up_sizes"], self.limits)
        else:  # the defaults, less those this deployment's limits never let a request reach
            sizes = [s for s in WARM_UP_SIZES if _reachable(s, self.limits)]
        warmed: dict = {}
        for preset in parse_presets(config.get("warm_up_presets", WARM_UP_PRESETS)):
            params = build_params({"preset": preset}, self.limits)
            default = preset == Params.preset
            own = sizes if default else list(dict.fromkeys(fit_size(s, params.max_size) for s in sizes))
            done = warm_up(self.vgg, own, params=params,
                           max_batch=int(props.get("batch_size") or 1) if params.optimizer == "lbfgs" else 1)
            warmed.update({k if default else f"{k} ({preset})": v for k, v in done.items()})
        self.initialized = True
        log.info(
            "style_transfer ready: device=%s weights=%s limits=%s warmed up=%s",
            self.device, self.weights_kind, self.limits,
            ", ".join(f"{k} in {v:.1f} s" for k, v in warmed.items()) or "nothing",
        )

    def _fetch(self, url: str, field: str) -> bytes:
        return fetch(url, field, self.limits)

    def handle(self, data: list[dict], context: Any) -> list[bytes]:
        """decode (every row) -> predict (rows of one shape share an
        optimization where batch_key allows) -> encode and answer (each row
        its own answer or error)."""
        out: list[bytes | None] = [None] * len(data)
        rows: list[StyleTransferHandler._Row] = []
        every: list[StyleTransferHandler._Row] = []
        # One clock for the whole call: TorchServe's responseTimeout runs from
        # when the worker took the batch, not from when a row's turn to decode
        # came (after its neighbours' decodes and URL downloads).
        taken = time.monotonic()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # PeakDeviceMemoryMB: this call's
        else:
            _share_cpu(self.limits)
        for idx, raw in enumerate(data):
            row = self._Row(idx, str(context.get_request_id(idx)), taken=taken,
                            deadline=taken + self.limits.time_budget_s, grpc=is_grpc(context, idx))
            every.append(row)
            try:
                self._decode(row, raw, context)
                rows.append(row)
            except Exception as e:  # noqa: BLE001  mapped to this row's status by _fail
                out[idx] = self._fail(row, e, context)
        outcomes = run_batch([Job(r.prepared, r.callback, r.deadline) for r in rows], self.vgg, self.limits)
        for row, outcome in zip(rows, outcomes):
            if isinstance(outcome, BaseException):
                out[row.idx] = self._fail(row, outcome, context)
            else:
                out[row.idx] = self._respond(row, outcome, context)
        for row in every:
            if row.grpc:
                # TorchServe 0.12.0's GRPCJob.response reads this header for a
                # StreamPredictions call and throws (restarting the worker) when
                # it is missing, as it is on an answer with no progress record
                # before it; Predictions ignores it. Never on HTTP: RestJob
                # would take the answer for the end of a stream that never
                # started and send no status line (the client hangs).
                context.set_response_header(row.idx, TS_STREAM_NEXT, "false")
        _raise_for_grpc(every)
        return out

    # -- one row ------------------------------------------------------------

    def _decode(self, row: "StyleTransferHandler._Row", raw: dict, context: Any) -> None:
        """Parse and validate the fields, set the row's deadline, decode and
        admit its images (URL downloads and decoding count against the budget)."""
        body = _is_json_body(raw, context.get_all_request_header(row.idx))
        request = parse_request(parse_json_body(raw["body"]) if body else raw, self.limits, fetch=self._fetch,
                                multipart=not body)
        row.deadline, row.deadline_field = _client_deadline(request.params, row.taken, row.deadline)
        if request.stream:
            context.set_response_content_type(row.idx, NDJSON)
            # No progress records over gRPC: the frontend sends the worker the
            # same command for Predictions and StreamPredictions, and a
            # Predictions call ends on its first response, so the next one
            # (GRPCJob.response's onNext on a completed call) threw twice and
            # took the model's worker thread down for good. stream=true still
            # answers with the final NDJSON record.
            if not row.grpc:
                def callback(p: Progress) -> None:
                    self.send_intermediate(_progress_line(p), row.idx, context)
                    row.streaming = True
                row.callback = callback
        row.prepared = prepare(request, self.vgg, self.limits, deadline=row.deadline)

    def _respond(self, row: "StyleTransferHandler._Row", output: Output, context: Any) -> bytes:
        idx, stream = row.idx, row.prepared.request.stream
        result = output.result
        total_ms = (time.monotonic() - row.taken) * 1e3
        # The run's facts, once: the headers (X-Steps ...) or the stream's final record carry them.
        facts = {"steps": result.steps, "loss": result.loss, "elapsed_ms": result.elapsed_ms,
                 "decode_ms": output.decode_ms, "encode_ms": output.encode_ms, "total_ms": total_ms,
                 "batch": output.batch, "weights": self.weights_kind, "skipped_steps": result.skipped_steps}
        if stream:
            record = {"done": True, "image": base64.b64encode(output.data).decode("ascii"),
                      "content_type": output.content_type,
                      **{k: round(v, 1) if k.endswith("_ms") else v for k, v in facts.items()}}
            body = (json.dumps(record) + "\n").encode()
        else:
            body = output.data
        if len(body) > self.limits.max_response_bytes:
            err = TooLarge("max_size", f"max_size: the result is {len(body)} bytes, over this server's response "
                                       f"limit of {self.limits.max_response_bytes}; ask for a smaller max_size "
                                       "or format=jpeg")
            return self._fail(row, err, context)
        _record_served(context, result.steps, result.elapsed_ms, output, self.device)
        if not row.streaming:
            # Once a progress record went out, the status line and headers
            # have been sent: TorchServe sends later headers nowhere, so the
            # facts travel in the final record instead (issue #8).
            for key, value in facts.items():
                context.set_response_header(idx, _fact_header(key), _fact_text(key, value))
        if not stream:
            context.set_response_content_type(idx, output.content_type)
        return body

    def _fail(self, row: "StyleTransferHandler._Row", exc: BaseException, context: Any) -> bytes:
        """The one map from what ended a row to its status and message."""
        if isinstance(exc, RequestError):
            err = exc
        elif isinstance(exc, BudgetExceeded):
            early = isinstance(exc, WouldExceedBudget)  # stopped before the deadline, which it could not meet
            field = row.deadline_field
            if field is None:
                what = f"time budget ({self.limits.time_budget_s:g} s) too short" if early else "time budget exceeded"
            else:
                what = f"{field}: the client's deadline " + ("would pass first" if early else "passed")
            err = TimedOut(field, f"{what}: {exc}" + ("; ask for fewer steps or a smaller max_size" if early else ""))
        elif isinstance(exc, Diverged):
            err = InvalidParameter("lr", f"lr: the optimization diverged ({exc}); use a smaller lr")
        elif is_out_of_memory(exc):
            log.warning("request %s ran out of memory: %s", row.request_id, exc)
            free_memory(self.device)
            err = OutOfMemory(None, "out of memory: try a smaller max_size")
        else:  # a bug, not the client's fault: log it, never leak it
            log.error("request %s failed", row.request_id, exc_info=(type(exc), exc, exc.__traceback__))
            err = InternalError(None, "internal error while stylizing; see the server log")
        _record(context, "RejectedRequests", 1, extra=(str(err.code),))
        row.error = err
        return self._error(row, err, context)

    def _error(self, row: "StyleTransferHandler._Row", err: RequestError, context: Any) -> bytes:
        idx = row.idx
        log.info("request %s rejected: %d %s", row.request_id, err.code, err.message)
        if row.streaming:
            # The 200 status went out with the first chunk: report in-band.
            return (json.dumps({"done": True, "error": {"code": err.code, "message": err.message}}) + "\n").encode()
        context.set_response_status(err.code, err.reason, idx)  # fixed ASCII: see nst.errors
        context.set_response_content_type(idx, JSON)
        return json.dumps(err.as_dict()).encode()


def _fact_header(key: str) -> str:
    """A fact's header: "elapsed_ms" -> "X-Elapsed-Ms"."""
    return "X-" + "-".join(word.capitalize() for word in key.split("_"))


def _fact_text(key: str, value: Any) -> str:
    """A fact as its header's text: the loss to 6 significant digits, times
    in whole milliseconds."""
    if key == "loss":
        return f"{value:.6g}"
    return f"{value:.0f}" if key.endswith("_ms") else str(value)


def _raise_for_grpc(rows: list) -> None:
    """Make gRPC errors gRPC errors. TorchServe 0.12.0's GRPCJob ignores a
    row's status (set_response_status) and sends any answer as OK; only a
    failure of the whole batch reaches its sendError, which maps the code to
    a gRPC status (400 INVALID_ARGUMENT, 403 PERMISSION_DENIED, 413
    RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, other 4xx
    FAILED_PRECONDITION, 5xx INTERNAL) with the message as its details. So when every row of the
    batch is a failed gRPC call with the same code and message (a batch of
    one, as a rule), the batch fails with them. A failed call batched with
    other rows keeps the OK answer carrying its JSON error: failing the batch
    would fail its neighbours, or send them another request's message."""
    if not rows or not all(r.grpc and r.error is not None for r in rows):
        return
    if len({(r.error.code, r.error.message) for r in rows}) != 1:
        return
    from ts.utils.util import PredictionException

    raise PredictionException(rows[0].error.message, rows[0].error.code)


def _record(context: Any, name: str, value: float, extra: tuple[str, ...] = ()) -> None:
    """Update one of metrics.yaml's model metrics (dimensions: the model's
    name, "Model", then `extra`). Metrics never fail a request: without
    TorchServe's metrics cache (tests' fake context) or on any error, nothing
    is recorded."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    try:
        from ts.metrics.metric_type_enum import MetricTypes

        kind = MetricTypes.COUNTER if name in COUNTERS else MetricTypes.GAUGE
        metrics.get_metric(name, kind).add_or_update(value, [context.model_name, "Model", *extra])
    except Exception:  # noqa: BLE001  a metrics failure is logged, never the client's problem
        log.warning("metric %s not recorded", name, exc_info=True)


# metrics.yaml's counters; the rest are gauges. A gauge keeps only the last
# request's value, so the counters also add up what averages need:
# rate(OptimizationMsSum) / rate(ServedRequests) is the mean optimization time.
COUNTERS = ("StepsRun", "ServedRequests", "OptimizationMsSum", "RejectedRequests")


def _record_served(context: Any, steps: int, elapsed_ms: float, output: Output, device: torch.device) -> None:
    _record(context, "StepsRun", steps)
    _record(context, "OptimizationMsSum", elapsed_ms)
    _record(context, "ServedRequests", 1)  # after the sum: whoever sees this count sees that sum
    _record(context, "OptimizationMs", elapsed_ms)
    _record(context, "StepsPerSecond", steps / max(elapsed_ms / 1e3, 1e-9))
    _record(context, "DecodeMs", output.decode_ms)
    _record(context, "EncodeMs", output.encode_ms)
    _record(context, "BatchSize", output.batch)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import psutil

        peak = psutil.Process().memory_info().rss
    _record(context, "PeakDeviceMemoryMB", peak / 2**20)


def _reachable(size: tuple[int, int], limits: Limits) -> bool:
    """Whether a request's image can come out at `size` under `limits`."""
    return limits.min_input_side <= min(size) and max(size) <= limits.max_size


def parse_sizes(raw: Any, limits: Limits) -> list[tuple[int, int]]:
    """The model config's `warm_up_sizes`: a list of "WxH" strings (or [w, h]
    pairs), each one a request can reach under `limits` (the device's): a
    size none can reach would only lengthen every worker's start."""
    if not isinstance(raw, (list, tuple)):
        raise ValueError('warm_up_sizes must be a list of "WxH" sizes')
    sizes = []
    for item in raw:
        parts = item if isinstance(item, (list, tuple)) else str(item).lower().split("x")
        try:
            w, h = (int(v) for v in parts)
        except (TypeError, ValueError):
            raise ValueError(f"warm_up_sizes: {item!r} is not a WxH size") from None
        if not _reachable((w, h), limits):
            raise ValueError(f"warm_up_sizes: {item!r} is outside {limits.min_input_side}..{limits.max_size} px, "
                             "the sides a request can reach on this device (limits.min_input_side, max_size)")
        sizes.append((w, h))
    return sizes


def parse_presets(raw: Any) -> list[str]:
    """The model config's `warm_up_presets`: a list of preset names."""
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"warm_up_presets must be a list of presets ({', '.join(PRESETS)})")
    for item in raw:
        if item not in PRESETS:
            raise ValueError(f"warm_up_presets: {item!r} is not a preset ({', '.join(PRESETS)})")
    return list(dict.fromkeys(raw))


def is_grpc(context: Any, idx: int) -> bool:
    """Whether row `idx` came over gRPC (Predictions or StreamPredictions).

    TorchServe 0.12.0 hands the handler one map per row: each input field as
    `{name: {"content-type": ...}}`, then the request-level headers as strings.
    An HTTP prediction carries every HTTP header (InferenceRequestHandler
    copies them all and adds `url_path` and `explain`), a gRPC one none
    (InferenceImpl builds its RequestInput from the fields alone). So a row
    without a single string header is a gRPC call, whatever its fields are
    named. The two gRPC calls look the same: the frontend sends the worker the
    same command byte for both."""
    return not any(isinstance(v, str) for v in context.get_all_request_header(idx).values())


def _show_levels(formatter: logging.Formatter) -> None:
    """`formatter` on the root logger's bare stdout handler, the one
    TorchServe's worker sets up (no other handler: a test's or an
    embedding application's logging stays as it is)."""
    for h in logging.getLogger().handlers:
        if (type(h) is logging.StreamHandler and h.stream is sys.stdout and h.formatter is not None
                and h.formatter._fmt == "%(message)s"):
            h.setFormatter(formatter)


def _share_cpu(limits: Limits) -> None:
    """Set this CPU worker's intra-op threads (Limits.cpu_threads): where it
    is 0, the cores this process may run on divided among TorchServe's worker
    processes now. Logged when it changes."""
    threads = limits.cpu_threads
    if not threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // _worker_processes())
    if threads != torch.get_num_threads():
        log.info("intra-op threads: %d, were %d (cpu_threads %d)", threads, torch.get_num_threads(), limits.cpu_threads)
        torch.set_num_threads(threads)


def _worker_processes() -> int:
    """TorchServe's Python workers: the frontend's children that run
    ts/model_service_worker.py (this one among them); 1 where this process
    is no such worker (the handler's tests)."""
    import psutil

    try:
        siblings = psutil.Process().parent().children()
    except (psutil.Error, AttributeError):  # no parent left
        return 1
    count = 0
    for proc in siblings:
        try:
            count += any(arg.endswith("model_service_worker.py") for arg in proc.cmdline())
        except psutil.Error:  # gone, or not ours to read
            continue
    return max(1, count)


def _is_json_body(row: dict, headers: dict) -> bool:
    """Whether the row is a JSON body: TorchServe's row for a body that is not
    a form is one key, `body`. A form (multipart/form-data, or urlencoded,
    which TorchServe also reads as fields) or a gRPC call whose one field is
    named `body` has that row too: its field is a field like any other (an
    unknown one, 422), never a body that would stand for the request.
    `headers`: the row's request headers (context.get_all_request_header):
    the fields' as {"content-type": ...}, then the HTTP request's as strings,
    none over gRPC."""
    if set(row) != {"body"}:
        return False
    http = {k.lower(): v for k, v in headers.items() if isinstance(v, str)}
    if not http:  # gRPC (see is_grpc)
        return False
    content_type = http.get("content-type", "").strip().lower()
    # Netty reads multipart only with a boundary: without one the body came whole
    return not (content_type.startswith(FORM_URLENCODED)
                or content_type.startswith(MULTIPART) and "boundary=" in content_type)


def _client_deadline(params: Any, taken: float, deadline: float) -> tuple[float, str | None]:
    """The earliest of the server's budget and the client's own deadlines, as a
    `time.monotonic()` value. TorchServe tells a worker nothing of a client that
    hung up or gave up, so a client that says when it stops waiting is the only
    way to drop work nobody waits for: a request still queued past `deadline`
    is refused before any work is done. Returns the deadline and the parameter
    that set it (None for the server's budget)."""
    field = None
    if params.timeout_s is not None and taken + params.timeout_s < deadline:
        deadline, field = taken + params.timeout_s, "timeout_s"
    if params.deadline is not None:
        # The client's wall clock, read now (after this batch's earlier rows
        # and any URL downloads): to monotonic time at this same instant.
        now = time.monotonic()
        left = params.deadline - time.time()
        if left <= 0:
            raise TimedOut("deadline", f"deadline: passed {-left:.1f} s before a worker took the request; not started")
        if now + left < deadline:
            deadline, field = now + left, "deadline"
    return deadline, field


def _progress_line(p: Progress) -> bytes:
    record = {"step": p.step, "steps": p.steps, "loss": p.loss, "elapsed_ms": round(p.elapsed_ms, 1)}
    return (json.dumps(record) + "\n").encode()
