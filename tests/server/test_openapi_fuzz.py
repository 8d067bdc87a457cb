"""docs/openapi.yaml against a real TorchServe: Schemathesis generates
requests from it, valid and not (random bytes for images, values past every
bound, wrong types, unknown names), and checks each answer's status, content
type, headers and body against the file. Small limits keep the valid
requests that carry the file's example images quick."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from local_server import ROOT, running_server

SPEC = ROOT / "docs/openapi.yaml"
RESPONSES = yaml.safe_load(SPEC.read_text())["paths"]["/predictions/style_transfer"]["post"]["responses"]
DOCUMENTED = {int(code) for code in RESPONSES}
# A missing key is TorchServe's 400, not the 401 these expect (the contract
# says 400); TorchServe also answers TRACE and OPTIONS on the path.
pytestmark = pytest.mark.server

CHECKS = ("status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("torchserve-openapi"),
                        model_config={"limits": {"max_steps": 5, "max_size": 64}}) as srv:
        yield srv


def test_generated_requests_get_only_documented_answers_and_the_worker_survives(small_server, tmp_path):
    pids = small_server.worker_pids()
    har = tmp_path / "run.har"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests/support"), "SCHEMATHESIS_HOOKS": "openapi_hooks",
           "NO_COLOR": "1"}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", str(SPEC), "--url", small_server.inference,
         "--header", f"Authorization: Bearer {small_server.key('inference')}",
         "--workers", "1", "--max-examples", "30", "--seed", "1", "--generation-database", "none",
         "--continue-on-failure", "--checks", CHECKS, "--report", "har", "--report-har-path", str(har)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    answers = Counter()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        if entry["request"]["method"] != "POST":
            continue
        answers[entry["response"]["status"], entry["response"]["content"].get("mimeType")] += 1
    statuses = {status for status, _ in answers}
    assert statuses <= DOCUMENTED, answers
    assert {200, 400, 422} <= statuses, answers  # images served, and both kinds of refusal met
    served = {kind for (status, kind) in answers if status == 200}
    assert served == {"image/png", "image/jpeg", "image/webp", "application/x-ndjson"}, answers
    refused = {kind for (status, kind) in answers if status != 200}
    assert refused == {"application/json"}, answers
    assert small_server.worker_pids() == pids
