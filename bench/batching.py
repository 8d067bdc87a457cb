"""Batching measured: the same requests with TorchServe batching on (rows of
one shape share an optimization) and off (`batchSize: 1`).

- Through the real server (CPU, `make bench`): closed-loop clients, each
  sending its next request as soon as its answer arrives, at 1, 4 and 8
  clients; requests per second, p50 and p95 latency, and the X-Batch sizes
  the answers report.
- In-process (a GPU machine has no TorchServe or Java): the handler's batch
  path (`nst.pipeline.run_batch`) on the same rows. The frontend's queue is
  simulated: C clients, each re-submitting on its answer; the worker takes
  up to `batch_size` waiting requests at a time and each batch's duration is
  measured, not modelled. A lone request pays no batching delay in this
  simulation; the server figures include the frontend's maxBatchDelay.
"""
from __future__ import annotations

import concurrent.futures as cf
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nst import Limits, parse_request
from nst.pipeline import Job, prepare, run_batch

CLIENTS = (1, 4, 8)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _summary(latencies: list[float], wall: float, batches: list[int]) -> dict:
    return {"requests": len(latencies), "req_per_s": len(latencies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": _percentile(latencies, 0.95), "mean_batch": statistics.fmean(batches) if batches else 1.0}


def through_server(weights: Path, files: dict, fields: dict, *, batch_sizes=(1, 4), max_batch_delay_ms=25,
                   requests_per_client=3, clients=CLIENTS, log=print) -> dict:
    """Per batch size (the model config's batchSize; maxBatchDelay as given),
    per client count: a real TorchServe on this machine."""
    from local_server import running_server

    out: dict = {"fields": fields, "max_batch_delay_ms": max_batch_delay_ms, "runs": {}}
    for b in batch_sizes:
        config = {"batchSize": b, "maxBatchDelay": max_batch_delay_ms}
        with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp), weights, model_config=config) as srv:
            srv.predict(files=files, data=fields).raise_for_status()  # warm-up
            for c in clients:
                batches: list[int] = []

                def client(_):
                    lat = []
                    for _ in range(requests_per_client):
                        t0 = time.perf_counter()
                        r = srv.predict(files=files, data=fields)
                        r.raise_for_status()
                        lat.append(time.perf_counter() - t0)
                        batches.append(int(r.headers.get("X-Batch", "1")))
                    return lat

                t0 = time.perf_counter()
                with cf.ThreadPoolExecutor(c) as pool:
                    lat = [x for f in [pool.submit(client, i) for i in range(c)] for x in f.result()]
                res = _summary(lat, time.perf_counter() - t0, batches)
                out["runs"][f"{b}/{c}"] = res
                log(f"  batchSize {b}, {c} clients: {res['req_per_s']:.3f} req/s, p50 {res['p50_s']:.2f} s, "
                    f"p95 {res['p95_s']:.2f} s, mean batch {res['mean_batch']:.2f}")
    return out


def in_process(vgg, fields: dict, *, batch_sizes=(1, 4, 8), clients=CLIENTS, rounds=3, limits=None, log=print) -> dict:
    """The handler's batch path on this process's device (see the module doc)."""
    limits = limits or Limits(progress_every=10**6, max_size=4096)
    device = vgg.mean.device

    def run(n: int) -> float:
        jobs = [Job(prepare(parse_request(fields, limits), vgg, limits)) for _ in range(n)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outcomes = run_batch(jobs, vgg, limits)
        if device.type == "cuda":
            torch.cuda.synchronize()
        for o in outcomes:
            if isinstance(o, BaseException):
                raise o
        return time.perf_counter() - t0

    sizes = sorted({min(b, c) for b in batch_sizes for c in clients})
    for n in sizes:
        run(n)  # first run of each batch size: graph capture, allocator
    duration = {n: statistics.median(run(n) for _ in range(rounds)) for n in sizes}
    out: dict = {"fields": {k: v for k, v in fields.items() if k not in ("content", "style")},
                 "batch_s": {str(n): duration[n] for n in sizes}, "runs": {}}
    for b in batch_sizes:
        for c in clients:
            # Closed loop: all C clients submit at t=0; each batch takes the
            # oldest min(b, waiting) requests; an answered client re-submits.
            waiting = [0.0] * c
            now, lat, batches = 0.0, [], []
            while len(lat) < c * rounds:
                take = min(b, len(waiting))
                now = max(now, min(waiting))
                batch = sorted(waiting)[:take]
                for t in batch:
                    waiting.remove(t)
                now += duration[take]
                lat += [now - t for t in batch]
                batches += [take] * take
                waiting += [now] * take
            res = _summary(lat, now, batches)
            out["runs"][f"{b}/{c}"] = res
            log(f"  batch {b}, {c} clients: {res['req_per_s']:.2f} req/s, p50 {res['p50_s']:.3f} s")
    return out


def report(r: dict, title: str) -> list[str]:
    runs = r["runs"]
    sizes = sorted({int(k.split("/")[0]) for k in runs})
    clients = sorted({int(k.split("/")[1]) for k in runs})
    base = sizes[0]
    lines = [f"### {title}", "", "| batch size | clients | req/s | vs batch size "
             f"{base} | p50 | p95 | mean rows per optimization |", "|---|---|---|---|---|---|---|"]
    for b in sizes:
        for c in clients:
            m, ref = runs[f"{b}/{c}"], runs[f"{base}/{c}"]
            lines.append(f"| {b} | {c} | {m['req_per_s']:.3f} | {m['req_per_s'] / ref['req_per_s']:.2f}x "
                         f"| {m['p50_s']:.2f} s | {m['p95_s']:.2f} s | {m['mean_batch']:.2f} |")
    return lines
