"""`make bench` end to end at toy scale: it runs, scores and writes its three outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_runs_and_writes_results_plot_and_report(tmp_path):
    report = tmp_path / "PERFORMANCE.md"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--size", "40x32", "--reference-steps", "4",
         "--seed-steps", "2", "--no-server", "--out-dir", str(tmp_path), "--report", str(report)],
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    ref = results["reference"]
    assert ref["extrapolated"] is True and ref["steps_run"] == 4
    assert abs(ref["time_2000_s"] - 2000 * ref["per_step_s"]) < 1e-9
    assert results["default"]["loss_png"] > 0
    quality = results["time_to_reference_quality"]
    hit = quality["sweep"][-1]
    assert quality["steps"] == hit["steps"] and hit["loss_png"] <= quality["target_loss_png"]
    assert (tmp_path / "loss_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "extrapolated from 4 steps" in text and "| time to the reference quality |" in text
