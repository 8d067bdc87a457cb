"""Through the real server: real HTTP, real archive, token auth on."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from example_images import thumbnail
from local_server import free_port, free_ports
from nst import weights

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The kind of the weights the archive bundles (make builds it from weights/):
# random offline, as in CI, imagenet where `make` could download them.
ARCHIVED = weights.kind_of(ROOT / "weights" / weights.FILE_NAME)

pytestmark = pytest.mark.server


CONTENT = thumbnail("tubingen.jpg", 96)  # 96x72
STYLE = thumbnail("starry_night.jpg", 96, "JPEG")


def _png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img


def test_multipart_returns_png_of_right_size(server):
    r = server.predict(files={"content": CONTENT, "style": STYLE}, data={"steps": "3", "max_size": "64"})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "image/png"
    assert _png(r.content).size == (64, 48)
    assert r.headers["X-Steps"] == "3"
    assert float(r.headers["X-Loss"]) > 0
    assert int(r.headers["X-Elapsed-Ms"]) >= 0
    assert r.headers["X-Weights"] == ARCHIVED
    assert r.headers["X-Skipped-Steps"] == "0"  # float16 overflows: none on the CPU, in bf16 then float32


def test_json_base64_request(server):
    body = {
        "content": base64.b64encode(CONTENT).decode(),
        "style": "data:image/jpeg;base64," + base64.b64encode(STYLE).decode().rstrip("="),
        "steps": 2,
        "max_size": 40,
        "seed": 7,
    }
    r = server.predict(json=body)
    assert r.status_code == 200, r.text
    assert _png(r.content).size == (40, 30)


def test_seed_is_reproducible_through_http(server):
    fields = {"steps": "2", "max_size": "32", "init": "noise", "seed": "11"}
    a = server.predict(files={"content": CONTENT, "style": STYLE}, data=fields)
    b = server.predict(files={"content": CONTENT, "style": STYLE}, data=fields)
    assert a.status_code == b.status_code == 200
    assert a.content == b.content


@pytest.mark.parametrize(
    "files, data, code, field",
    [
        ({"style": STYLE}, {}, 400, "content"),
        ({"content": CONTENT}, {}, 400, "style"),
        ({"content": b"this is not an image", "style": STYLE}, {}, 415, "content"),
        ({"content": CONTENT[: len(CONTENT) // 2], "style": STYLE}, {}, 400, "content"),
        ({"content": CONTENT, "style": STYLE}, {"stepz": "3"}, 422, "stepz"),
        ({"content": CONTENT, "style": STYLE}, {"steps": "0"}, 422, "steps"),
        ({"content": CONTENT, "style": STYLE}, {"steps": "999999"}, 422, "steps"),
        ({"content": CONTENT, "style": STYLE}, {"lr": "nan"}, 422, "lr"),
        ({"content": CONTENT, "style": STYLE}, {"preset": "slow"}, 422, "preset"),
    ],
)
def test_bad_requests_get_contract_errors_and_worker_survives(server, files, data, code, field):
    pids = server.worker_pids()
    r = server.predict(files=files, data=data)
    assert r.status_code == code, r.text
    body = r.json()
    assert body["code"] == code and body["type"]
    assert body["message"].startswith(field)
    assert "Traceback" not in r.text and "/" not in body["message"]
    assert server.worker_pids() == pids


def test_the_worker_log_names_a_refused_request_by_the_clients_x_request_id(server):
    """TorchServe answers every HTTP request with its id (x-request-id); the
    worker logs a refused or failed request by that id, so an operator can
    find a client's complaint in the model log. The handler's and the core's
    lines carry their level (the frontend stamps every worker line INFO)."""
    ok = server.predict(files={"content": CONTENT, "style": STYLE}, data={"steps": "1", "max_size": "32"})
    refused = server.predict(files={"content": CONTENT, "style": STYLE}, data={"steps": "0"})
    assert ok.status_code == 200 and refused.status_code == 422
    ids = ok.headers["x-request-id"], refused.headers["x-request-id"]
    assert len(set(ids)) == 2 and all(re.fullmatch(r"[0-9a-f-]{36}", i) for i in ids)  # UUIDs
    line = f"MODEL_LOG - INFO style_transfer_handler: request {ids[1]} rejected: 422 steps: 0 is out of range"
    log = server.workdir / "logs" / "model_log.log"
    waited = time.monotonic() + 30  # the frontend copies the worker's output into the log
    while line not in log.read_text() and time.monotonic() < waited:
        time.sleep(0.2)
    assert line in log.read_text()
    assert ok.headers["X-Weights"] == ARCHIVED
    if ARCHIVED == "random":  # offline, as in CI: the worker warned at start
        assert "MODEL_LOG - WARNING nst.weights: VGG19 weights are RANDOM" in log.read_text()


def _checkout(root: Path, ports: dict[str, int]) -> Path:
    """What scripts/serve.sh needs of a checkout, at `root`, its
    config.properties serving on `ports` (none of the shipped ones)."""
    (root / "scripts").mkdir(parents=True)
    (root / "model_store").mkdir()
    for name in ("scripts/serve.sh", "scripts/manage.py", "metrics.yaml"):
        shutil.copy(ROOT / name, root / name)
    (root / "model_store" / "style_transfer.mar").symlink_to(ROOT / "model_store" / "style_transfer.mar")
    text = (ROOT / "config.properties").read_text()
    for key, port in ports.items():
        value = f"http://127.0.0.1:{port}" if key.endswith("address") else str(port)
        text, found = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        assert found, key
    (root / "config.properties").write_text(text)
    return root


def test_serve_script_serves_its_config_ports_stops_only_its_own_server_and_frees_its_callers_output(tmp_path):
    """scripts/serve.sh, as `make serve`, `make demo` and `make stop` run it,
    in a checkout whose config.properties names other ports than the shipped
    ones, its output read through pipes as `make demo | tee log` reads it.
    - It once waited for and printed 8080/8081 whatever config.properties said
      (a start on other ports failed after 300 s, its server left running).
    - `stop` once stopped whichever server TorchServe's pid file in the shared
      TMPDIR named: another checkout's; here a second checkout's stop leaves
      the first one's server up.
    - The JVM once inherited the launcher's stderr, so such a pipe stayed
      open, and the caller waited, until the server stopped."""
    names = ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
             "grpc_management_port")
    picked = free_ports(2 * len(names))
    ports = dict(zip(names, picked))
    first = _checkout(tmp_path / "first", ports)
    second = _checkout(tmp_path / "second", dict(zip(names, picked[len(names):])))
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP")}
    env["VENV"] = str(Path(sys.executable).parents[1])

    def serve(checkout: Path, command: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(checkout / "scripts" / "serve.sh"), command], env=env,
                              capture_output=True, text=True, timeout=timeout)

    try:
        started = serve(first, "start", 400)
        assert started.returncode == 0, started.stdout + started.stderr
        inference, management = (f"http://127.0.0.1:{ports[k]}" for k in ("inference_address", "management_address"))
        assert f"TorchServe is up: inference {inference}, management {management}" in started.stdout
        status = serve(first, "status", 60)
        assert status.returncode == 0 and json.loads(status.stdout)[0]["workers"], status.stdout + status.stderr
        other = serve(second, "stop", 120)  # no server of its own
        assert serve(first, "status", 60).returncode == 0, other.stdout + other.stderr
    finally:
        stopped = serve(first, "stop", 120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    manage = [sys.executable, str(ROOT / "scripts" / "manage.py"), "ports-free", "config.properties"]
    assert subprocess.run(manage, cwd=first).returncode == 0


def test_malformed_json_body_is_400(server):
    pids = server.worker_pids()
    r = server.predict(data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["message"].startswith("body")
    assert server.worker_pids() == pids


def test_stream_sends_progress_then_image(server):
    r = server.predict(
        files={"content": CONTENT, "style": STYLE}, data={"steps": "20", "max_size": "48", "stream": "true"}
    )
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    progress, final = records[:-1], records[-1]
    assert [p["step"] for p in progress] == [10, 20]
    assert all(p["steps"] == 20 and p["loss"] > 0 for p in progress)
    assert final["done"] is True and final["steps"] == 20 and final["weights"] == ARCHIVED
    assert final["skipped_steps"] == 0
    assert _png(base64.b64decode(final["image"])).size == (48, 36)
    # The facts travel in the final record: headers set after the first chunk never arrive.
    assert final["loss"] > 0 and final["total_ms"] >= final["elapsed_ms"] and final["batch"] == 1
    assert not any(k.startswith("X-") for k in r.headers)


def test_no_or_wrong_token_is_refused(server):
    pids = server.worker_pids()
    url = f"{server.inference}/predictions/style_transfer"
    r = requests.post(url, files={"content": CONTENT, "style": STYLE}, timeout=30)
    assert r.status_code == 400 and "Token" in r.json()["message"]
    r = requests.post(url, files={"content": CONTENT, "style": STYLE},
                      headers={"Authorization": "Bearer wrongkey"}, timeout=30)
    assert r.status_code == 400
    r = requests.get(f"{server.management}/models", timeout=30)
    assert r.status_code == 400
    assert server.worker_pids() == pids


def test_model_registration_api_is_off(server):
    r = requests.post(f"{server.management}/models", params={"url": "x.mar"},
                      headers=server.auth("management"), timeout=30)
    assert r.status_code == 405


def _metric(server, name: str, **labels) -> float:
    """The sum of `name`'s samples on the Prometheus endpoint whose labels include `labels`."""
    import re

    text = requests.get(f"{server.metrics}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _wait_metric(server, name: str, expected: float, **labels) -> float:
    """Backend metrics reach the endpoint a moment after the answer (the worker logs them)."""
    import time

    for _ in range(100):
        value = _metric(server, name, **labels)
        if value >= expected:
            return value
        time.sleep(0.1)
    return value


def _settled(server, name: str, quiet_s: float = 1.0) -> None:
    """Until `name` has kept one value for `quiet_s` (the worker's metric
    lines reach the frontend asynchronously, after the answer)."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + 30
    while time.monotonic() < deadline:
        value = _metric(server, name, ModelName="style_transfer")
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)


def test_prometheus_metrics_count_steps_and_rejections(server):
    """metrics.yaml's model metrics on :8082/metrics: a request of N steps
    raises StepsRun by exactly N, ServedRequests by 1 and OptimizationMsSum by
    its X-Elapsed-Ms; a rejected one RejectedRequests of its code."""
    _settled(server, "StepsRun")  # an earlier test's metric lines may still be on their way
    steps0 = _metric(server, "StepsRun", ModelName="style_transfer")
    served0 = _metric(server, "ServedRequests", ModelName="style_transfer")
    optimizing0 = _metric(server, "OptimizationMsSum", ModelName="style_transfer")
    rejected0 = _metric(server, "RejectedRequests", ModelName="style_transfer", Code="422")
    r = server.predict(files={"content": CONTENT, "style": STYLE}, data={"steps": "7", "max_size": "32"})
    assert r.status_code == 200
    assert _wait_metric(server, "StepsRun", steps0 + 7, ModelName="style_transfer") == steps0 + 7
    assert _wait_metric(server, "ServedRequests", served0 + 1, ModelName="style_transfer") == served0 + 1
    optimized = _metric(server, "OptimizationMsSum", ModelName="style_transfer") - optimizing0
    assert abs(optimized - int(r.headers["X-Elapsed-Ms"])) <= 1  # the header is rounded to whole ms
    r = server.predict(files={"content": CONTENT, "style": STYLE}, data={"steps": "-3"})
    assert r.status_code == 422
    after = _wait_metric(server, "RejectedRequests", rejected0 + 1, ModelName="style_transfer", Code="422")
    assert after == rejected0 + 1
    assert _metric(server, "StepsRun", ModelName="style_transfer") == steps0 + 7  # a rejection runs no step
    for name in ("OptimizationMs", "StepsPerSecond", "DecodeMs", "EncodeMs", "PeakDeviceMemoryMB", "BatchSize"):
        assert re.search(rf"^{name}\{{", requests.get(f"{server.metrics}/metrics", timeout=30).text, re.M), name


def _script(server, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=server.workdir, env=server.env, capture_output=True, text=True, timeout=600,
    )


def test_stylize_cli_server_mode(server, tmp_path):
    (tmp_path / "c.png").write_bytes(CONTENT)
    (tmp_path / "s.jpg").write_bytes(STYLE)
    out = tmp_path / "out.png"
    p = _script(server, "stylize.py", str(tmp_path / "c.png"), str(tmp_path / "s.jpg"), "-o", str(out),
                "--server", server.inference, "--steps", "10", "--max-size", "40")
    assert p.returncode == 0, p.stderr
    assert "step 10/10" in p.stderr
    assert _png(out.read_bytes()).size == (40, 30)
    bad = _script(server, "stylize.py", str(tmp_path / "c.png"), str(tmp_path / "s.jpg"), "-o", str(out),
                  "--server", server.inference, "--steps", "-1")
    # the error's message alone, not its JSON, and the id the model log names the request by
    assert bad.returncode == 1
    assert re.fullmatch(r"error 422: steps: -1 is out of range \[1, 3000\] \(request [0-9a-f-]{36}\)\n",
                        bad.stderr), bad.stderr


def test_stylize_cli_draws_a_bar_on_a_terminal_and_is_silent_when_quiet(server, tmp_path):
    """stdout a pseudo-terminal: a tqdm bar fed by the stream (20 steps,
    records at 10 and 20); --quiet: nothing at all on either stream."""
    import os
    import pty

    (tmp_path / "c.png").write_bytes(CONTENT)
    (tmp_path / "s.jpg").write_bytes(STYLE)
    args = [sys.executable, str(ROOT / "scripts" / "stylize.py"), str(tmp_path / "c.png"), str(tmp_path / "s.jpg"),
            "-o", str(tmp_path / "out.png"), "--server", server.inference, "--steps", "20", "--max-size", "32"]
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100x24 terminal
    proc = subprocess.Popen(args, cwd=server.workdir, env=server.env, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, err = proc.communicate(timeout=300)
    os.close(leader)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, err
    assert "20/20" in terminal and ("step/s" in terminal or "s/step" in terminal), terminal
    assert "loss=" in terminal and "\r" in terminal  # redrawn in place
    assert b"step 10/20" not in err  # no plain lines beside the bar

    quiet = _script(server, "stylize.py", *args[2:], "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert _png((tmp_path / "out.png").read_bytes()).size == (32, 24)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_readme_curl_example(server, tmp_path):
    (tmp_path / "content.png").write_bytes(CONTENT)
    (tmp_path / "style.jpg").write_bytes(STYLE)
    token = server.key("inference")
    # The README's example, with this test server's port and tiny settings.
    cmd = (f'curl -sf -H "Authorization: Bearer {token}" -F content=@content.png -F style=@style.jpg '
           f'-F steps=3 -F max_size=32 {server.inference}/predictions/style_transfer -o out.png')
    subprocess.run(cmd, shell=True, cwd=tmp_path, check=True, timeout=300)
    assert _png((tmp_path / "out.png").read_bytes()).size == (32, 24)


def test_scale_workers_with_manage_script(server):
    """Two workers after `scale 2`, and the CPU's cores shared between them
    (limits.cpu_threads 0): the worker that serves the next request logs its
    intra-op threads, half the cores each."""
    import os

    common = ["--management", server.management, "--inference", server.inference,
              "--key-file", str(server.key_file)]
    log = server.workdir / "logs" / "model_log.log"
    try:
        p = _script(server, "manage.py", *common, "scale", "2")
        assert p.returncode == 0, p.stdout + p.stderr
        p = _script(server, "manage.py", *common, "describe")
        assert p.returncode == 0
        described = json.loads(p.stdout)[0]
        assert described["minWorkers"] == 2
        assert len(described["workers"]) == 2
        r = server.predict(files={"content": CONTENT, "style": STYLE}, data={"steps": "1", "max_size": "32"})
        assert r.status_code == 200
        cores = len(os.sched_getaffinity(0))
        if cores > 1:  # one core: one thread each, as before, and nothing to log
            assert f"intra-op threads: {max(1, cores // 2)}, were {cores}" in log.read_text()
    finally:
        _script(server, "manage.py", *common, "scale", "1")
    assert len(server.describe()["workers"]) == 1


def test_an_expired_inference_key_fails_the_health_check_unless_it_renews_it(tmp_path):
    """Keys expire after token_expiration_min (60 in the shipped config; 0.05,
    3 s, here), and the Docker HEALTHCHECK pings with the key file's
    inference key: without renewal the image turned unhealthy an hour after
    it started, on a healthy server. `wait --renew-expired` renews only an
    expired key (TorchServe rewrites the key file) and then pings."""
    from local_server import running_server
    from manage import key_expired, read_key, wait_for

    with running_server(tmp_path / "ts", config={"token_expiration_min": "0.05"}) as server:
        common = ("--inference", server.inference, "--management", server.management,
                  "--key-file", str(server.key_file))
        assert wait_for(lambda: key_expired(server.key_file, "inference"), 30)
        old = read_key(server.key_file, "inference")
        refused = requests.get(f"{server.inference}/ping", headers={"Authorization": f"Bearer {old}"}, timeout=10)
        assert refused.status_code != 200, refused.text  # an expired key is refused, however healthy the model
        p = _script(server, "manage.py", *common, "--timeout", "2", "wait")
        assert p.returncode == 1 and "not healthy" in p.stderr
        old_management = read_key(server.key_file, "management")
        p = _script(server, "manage.py", *common, "--timeout", "30", "wait", "--renew-expired")
        assert p.returncode == 0, p.stderr
        # both renewed: wait asks the management API for a READY worker too
        assert read_key(server.key_file, "inference") != old
        assert read_key(server.key_file, "management") != old_management


def test_manage_wait_returns_once_healthy_and_fails_naming_why(server):
    """`manage.py wait` (scripts/serve.sh, the Docker HEALTHCHECK): 0 at once
    on a healthy server; 1 after its timeout where nothing answers."""
    from local_server import free_port

    p = _script(server, "manage.py", "--inference", server.inference, "--key-file", str(server.key_file),
                "--timeout", "30", "wait")
    assert p.returncode == 0, p.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    p = _script(server, "manage.py", "--inference", nobody, "--key-file", str(server.key_file), "--timeout", "2", "wait")
    assert p.returncode == 1
    assert "not healthy after 2.0 s" in p.stderr
