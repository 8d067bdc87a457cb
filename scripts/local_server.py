"""Run a private TorchServe on free localhost ports, for the tests and the benchmark.

The archive is built from this checkout into a temporary model store, and
TorchServe runs with its own cwd and TMPDIR, so its key file, logs and pid
file never touch a server that `make serve` started. Token auth stays on.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    inference: str
    management: str
    metrics: str
    workdir: Path
    env: dict

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def key(self, kind: str) -> str:
        return json.loads(self.key_file.read_text())[kind]["key"]

    def auth(self, kind: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.key(kind)}"}

    def predict(self, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 300)
        headers = {**self.auth(), **kwargs.pop("headers", {})}
        return requests.post(f"{self.inference}/predictions/style_transfer", headers=headers, **kwargs)

    def describe(self) -> dict:
        r = requests.get(f"{self.management}/models/style_transfer", headers=self.auth("management"), timeout=30)
        r.raise_for_status()
        return r.json()[0]

    def worker_pids(self) -> list[int]:
        return sorted(w["pid"] for w in self.describe()["workers"])


def _config(store: Path, ports: dict[str, int]) -> str:
    """The repo's config.properties with this server's ports and model store."""
    text = (ROOT / "config.properties").read_text()
    replace = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(store),
    }
    for key, value in replace.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    return text


def _wait_healthy(server: Server, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"torchserve exited with {proc.returncode}; see {server.workdir}/logs")
        try:
            r = requests.get(f"{server.inference}/ping", headers=server.auth(), timeout=5)
            if r.ok and r.json().get("status") == "Healthy":
                return
        except (OSError, ValueError, KeyError, requests.RequestException):
            pass  # not listening yet, or the key file is not written yet
        time.sleep(1)
    raise RuntimeError(f"torchserve not healthy after {timeout} s; see {server.workdir}/logs")


@contextlib.contextmanager
def running_server(workdir: Path, weights: Path | None = None, timeout: float = 300) -> Iterator[Server]:
    """Build the archive into `workdir` and serve it there until the block exits."""
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "model_store"
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", TMPDIR=str(workdir))
    weights = weights or ROOT / "weights" / "vgg19_features.pth"
    subprocess.run(
        [str(ROOT / "scripts" / "build_mar.sh")],
        env=dict(env, VENV=str(VENV_BIN.parent), OUT=str(store), WEIGHTS=str(weights)),
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    ports = {name: free_port() for name in names}
    (workdir / "config.properties").write_text(_config(store, ports))
    server = Server(
        inference=f"http://127.0.0.1:{ports['inference']}",
        management=f"http://127.0.0.1:{ports['management']}",
        metrics=f"http://127.0.0.1:{ports['metrics']}",
        workdir=workdir,
        env=env,
    )
    with open(workdir / "torchserve.out", "wb") as out:
        proc = subprocess.Popen(
            ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(workdir / "config.properties")],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            _wait_healthy(server, proc, timeout)
            yield server
        finally:
            subprocess.run(["torchserve", "--stop"], cwd=workdir, env=env, timeout=120, capture_output=True)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
