#!/usr/bin/env python3
"""Manage the running style_transfer model through TorchServe's management API.

  manage.py describe          workers, their status and PIDs, queue
  manage.py scale N           set the worker count to N (waits until done)
  manage.py wait              block until /ping is healthy (or --timeout s)
  manage.py key inference|management   print a key from key_file.json
  manage.py k8s-secret        print a Kubernetes Secret with a new random
                              inference key for deploy/ (kubectl apply -f -)

Keys come from the key_file.json TorchServe writes at start (token
authorization is on): the management key for management calls, the
inference key for /ping and predictions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import requests

MODEL = "style_transfer"


def read_key(key_file: str | Path, kind: str) -> str:
    """`kind` is inference, management or API."""
    data = json.loads(Path(key_file).read_text())
    return data[kind]["key"]


def auth(key_file: str | Path, kind: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {read_key(key_file, kind)}"}


def describe(args) -> int:
    r = requests.get(f"{args.management}/models/{MODEL}", headers=auth(args.key_file, "management"), timeout=30)
    print(json.dumps(r.json(), indent=2))
    return 0 if r.ok else 1


def scale(args) -> int:
    r = requests.put(
        f"{args.management}/models/{MODEL}",
        params={"min_worker": args.workers, "max_worker": args.workers, "synchronous": "true"},
        headers=auth(args.key_file, "management"),
        timeout=args.timeout,
    )
    print(r.text.strip())
    return 0 if r.ok else 1


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False):
    the scripts' and tests' one polling loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def wait(args) -> int:
    last = ["no answer"]

    def healthy() -> bool:
        try:
            r = requests.get(f"{args.inference}/ping", headers=auth(args.key_file, "inference"), timeout=5)
            if r.ok and r.json().get("status") == "Healthy":
                return True
            last[0] = r.text.strip()
        except (OSError, ValueError, KeyError, requests.RequestException) as e:
            last[0] = str(e)  # not started yet, or key file not written yet
        return False

    if wait_for(healthy, args.timeout, interval=1):
        return 0
    print(f"server not healthy after {args.timeout} s: {last[0]}", file=sys.stderr)
    return 1


def key(args) -> int:
    print(read_key(args.key_file, args.kind))
    return 0


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
    ap.add_argument("--management", default="http://127.0.0.1:8081")
    ap.add_argument("--inference", default="http://127.0.0.1:8080")
    ap.add_argument("--key-file", default="key_file.json")
    ap.add_argument("--timeout", type=float, default=300.0)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("describe").set_defaults(fn=describe)
    s = sub.add_parser("scale")
    s.add_argument("workers", type=int)
    s.set_defaults(fn=scale)
    sub.add_parser("wait").set_defaults(fn=wait)
    k = sub.add_parser("key")
    k.add_argument("kind", choices=["inference", "management", "API"])
    k.set_defaults(fn=key)
    sub.add_parser("k8s-secret").set_defaults(fn=k8s_secret)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
