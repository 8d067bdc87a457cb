"""A real TorchServe, built from this checkout, on free localhost ports, token auth on.

The archive is rebuilt into a temporary model store with scripts/build_mar.sh
(so the server runs the code under test), and TorchServe runs with its own
cwd and TMPDIR: its key file, logs and pid file never touch a server that
`make serve` started.
"""
from __future__ import annotations

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

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
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

    def log_text(self) -> str:
        logs = self.workdir / "logs"
        return "\n".join(p.read_text(errors="replace") for p in logs.glob("*.log")) if logs.exists() else ""


def _wait_healthy(server: Server, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"torchserve exited with {proc.returncode}")
        try:
            r = requests.get(f"{server.inference}/ping", headers=server.auth(), timeout=5)
            if r.ok and r.json().get("status") == "Healthy":
                return
        except (OSError, ValueError, KeyError, requests.RequestException):
            pass
        time.sleep(1)
    raise RuntimeError("torchserve did not become healthy in time")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("torchserve")
    store = workdir / "model_store"
    venv = VENV_BIN.parent
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", TMPDIR=str(workdir))
    subprocess.run(
        [str(ROOT / "scripts" / "build_mar.sh")],
        env=dict(env, VENV=str(venv), OUT=str(store), WEIGHTS=str(ROOT / "weights" / "vgg19_features.pth")),
        check=True,
        cwd=ROOT,
    )
    ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc_i", "grpc_m")}
    config = (ROOT / "config.properties").read_text()
    config = re.sub(r"^inference_address=.*$", f"inference_address=http://127.0.0.1:{ports['inference']}", config, flags=re.M)
    config = re.sub(r"^management_address=.*$", f"management_address=http://127.0.0.1:{ports['management']}", config, flags=re.M)
    config = re.sub(r"^metrics_address=.*$", f"metrics_address=http://127.0.0.1:{ports['metrics']}", config, flags=re.M)
    config = re.sub(r"^grpc_inference_port=.*$", f"grpc_inference_port={ports['grpc_i']}", config, flags=re.M)
    config = re.sub(r"^grpc_management_port=.*$", f"grpc_management_port={ports['grpc_m']}", config, flags=re.M)
    config = re.sub(r"^model_store=.*$", f"model_store={store}", config, flags=re.M)
    assert "disable_token_authorization=false" in config  # the shipped config keeps auth on
    (workdir / "config.properties").write_text(config)

    srv = Server(
        inference=f"http://127.0.0.1:{ports['inference']}",
        management=f"http://127.0.0.1:{ports['management']}",
        metrics=f"http://127.0.0.1:{ports['metrics']}",
        workdir=workdir,
        env=env,
    )
    out = open(workdir / "torchserve.out", "wb")
    proc = subprocess.Popen(
        ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", str(workdir / "config.properties")],
        cwd=workdir,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_healthy(srv, proc, timeout=300)
        yield srv
    finally:
        subprocess.run(["torchserve", "--stop"], cwd=workdir, env=env, timeout=120, capture_output=True)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        out.close()
