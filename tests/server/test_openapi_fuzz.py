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
DOCUMENTED = {int(code) for code in RESPONSES} - {500}  # a 500 here is a bug of this model's
pytestmark = pytest.mark.server

# Left out: missing_required_header and ignored_auth (a missing key is
# TorchServe's 400, which the contract says, not the 401 they expect),
# unsupported_method (TorchServe answers TRACE and OPTIONS on the path), and
# not_a_server_error (the documented 503/504/507 are answers, not faults;
# status_code_conformance fails a 500, left out of the fuzzed copy).
CHECKS = ("status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection")


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("torchserve-openapi"),
                        model_config={"limits": {"max_steps": 5, "max_size": 64}}) as srv:
        yield srv


def _fuzzed_spec(path: Path) -> Path:
    """docs/openapi.yaml as the fuzzer reads it:
    - less the 500 (documented for TorchServe's own and for bugs), so that
      an answer of 500 fails status_code_conformance;
    - less content_url and style_url: URL inputs are off on the fuzzed
      server (a body naming one stops at that field's 422 before anything
      else is read), and fetching is tested with sites of its own
      (tests/core/test_fetch.py, tests/server/test_public_urls.py)."""
    spec = yaml.safe_load(SPEC.read_text())
    del spec["paths"]["/predictions/style_transfer"]["post"]["responses"]["500"]
    for body in ("FormRequest", "JsonRequest"):
        for name in ("content_url", "style_url"):
            del spec["components"]["schemas"][body]["properties"][name]
    path.write_text(yaml.safe_dump(spec))
    return path


def test_generated_requests_get_only_documented_answers_and_the_worker_survives(small_server, tmp_path):
    pids = small_server.worker_pids()
    har = tmp_path / "run.har"
    spec = _fuzzed_spec(tmp_path / "openapi.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests/support"), "SCHEMATHESIS_HOOKS": "openapi_hooks",
           "NO_COLOR": "1"}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", str(spec), "--url", small_server.inference,
         "--header", f"Authorization: Bearer {small_server.key('inference')}",
         "--workers", "1", "--max-examples", "30", "--seed", "1", "--generation-database", "none",
         "--continue-on-failure", "--checks", CHECKS, "--report", "har", "--report-har-path", str(har)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    answers, messages = Counter(), Counter()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        if entry["request"]["method"] != "POST":
            continue
        response = entry["response"]
        kind = response["content"].get("mimeType")
        form = entry["request"].get("postData", {}).get("mimeType", "").startswith("multipart/")
        answers[response["status"], kind, "form" if form else "json"] += 1
        if kind == "application/json" and response["status"] != 200:
            messages[_shape(json.loads(response["content"]["text"])["message"])] += 1
    statuses = {status for status, _, _ in answers}
    assert statuses <= DOCUMENTED, answers
    served = {kind for (status, kind, _) in answers if status == 200}
    assert "image/png" in served and served <= set(RESPONSES["200"]["content"]), answers
    assert {kind for (status, kind, _) in answers if status != 200} == {"application/json"}, answers
    # The generated refusals reached the parameters' parsers, not only the
    # check that both images are there (a spec whose images were optional
    # once had nearly every invalid value refused for a missing image).
    for shape in ("out of range", "must be one of", "unknown parameter"):
        assert messages[shape] > 0, (shape, messages.most_common(20))
    assert messages["expected an integer"] + messages["expected a number"] > 0, messages.most_common(20)
    assert small_server.worker_pids() == pids


_SHAPES = ("out of range", "must be one of", "unknown parameter", "expected an integer", "expected a number",
           "not an accepted image format", "required image missing", "not valid base64")


def _shape(message: str) -> str:
    """The kind of refusal an error message tells, without its field and values."""
    return next((shape for shape in _SHAPES if shape in message), message)
