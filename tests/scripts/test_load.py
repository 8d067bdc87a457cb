"""`make load` at toy scale: every request answered as expected, no restarts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.server
def test_load_test_runs_and_reports(tmp_path):
    out, report = tmp_path / "load.json", tmp_path / "LOAD.md"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--clients", "2", "--seconds", "8",
         "--bad-share", "0.5", "--out", str(out), "--report", str(report)],
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["requests"] > 0 and r["unexpected"] == 0 and r["worker_restarts"] == 0
    assert r["by_kind"].get("good", 0) > 0 and len(r["by_kind"]) > 1
    assert "| unexpected answers | 0" in report.read_text()
