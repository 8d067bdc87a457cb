"""The workflow API, which `enable_model_api=false` does not switch off, is
closed by the shipped config.properties: `allowed_urls=(?!)` matches no URL,
so the frontend neither downloads nor copies anything, and `workflow_store`
is an empty directory of its own (unset, it would be the model store), so no
workflow is found by file name either. With TorchServe's defaults the same
requests copied a readable file into the model store and fetched from a
loopback address."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests
from image_server import ImageServer

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ("allowed_urls", "workflow_store", "enable_model_api")

pytestmark = pytest.mark.server


def _properties(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", text, re.M))


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` with its size and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_test_servers_run_the_shipped_workflow_settings(server):
    shipped = _properties((ROOT / "config.properties").read_text())
    running = _properties((server.workdir / "config.properties").read_text())
    assert {k: running[k] for k in SETTINGS} == {k: shipped[k] for k in SETTINGS}
    assert shipped["allowed_urls"] == "(?!)" and shipped["workflow_store"] == "workflow_store"
    # What the frontend resolved: the empty directory beside the model store, not the model store.
    log = (server.workdir / "logs" / "ts_log.log").read_text()
    assert f"Workflow Store: {server.workdir / 'workflow_store'}\n" in log
    assert not any((server.workdir / "workflow_store").iterdir())


def test_workflow_endpoints_neither_fetch_nor_copy(server, tmp_path):
    archive = tmp_path / "evil.war"  # any readable file: the frontend copied it, then failed to unzip it
    archive.write_bytes(b"PK\x03\x04 not really a workflow archive")
    model_store, workflow_store = server.workdir / "model_store", server.workdir / "workflow_store"
    before = _files(model_store), _files(workflow_store)
    pids = server.worker_pids()
    headers = server.auth("management")
    with ImageServer() as site:
        urls = [
            f"file://{archive}",
            f"FILE://{archive}",
            site.url("/x.war"),
            site.url("/x.war", host="localhost"),
            archive.name,  # a file name: looked up in workflow_store
            "style_transfer.mar",  # in the model store, which is not the workflow store
        ]
        for url in urls:
            r = requests.post(f"{server.management}/workflows", params={"url": url}, headers=headers, timeout=60)
            assert r.status_code == 404, (url, r.text)
            body = r.json()
            assert body["type"] == "WorkflowNotFoundException", (url, body)
            if "://" in url:
                assert "does not match any allowed URL" in body["message"], (url, body)
            else:
                assert "Workflow not found in workflow store" in body["message"], (url, body)
        assert site.hits == 0
    r = requests.get(f"{server.management}/workflows", headers=headers, timeout=30)
    assert r.status_code == 200 and r.json() == {"workflows": []}
    assert (_files(model_store), _files(workflow_store)) == before
    assert not any(workflow_store.iterdir())
    # The archive named in load_models is still the one served, by the same worker.
    described = server.describe()
    assert described["modelName"] == "style_transfer" and server.worker_pids() == pids
