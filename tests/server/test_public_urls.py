"""URL inputs through the real server, against an image site with a public
address. Offline, that site lives in a private network namespace
(tests/support/public_net.py runs the server, the site and the requests
inside it), so the production address checks run unchanged: what is public
is fetched, what leads to loopback is refused, and every other rule holds."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.server

REFUSED = "content_url: the address is not public (loopback, private, link-local...)"
EXPECTED = {
    "by-name": (200, ""),
    "by-address": (200, ""),
    "redirects-within-limit": (200, ""),
    "too-many-redirects": (400, "content_url: more than 3 redirects"),
    "redirect-to-loopback": (403, REFUSED),
    "redirect-to-loopback-name": (403, REFUSED),
    "name-resolving-to-loopback": (403, REFUSED),
    "redirect-to-file": (400, "content_url: only http and https URLs are fetched"),
    "huge-body": (413, "content_url: more than the limit of 1000000 bytes"),
    "declared-huge": (413, "content_url: 1000000000000 bytes, more than the limit of 1000000"),
    "trickle": (504, "content_url: the download took longer than 2 s"),
    "trickle-headers": (504, "content_url: the download took longer than 2 s"),
    "gzip-bomb": (413, "content_url: more than the limit of 1000000 bytes"),
    "not-an-image": (415, "content_url: not an accepted image format (PNG, JPEG, WebP, GIF)"),
    "not-found": (400, "content_url: the URL answered HTTP 404"),
    # the URL as bytes: a multipart form field, a gRPC input (TorchServe maps 403 to PERMISSION_DENIED)
    "form-by-name": (200, ""),
    "form-name-resolving-to-loopback": (403, REFUSED),
    "grpc-by-name": ("OK", ""),
    "grpc-name-resolving-to-loopback": ("PERMISSION_DENIED", REFUSED),
}


def _namespaces_work() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    probe = "ip link set lo up && mount --bind /etc/hostname /etc/hosts"
    return subprocess.run(["unshare", "-rnm", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    if not _namespaces_work():
        pytest.skip("needs unprivileged user, network and mount namespaces (unshare -rnm) and iproute2")
    p = subprocess.run(
        ["unshare", "-rnm", sys.executable, str(ROOT / "tests" / "support" / "public_net.py"),
         str(tmp_path_factory.mktemp("public-net"))],
        capture_output=True, text=True, timeout=480,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(EXPECTED))
def test_url_case_gets_its_status_and_message(outcome, case):
    status, message = EXPECTED[case]
    got = outcome["cases"][case]
    assert (got["status"], got["message"]) == (status, message), got
    if status in (200, "OK"):
        assert got["content_type"] == "image/png"


def test_nothing_reached_the_loopback_site_and_the_worker_survived(outcome):
    assert all(c["internal_hits"] == 0 for c in outcome["cases"].values())
    assert outcome["public_hits"] > 0
    assert outcome["pids_after"] == outcome["pids_before"]
