"""Faults through the real server, injected with test-only configuration
(strict_server: 3 s time budget, job queue of 2): slow requests, a killed
worker, a full queue, a client that hangs up. The worker must survive, or be
replaced, and every accepted request must get an answer."""
from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.server


def _image(name: str, size: int = 96) -> bytes:
    img = Image.open(ROOT / "examples" / name).convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


FILES = {"content": _image("tubingen.jpg"), "style": _image("starry_night.jpg")}
QUICK = {"steps": "2", "max_size": "32"}
LONG = {"steps": "3000", "max_size": "96"}  # far more than the 3 s budget allows


def _healthy(server, timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.healthy():
            return True
        time.sleep(0.5)
    return False


def test_time_budget_gives_504_and_the_worker_survives(strict_server):
    pids = strict_server.worker_pids()
    r = strict_server.predict(files=FILES, data=LONG)
    assert r.status_code == 504, r.text
    body = r.json()
    assert body["code"] == 504 and "time budget" in body["message"]
    assert strict_server.worker_pids() == pids
    assert strict_server.predict(files=FILES, data=QUICK).status_code == 200


def test_time_budget_in_a_stream_ends_with_an_error_record(strict_server):
    r = strict_server.predict(files=FILES, data={**LONG, "stream": "true"})
    assert r.status_code == 200  # the status went out with the first progress record
    records = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    assert records[0]["step"] == 10
    assert records[-1] == {"done": True, "error": {"code": 504, "message": records[-1]["error"]["message"]}}
    assert "time budget" in records[-1]["error"]["message"]


def test_full_queue_gets_503_and_accepted_requests_complete(strict_server):
    pids = strict_server.worker_pids()
    slow = {"steps": "60", "max_size": "96"}  # a second or two each: the queue fills up
    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: strict_server.predict(files=FILES, data=slow).status_code, range(8)))
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1, codes  # 1 running + 2 queued at most
    assert codes.count(200) >= 1, codes  # and each accepted one finished
    assert strict_server.worker_pids() == pids


def test_client_hanging_up_mid_request_leaves_the_server_healthy(strict_server):
    pids = strict_server.worker_pids()
    url = urlparse(strict_server.inference)
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in {**FILES, **{k: v.encode() for k, v in LONG.items()}}.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n\r\n'.encode()
                     + value + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST /predictions/style_transfer HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Bearer {strict_server.key('inference')}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(head.encode() + body)
    # Gone before any answer. The next request waits for the abandoned one, then succeeds.
    r = strict_server.predict(files=FILES, data=QUICK)
    assert r.status_code == 200
    assert strict_server.worker_pids() == pids


def test_killed_worker_fails_its_request_and_is_replaced(strict_server):
    old = strict_server.worker_pids()
    with strict_server.predict(files=FILES, data={**LONG, "stream": "true"}, stream=True) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line))
        assert first["step"] == 10  # the worker is mid-optimization now
        os.kill(old[0], signal.SIGKILL)
        rest = [_record(line) for line in _drain(lines)]
    assert not any(rec.get("done") and "image" in rec for rec in rest)  # never a success
    # A request sent while the worker is down is queued and served after the restart.
    after = strict_server.predict(files=FILES, data=QUICK, timeout=300)
    assert after.status_code == 200
    assert _healthy(strict_server)
    assert strict_server.worker_pids() != old


def _record(line: bytes) -> dict:
    try:
        record = json.loads(line)
    except ValueError:
        return {"raw": line}  # whatever the frontend writes into a broken stream
    return record if isinstance(record, dict) else {"raw": record}


def _drain(lines):
    try:
        for line in lines:
            if line:
                yield line
    except requests.RequestException:
        return  # the server closed the broken stream


def test_request_over_the_memory_budget_is_507_before_allocating(strict_server):
    """strict_server's budget is 300 MiB: a 1024 px optimization is estimated far above it."""
    pids = strict_server.worker_pids()
    big = (ROOT / "examples" / "tubingen.jpg").read_bytes()
    r = strict_server.predict(files={"content": big, "style": FILES["style"]}, data={"max_size": "1024"})
    assert r.status_code == 507, r.text
    assert r.json()["message"].startswith("max_size")
    assert strict_server.worker_pids() == pids
    assert strict_server.predict(files=FILES, data=QUICK).status_code == 200
