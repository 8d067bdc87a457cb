"""A real TorchServe, built from this checkout, on free localhost ports, token auth on."""
from __future__ import annotations

import pytest

from local_server import ROOT, running_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    assert "disable_token_authorization=false" in (ROOT / "config.properties").read_text()
    with running_server(tmp_path_factory.mktemp("torchserve")) as srv:
        yield srv


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory):
    """Test-only limits for fault injection: a 3 s time budget, a job queue of 2,
    a 2 MB request limit, a 300 MiB memory budget, a 20 kB response limit
    (a 32 px PNG or a 96 px JPEG fits, a 160 px PNG does not), 2000 JPEG scans
    (so a scan bomb decodes for longer than the budget), URL inputs
    switched on, a progress record every step (so a test sees a request
    running after one step, not ten, which a loaded machine may not reach
    within the budget), and a 40 s responseTimeout (the least a 3 s budget allows:
    the handler refuses a budget less than 30 s below it)."""
    with running_server(
        tmp_path_factory.mktemp("torchserve-strict"),
        config={"job_queue_size": "2", "max_request_size": "2000000"},
        model_config={
            "responseTimeout": 40,
            "limits": {"time_budget_s": 3, "allow_urls": True, "memory_budget_mb": 300,
                       "max_response_bytes": 20_000, "max_jpeg_scans": 2000, "progress_every": 1},
        },
    ) as srv:
        yield srv


@pytest.fixture
def fresh_server(tmp_path_factory):
    """A server of the test's own, for a request that may take the model down
    for good: on the session's server it would hang every later test."""
    with running_server(tmp_path_factory.mktemp("torchserve-fresh")) as srv:
        yield srv
