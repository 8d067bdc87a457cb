"""Run a private TorchServe on free localhost ports, for the tests and the benchmark.

The archive is built from this checkout into a temporary model store, and
TorchServe runs with its own cwd, TMPDIR and TEMP, so its key file, logs, pid
file and worker sockets never touch a server that `make serve` started. Token auth stays on.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "handler"))
# one key-file reader, one polling loop
from manage import MODEL, KeyFileError, http, model_workers, read_key, renew_expired_keys, wait_for  # noqa: E402
from nst.weights import FILE_NAME as WEIGHTS_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free localhost ports: every probe socket stays bound until
    all n are picked, so the kernel cannot hand one port out twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class Server:
    inference: str
    management: str
    metrics: str
    grpc_inference: str  # host:port of TorchServe's gRPC InferenceAPIsService
    grpc_management: str  # host:port of its gRPC ManagementAPIsService
    workdir: Path
    env: dict
    token_auth: bool = True  # off as in deploy/kubernetes's pods, where a gateway checks the key

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def key(self, kind: str) -> str:
        return read_key(self.key_file, kind)

    def auth(self, kind: str = "inference") -> dict:
        return {"Authorization": f"Bearer {self.key(kind)}"} if self.token_auth else {}

    def predict(self, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 300)
        headers = {**self.auth(), **kwargs.pop("headers", {})}
        return http("POST", f"{self.inference}/predictions/{MODEL}", headers=headers, **kwargs)

    def describe(self) -> dict:
        r = http("GET", f"{self.management}/models/{MODEL}", headers=self.auth("management"), timeout=30)
        r.raise_for_status()
        return r.json()[0]

    def worker_pids(self) -> list[int]:
        return sorted(w["pid"] for w in self.describe()["workers"])

    def healthy(self) -> bool:
        """/ping is healthy and every worker is READY with a PID (/ping turns
        healthy before a new worker reports its PID)."""
        try:
            if self.token_auth:  # a test's short token_expiration_min may pass before the model loads
                renew_expired_keys(self.key_file, self.management)
            workers, _ = model_workers(self.inference, self.management, self.auth)
        except (OSError, ValueError, KeyError, KeyFileError, requests.RequestException):
            return False  # not listening yet, or the key file is not written yet
        return bool(workers) and all(w["status"] == "READY" and w["pid"] > 0 for w in workers)


def _config(store: Path, ports: dict[str, int], overrides: dict[str, str]) -> str:
    """The repo's config.properties with this server's ports, model store and overrides."""
    text = (ROOT / "config.properties").read_text()
    replace = {**overrides,
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(store),
        "metrics_config": str(ROOT / "metrics.yaml"),
    }
    for key, value in replace.items():
        text, found = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        if not found:
            text += f"{key}={value}\n"
    return text


def _model_config(workdir: Path, overrides: dict) -> Path:
    """handler/model-config.yaml with test-only overrides; `limits` merge key by key."""
    import yaml

    config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    for key, value in overrides.items():
        if key == "limits":
            config.setdefault("limits", {}).update(value)
        else:
            config[key] = value
    path = workdir / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_healthy(server: Server, proc: subprocess.Popen, timeout: float) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"torchserve exited with {proc.returncode}; see {server.workdir}/logs")
        return server.healthy()

    if not wait_for(up, timeout, interval=1):
        raise RuntimeError(f"torchserve not healthy after {timeout} s; see {server.workdir}/logs")


@contextlib.contextmanager
def running_server(
    workdir: Path,
    weights: Path | None = None,
    timeout: float = 300,
    *,
    config: dict[str, str] | None = None,
    model_config: dict | None = None,
) -> Iterator[Server]:
    """Build the archive into `workdir` and serve it there until the block exits.

    `config` overrides config.properties keys, `model_config` the archive's
    model-config.yaml (test-only settings such as a tiny time budget)."""
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "model_store"
    # TMPDIR holds TorchServe's pid file, TEMP (Java's temp dir) its workers'
    # sockets: both its own, never another server's (a socket's path has at
    # most 107 bytes: pytest's and mkdtemp's directories are far shorter).
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", TMPDIR=str(workdir), TEMP=str(workdir))
    weights = weights or ROOT / "weights" / WEIGHTS_FILE
    build_env = dict(env, VENV=str(VENV_BIN.parent), OUT=str(store), WEIGHTS=str(weights))
    if model_config:
        build_env["MODEL_CONFIG"] = str(_model_config(workdir, model_config))
    subprocess.run(
        [str(ROOT / "scripts" / "build_mar.sh")],
        env=build_env,
        check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    ports = dict(zip(names, free_ports(len(names))))
    (workdir / "config.properties").write_text(_config(store, ports, config or {}))
    (workdir / "workflow_store").mkdir(exist_ok=True)  # the shipped relative workflow_store, as serve.sh makes it
    server = Server(
        inference=f"http://127.0.0.1:{ports['inference']}",
        management=f"http://127.0.0.1:{ports['management']}",
        metrics=f"http://127.0.0.1:{ports['metrics']}",
        grpc_inference=f"127.0.0.1:{ports['grpc_inference']}",
        grpc_management=f"127.0.0.1:{ports['grpc_management']}",
        workdir=workdir,
        env=env,
        token_auth=(config or {}).get("disable_token_authorization", "false") != "true",
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
