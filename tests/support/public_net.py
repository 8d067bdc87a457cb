"""URL inputs through the real server, against a "public" image site.

Run as `unshare -rnm python public_net.py WORKDIR`: in a private network and
mount namespace, owned by the calling user, where loopback carries a global
address (PUBLIC) and /etc/hosts names it. No production code is bent: the
worker's address checks see a public site and a loopback one exactly as they
would on the internet. Prints one JSON object: each case's status, message
and the loopback site's hit count, and the worker PIDs before and after.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "scripts")]

from example_images import thumbnail  # noqa: E402
from image_server import ImageServer  # noqa: E402
from local_server import running_server  # noqa: E402

# The same fetch, the URL sent as a multipart form field and as a gRPC
# input (both arrive as bytes): (case, URL, how it is sent)
SENT_AS_BYTES = [
    ("form-by-name", "http://images.example/img.png", "form"),
    ("form-name-resolving-to-loopback", "http://internal.example/img.png", "form"),
    ("grpc-by-name", "http://images.example/img.png", "grpc"),
    ("grpc-name-resolving-to-loopback", "http://internal.example/img.png", "grpc"),
]

PUBLIC = "1.2.3.4"  # a global address: in this namespace it is ours
HOSTS = f"127.0.0.1 localhost\n{PUBLIC} images.example\n127.0.0.1 internal.example\n"
LIMITS = {"allow_urls": True, "url_total_timeout_s": 2, "max_input_bytes": 1_000_000}
# (case, URL path on the public site or a full URL)
CASES = [
    ("by-name", "http://images.example/img.png"),
    ("by-address", f"http://{PUBLIC}/img.png"),
    ("redirects-within-limit", "http://images.example/redirect/2"),
    ("too-many-redirects", "http://images.example/redirect/5"),
    ("redirect-to-loopback", "http://images.example/redirect-to/127.0.0.1"),
    ("redirect-to-loopback-name", "http://images.example/redirect-to/internal.example"),
    ("name-resolving-to-loopback", "http://internal.example/img.png"),
    ("redirect-to-file", "http://images.example/to-file"),
    ("huge-body", "http://images.example/huge"),
    ("declared-huge", "http://images.example/declared-huge"),
    ("trickle", "http://images.example/slow"),
    ("trickle-headers", "http://images.example/trickle-headers"),
    ("gzip-bomb", "http://images.example/gzip-bomb"),
    ("not-an-image", "http://images.example/text"),
    ("not-found", "http://images.example/missing"),
]


def setup_namespace(workdir: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{PUBLIC}/32", "dev", "lo"], check=True)
    hosts = workdir / "hosts"
    hosts.write_text(HOSTS)
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)


def main(workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    setup_namespace(workdir)
    style = base64.b64encode(thumbnail("starry_night.jpg", 48)).decode()
    results = {}
    with ImageServer(port=80, host=PUBLIC, huge_bytes=3_000_000) as site, \
            ImageServer(port=80, host="127.0.0.1") as internal, \
            running_server(workdir / "torchserve", model_config={"limits": LIMITS}) as server:
        pids = server.worker_pids()
        for case, url in CASES:
            r = server.predict(json={"content_url": url, "style": style, "steps": 1, "max_size": 32}, timeout=120)
            kind = r.headers.get("content-type", "")
            body = r.json() if kind.startswith("application/json") else {}
            results[case] = {"status": r.status_code, "content_type": kind, "message": body.get("message", ""),
                             "internal_hits": internal.hits}
        for case, url, how in SENT_AS_BYTES:
            results[case] = _sent_as_bytes(server, url, base64.b64decode(style), how) | {
                "internal_hits": internal.hits}
        return {"cases": results, "pids_before": pids, "pids_after": server.worker_pids(), "public_hits": site.hits}


def _sent_as_bytes(server, url: str, style: bytes, how: str) -> dict:
    """status (an HTTP code, or a gRPC status's name), content type (HTTP) and message."""
    if how == "form":
        r = server.predict(files={"style": ("s.png", style, "image/png")},
                           data={"content_url": url, "steps": "1", "max_size": "32"}, timeout=120)
        kind = r.headers.get("content-type", "")
        body = r.json() if kind.startswith("application/json") else {}
        return {"status": r.status_code, "content_type": kind, "message": body.get("message", "")}
    import grpc
    from grpc_client import InferenceClient

    with InferenceClient(server.grpc_inference, deadline_s=120) as client:
        reply = client.predict({"content_url": url.encode(), "style": style, "steps": b"1", "max_size": b"32"},
                               server.key("inference"))
    if isinstance(reply, grpc.RpcError):  # TorchServe appends a line naming its own exception class
        return {"status": reply.code().name, "content_type": "", "message": (reply.details() or "").split("\n")[0]}
    png = reply.prediction.startswith(b"\x89PNG\r\n\x1a\n")
    return {"status": "OK", "content_type": "image/png" if png else "", "message": "" if png else
            reply.prediction[:200].decode("utf-8", "replace")}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
