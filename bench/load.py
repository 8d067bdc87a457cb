#!/usr/bin/env python3
"""`make load`: N concurrent clients for a fixed time against a private server,
with a share of bad requests, on tiny images.

Every request has an expected status (200 for good ones, the contract's 4xx
for each kind of bad one); anything else counts as unexpected. Reports the
status histogram, p50/p95 latency, worker restarts (PID changes seen by the
management API) and the worker's RSS at start and end; writes
bench/load_results.json and docs/LOAD.md.
"""
from __future__ import annotations

import argparse
import base64
import collections
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from example_images import thumbnail  # noqa: E402
from local_server import running_server  # noqa: E402


CONTENT = thumbnail("tubingen.jpg", 48)
STYLE = thumbnail("starry_night.jpg", 48)
GOOD = {"steps": "5", "max_size": "48"}

IMAGES_JSON = f'"content": "{base64.b64encode(CONTENT).decode()}", "style": "{base64.b64encode(STYLE).decode()}"'


def raw_json(s, members: str):
    """A JSON body written out: no Python object nests this deep or holds these literals."""
    return s.predict(data=("{" + members + "}").encode(), headers={"Content-Type": "application/json"})


# kind -> (expected status, how to send it)
BAD = {
    "not_an_image": (415, lambda s: s.predict(files={"content": b"hello", "style": STYLE}, data=GOOD)),
    "truncated": (400, lambda s: s.predict(files={"content": CONTENT[:100], "style": STYLE}, data=GOOD)),
    "unknown_param": (422, lambda s: s.predict(files={"content": CONTENT, "style": STYLE}, data={**GOOD, "stepz": "5"})),
    "steps_out_of_range": (422, lambda s: s.predict(files={"content": CONTENT, "style": STYLE}, data={"steps": "0"})),
    "missing_style": (400, lambda s: s.predict(files={"content": CONTENT}, data=GOOD)),
    "bad_base64": (400, lambda s: s.predict(json={"content": "%%%", "style": base64.b64encode(STYLE).decode()})),
    # once 500s: RecursionError and OverflowError in parsing
    "deep_nesting_field": (422, lambda s: s.predict(
        files={"content": CONTENT, "style": STYLE}, data={**GOOD, "style_layer_weights": "[" * 5000})),
    "deep_nesting_body": (400, lambda s: s.predict(data=b"[" * 200_000, headers={"Content-Type": "application/json"})),
    "huge_int_lr": (422, lambda s: raw_json(s, f'{IMAGES_JSON}, "lr": 1{"0" * 400}')),
    "huge_int_layer_weight": (422, lambda s: raw_json(
        s, f'{IMAGES_JSON}, "style_layer_weights": {{"conv1_1": 1{"0" * 400}}}')),
    "huge_int_steps_5000_digits": (422, lambda s: raw_json(s, f'{IMAGES_JSON}, "steps": {"9" * 5000}')),
}


def good(server):
    if random.random() < 0.5:
        return server.predict(files={"content": CONTENT, "style": STYLE}, data=GOOD)
    body = {"content": base64.b64encode(CONTENT).decode(), "style": base64.b64encode(STYLE).decode(),
            "steps": 5, "max_size": 48}
    return server.predict(json=body)


def run(args) -> dict:
    random.seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp)) as server:
        pid0 = server.worker_pids()[0]
        for _ in range(3):  # warm-up: caches and allocator pools fill once, not per request
            good(server).raise_for_status()
        rss_start = psutil.Process(pid0).memory_info().rss
        pids_seen = {pid0}
        records: list[tuple[str, int, int, float]] = []  # kind, expected, got, seconds
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                if rng.random() < args.bad_share:
                    kind = rng.choice(sorted(BAD))
                    expected, send = BAD[kind]
                else:
                    kind, expected, send = "good", 200, good
                t0 = time.perf_counter()
                try:
                    status = send(server).status_code
                except requests.RequestException:
                    status = -1  # no answer at all
                with lock:
                    records.append((kind, expected, status, time.perf_counter() - t0))

        threads = [threading.Thread(target=client, args=(args.seed + i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            pids_seen.update(server.worker_pids())
            time.sleep(1)
        pids_seen.update(server.worker_pids())
        final_pid = server.worker_pids()[0]
        rss_end = psutil.Process(final_pid).memory_info().rss

    latencies = [r[3] for r in records if r[0] == "good" and r[2] == 200]
    unexpected = [r for r in records if r[1] != r[2]]
    histogram = collections.Counter(str(r[2]) for r in records)
    return {
        "clients": args.clients, "seconds": args.seconds, "bad_share": args.bad_share, "bad_kinds": len(BAD),
        "requests": len(records),
        "completed_as_expected": len(records) - len(unexpected),
        "unexpected": len(unexpected),
        "unexpected_5xx": sum(1 for r in unexpected if r[2] >= 500 or r[2] < 0),
        "unexpected_examples": [{"kind": k, "expected": e, "got": g} for k, e, g, _ in unexpected[:10]],
        "status_histogram": dict(sorted(histogram.items())),
        "by_kind": dict(collections.Counter(r[0] for r in records)),
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 20 else None,
        "worker_restarts": len(pids_seen) - 1,
        "worker_rss_start_mib": rss_start / 2**20,
        "worker_rss_end_mib": rss_end / 2**20,
    }


def report(r: dict, machine: str) -> str:
    p95 = f"{r['p95_s']:.2f}" if r["p95_s"] is not None else "n/a"
    p50 = f"{r['p50_s']:.2f}" if r["p50_s"] is not None else "n/a"
    lines = [
        "# Load test",
        "",
        "Written by `make load` (bench/load.py); do not edit by hand.",
        "",
        f"- Machine: {machine}",
        f"- {r['clients']} concurrent clients for {r['seconds']:.0f} s, {r['bad_share']:.0%} bad requests "
        f"({r['bad_kinds']} kinds), good ones 48 px / 5 steps, multipart and JSON; 1 worker.",
        "",
        "| measure | result |",
        "|---|---|",
        f"| requests | {r['requests']} |",
        f"| answered as expected | {r['completed_as_expected']} |",
        f"| unexpected answers | {r['unexpected']} (5xx or none: {r['unexpected_5xx']}) |",
        f"| status histogram | {', '.join(f'{k}: {v}' for k, v in r['status_histogram'].items())} |",
        f"| good requests p50 / p95 latency, s | {p50} / {p95} |",
        f"| worker restarts | {r['worker_restarts']} |",
        f"| worker RSS after warm-up -> end, MiB | {r['worker_rss_start_mib']:.0f} -> {r['worker_rss_end_mib']:.0f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--bad-share", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "load_results.json"))
    ap.add_argument("--report", default=str(ROOT / "docs" / "LOAD.md"))
    args = ap.parse_args(argv)
    results = run(args)
    sys.path.insert(0, str(ROOT / "bench"))
    from run import machine

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    text = report(results, machine())
    Path(args.report).write_text(text)
    print(text)
    return 0 if results["unexpected"] == 0 and results["worker_restarts"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
