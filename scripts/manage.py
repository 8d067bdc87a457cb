#!/usr/bin/env python3
"""Manage the running style_transfer model through TorchServe's management API.

  manage.py describe          workers, their status and PIDs, queue
  manage.py scale N           set the worker count to N (waits until done)
  manage.py wait              block until /ping is healthy and a worker READY (or --timeout s);
                              --renew-expired: renew an expired inference or management key first
  manage.py key inference|management|API   print a key from key_file.json
  manage.py k8s-secret        print a Kubernetes Secret with a new random
                              inference key for deploy/ (kubectl apply -f -)
  manage.py address inference|management   print the address used (see --config)
  manage.py ports-free FILE   fail, naming it, where a port FILE (config.properties)
                              serves on is taken (scripts/serve.sh, before a start)

The addresses come from ./config.properties where there is one (the repo
root), or from --config FILE; --management / --inference name them outright;
else 127.0.0.1:8081 / 127.0.0.1:8080.

Keys come from the key_file.json TorchServe writes at start (token
authorization is on): the management key for management calls, the
inference key for /ping and predictions. A failure is one line on stderr
(exit 1; 2 for a key file that is missing or not TorchServe's), never a
traceback.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import requests

MODEL = "style_transfer"


class KeyFileError(Exception):
    """The key file is missing or holds no such key: said in one line."""


def _key_entry(key_file: str | Path, kind: str) -> dict:
    path = Path(key_file)
    try:
        entry = json.loads(path.read_text())[kind]
        if not isinstance(entry, dict) or "key" not in entry:
            raise KeyError(kind)
        return entry
    except FileNotFoundError:
        raise KeyFileError(
            f"no key file at {path}: TorchServe writes key_file.json in the directory it was started "
            "from (the repo root for make serve); pass --key-file") from None
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{path} holds no {kind} key: not a key file TorchServe wrote?") from None


def read_key(key_file: str | Path, kind: str) -> str:
    """`kind` is inference, management or API."""
    return _key_entry(key_file, kind)["key"]


def key_expired(key_file: str | Path, kind: str) -> bool:
    """Whether the key file says `kind`'s key has expired (token_expiration_min
    after it was made; the API key never expires)."""
    stamp = _key_entry(key_file, kind).get("expiration time")
    if not stamp:
        return False
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) <= datetime.now(timezone.utc)


def http(method: str, url: str, **kwargs) -> requests.Response:
    """requests.request, without the environment's proxies where `url` is on
    this machine: HTTP_PROXY with no NO_PROXY entry for 127.0.0.1 sent the
    requests to the local TorchServe, their bearer keys included, through
    the proxy. Another host's URL goes as the environment says."""
    host = urlsplit(url).hostname or ""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if local:
        kwargs.setdefault("proxies", {"http": None, "https": None})
    return requests.request(method, url, **kwargs)


def auth(key_file: str | Path, kind: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {read_key(key_file, kind)}"}


def error_message(body: str) -> object:
    """What a refusal says: its JSON error's `message` (TorchServe's and the
    handler's errors have one), else the answer's text."""
    try:
        error = json.loads(body)
    except ValueError:
        return body
    return error["message"] if isinstance(error, dict) and "message" in error else body


def _refused(r: requests.Response, args) -> int:
    """A management call TorchServe refused, as one line on stderr: its
    message, and where it went (a wrong key is often the right key of
    another server)."""
    print(f"error HTTP {r.status_code} from {args.management}: {' '.join(str(error_message(r.text)).split())[:300]}",
          file=sys.stderr)
    return 1


def describe(args) -> int:
    r = http("GET", f"{args.management}/models/{MODEL}", headers=auth(args.key_file, "management"), timeout=30)
    if not r.ok:
        return _refused(r, args)
    try:
        print(json.dumps(r.json(), indent=2))
    except ValueError:  # not TorchServe answering (another service on the port, a gateway's page)
        print(f"HTTP {r.status_code}, not JSON: {r.text.strip()[:200]}", file=sys.stderr)
        return 1
    return 0


def scale(args) -> int:
    r = http(
        "PUT", f"{args.management}/models/{MODEL}",
        params={"min_worker": args.workers, "max_worker": args.workers, "synchronous": "true"},
        headers=auth(args.key_file, "management"),
        timeout=args.timeout,
    )
    if not r.ok:
        return _refused(r, args)
    print(r.text.strip())
    return 0


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False),
    trying at least once: the scripts' and tests' one polling loop."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))  # the last try at the deadline


def renew_expired_key(key_file: str | Path, management: str, kind: str = "inference") -> None:
    """Where the key file's `kind` key (inference or management) has expired,
    have TorchServe make a new one (it rewrites the key file) with the API
    key, which never expires. Nobody holds a valid key of that kind then, so
    no client loses one; without this a health check that pings with the key
    file's key fails for good token_expiration_min after the start, on a
    healthy server."""
    if not key_expired(key_file, kind):
        return
    r = http("GET", f"{management}/token", params={"type": kind}, headers=auth(key_file, "API"), timeout=10)
    if not r.ok:
        raise KeyFileError(f"the {kind} key expired and renewing it failed: HTTP {r.status_code} {r.text[:200]}")


def renew_expired_keys(key_file: str | Path, management: str) -> None:
    """renew_expired_key for both keys a health check uses."""
    for kind in ("inference", "management"):
        renew_expired_key(key_file, management, kind)


def model_workers(inference: str, management: str,
                  headers: Callable[[str], dict[str, str]]) -> tuple[list[dict] | None, str]:
    """(the model's workers as describe lists them, "") once /ping says
    Healthy, else (None, why); `headers(kind)` authorizes a call with the
    `kind` key. /ping stays Healthy while the model's worker fails to load,
    over and over: whether one is READY is the workers' to say."""
    r = http("GET", f"{inference}/ping", headers=headers("inference"), timeout=5)
    if not (r.ok and r.json().get("status") == "Healthy"):
        return None, r.text.strip()
    r = http("GET", f"{management}/models/{MODEL}", headers=headers("management"), timeout=5)
    if not r.ok:
        return None, f"management API: HTTP {r.status_code} {r.text.strip()[:200]}"
    return r.json()[0].get("workers", []), ""


def wait(args) -> int:
    last = ["no answer"]

    def healthy() -> bool:
        try:
            if args.renew_expired:
                renew_expired_keys(args.key_file, args.management)
            workers, last[0] = model_workers(args.inference, args.management, lambda kind: auth(args.key_file, kind))
            if workers is None:
                return False
            states = [w.get("status") for w in workers]
            if "READY" in states:
                return True
            last[0] = f"no READY worker (workers: {', '.join(states) or 'none'}; see logs/model_log.log)"
        except (OSError, ValueError, LookupError, TypeError, AttributeError, KeyFileError,
                requests.RequestException) as e:
            last[0] = str(e)  # not started yet, key file not written yet, or not TorchServe's answer
        return False

    if wait_for(healthy, args.timeout, interval=1):
        return 0
    print(f"server not healthy after {args.timeout} s: {last[0]}", file=sys.stderr)
    return 1


def key(args) -> int:
    print(read_key(args.key_file, args.kind))
    return 0


def properties(text: str) -> dict[str, str]:
    """A config.properties text's key=value lines (blank and # lines skipped)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def served_ports(props: dict[str, str]) -> dict[str, tuple[str, int]]:
    """config.properties' key -> the (host, port) TorchServe binds for it:
    the HTTP addresses, and gRPC's address with its port (7070 and 7071 unless set)."""
    out = {}
    for key in ("inference_address", "management_address", "metrics_address"):
        if key in props:
            _, host, port = bound_address(props[key])
            out[key] = (host, port)
    for kind, default in (("inference", 7070), ("management", 7071)):
        host = props.get(f"grpc_{kind}_address", "127.0.0.1")
        out[f"grpc_{kind}_port"] = (host, int(props.get(f"grpc_{kind}_port", default)))
    return out


def bound_address(address: str) -> tuple[str, str, int]:
    """config.properties' `http://HOST:PORT` -> (scheme, host, port); the port
    is the scheme's own where none is written, an IPv6 host stays in brackets."""
    parts = urlsplit(address if "://" in address else f"http://{address}")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, f"[{host}]" if ":" in host else host, port


def default_config() -> str | None:
    """./config.properties where the command runs from a checkout's root (as
    the README's commands do), so that the scripts reach the server it
    configures; None elsewhere (the default addresses)."""
    return "config.properties" if Path("config.properties").is_file() else None


def addresses(config: str | None) -> dict[str, str]:
    """{"inference": ..., "management": ...}: where a client on this machine
    reaches the server `config` (a config.properties; None: the defaults)
    sets up. OSError where the file cannot be read."""
    configured = properties(Path(config).read_text()) if config else {}
    return {"inference": client_address(configured.get("inference_address"), 8080),
            "management": client_address(configured.get("management_address"), 8081)}


def client_address(bound: str | None, port: int) -> str:
    """Where a client on this machine reaches an address TorchServe binds
    (config.properties' `http://0.0.0.0:8080` is every interface: reached at
    loopback); the default address with `port` where none is configured."""
    if not bound:
        return f"http://127.0.0.1:{port}"
    scheme, host, bound_port = bound_address(bound)
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return f"{scheme}://{host}:{bound_port}"


def ports_free(args) -> int:
    """A detached `torchserve --start` whose port is taken exits at once, and
    a wait for /ping would then poll for minutes (or find the other server):
    say which port first."""
    import socket

    taken = []
    for key, (host, port) in served_ports(properties(Path(args.config).read_text())).items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host.strip("[]"), port))
            except OSError as e:
                taken.append(f"{host}:{port} ({key}): {e.strerror}: {_holder(port)}")
    for line in taken:
        print(f"error: port taken, {line}", file=sys.stderr)
    if taken:
        print(f"stop what holds it (a checkout's TorchServe: `make stop` in that checkout) or change {args.config}",
              file=sys.stderr)
    return 1 if taken else 0


def _holder(port: int) -> str:
    """Who listens on `port`, as far as this user may see: the pid and
    command line tell another checkout's server from this one's."""
    import psutil

    try:
        pids = {c.pid for c in psutil.net_connections(kind="inet")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid}
        for pid in sorted(pids):
            proc = psutil.Process(pid)
            return f"held by pid {pid} ({' '.join(proc.cmdline())[:120]}, in {proc.cwd()})"
    except psutil.Error:
        pass
    return "held by a process this user cannot see"


K8S_SECRET = "style-transfer-keys"  # deploy/kubernetes/deployment.yaml reads it


def k8s_secret(args) -> int:
    """The pods' gateway checks this key (deploy/kubernetes/configmap.yaml);
    32 random bytes, URL-safe, so it fits an HTTP header and a gRPC metadata
    value as it is."""
    import secrets

    import yaml

    manifest = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": K8S_SECRET, "labels": {"app.kubernetes.io/name": "style-transfer"}},
                "stringData": {"inference-key": secrets.token_urlsafe(32)}}
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", metavar="FILE", default=default_config(),
                    help="a config.properties: its addresses are the defaults of --management and --inference "
                         "(default: ./config.properties where there is one)")
    ap.add_argument("--management", help="management API address (default http://127.0.0.1:8081)")
    ap.add_argument("--inference", help="inference API address (default http://127.0.0.1:8080)")
    ap.add_argument("--key-file", default="key_file.json")
    ap.add_argument("--timeout", type=float, default=300.0)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("describe").set_defaults(fn=describe)
    s = sub.add_parser("scale")
    s.add_argument("workers", type=_workers, help="0 or more")
    s.set_defaults(fn=scale)
    w = sub.add_parser("wait")
    w.add_argument("--renew-expired", action="store_true",
                   help="renew the inference and management keys first where they have expired (the Docker HEALTHCHECK)")
    w.set_defaults(fn=wait)
    k = sub.add_parser("key")
    k.add_argument("kind", choices=["inference", "management", "API"])
    k.set_defaults(fn=key)
    sub.add_parser("k8s-secret").set_defaults(fn=k8s_secret)
    a = sub.add_parser("address")
    a.add_argument("api", choices=["inference", "management"])
    a.set_defaults(fn=lambda args: print(getattr(args, args.api)) or 0)
    p = sub.add_parser("ports-free")
    p.add_argument("config", help="a config.properties")
    p.set_defaults(fn=ports_free)
    args = ap.parse_args(argv)
    try:
        configured = addresses(args.config)
    except OSError as e:
        print(f"error: --config {args.config}: {e.strerror}", file=sys.stderr)
        return 2
    args.management = args.management or configured["management"]
    args.inference = args.inference or configured["inference"]
    try:
        return args.fn(args)
    except KeyFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except requests.RequestException as e:
        print(f"error: no answer from TorchServe ({type(e).__name__}): is it running, at "
              f"{args.management} / {args.inference}? (addresses from "
              f"{args.config or 'the defaults'}; --config, --management and --inference set them)", file=sys.stderr)
        return 1


def _workers(text: str) -> int:
    """A worker count: TorchServe 0.12 takes a negative one and fails on it."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: a worker count is 0 or more")
    return n


if __name__ == "__main__":
    sys.exit(main())
