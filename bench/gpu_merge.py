#!/usr/bin/env python3
"""Merge a lent GPU's new `bench/gpu.py` results into the stored results of
its card (bench/gpu_results_<card>.json), from which `python bench/run.py
--report-only` renders docs/PERFORMANCE.md. Runs on any machine, after the
GPU is given back.

The new run's figures replace the stored ones of the same name; figures it
did not measure (sections skipped for time, or not in its plan, or left
empty) stay as an earlier run left them, so `--provenance` must say which
run each figure comes from: it is appended to the stored text. Section times are kept per
run; the failures listed are the new run's (a failed section's figures are
an earlier run's).

    python bench/gpu_merge.py out/gpu/gpu_results.json bench/gpu_results_h100.json \\
        --label "run 3" --provenance "Run 3 (...): the core measures, the profile, ..."
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BOOKKEEPING = ("section_s", "skipped", "errors", "provenance")
# Figures kept as a mapping from one section's variant to its figures.
PER_SECTION = ("batching",)


def merge(stored: dict, new: dict, label: str, provenance: str) -> dict:
    """`stored` with `new`'s figures laid over it (see the module's text)."""
    if stored and stored.get("card") != new.get("card"):
        raise ValueError(f"results of {new.get('card')!r} do not belong with {stored.get('card')!r}: "
                         "each card has a file of its own")
    if not provenance.strip():
        raise ValueError("say which figures the new run measured (--provenance)")
    # An empty container is a section the new run set up but did not reach
    # (batching's tables with --only core, say): not a measurement of nothing.
    merged = {**stored, **{k: v for k, v in new.items() if k not in BOOKKEEPING and v not in ({}, [])}}
    # Batching is measured per image size, each size its own section: a run
    # that measured 256 px leaves the 128 and 512 px tables of an earlier one.
    for key in PER_SECTION:
        if isinstance(stored.get(key), dict) and isinstance(new.get(key), dict):
            merged[key] = {**stored[key], **new[key]}
    merged["section_s"] = {**stored.get("section_s", {}),
                           **{f"{name} ({label})": s for name, s in new.get("section_s", {}).items()}}
    merged["skipped"] = []  # what the new run skipped an earlier one measured, or nobody did: not a failure
    merged["errors"] = {f"{name} ({label})": e for name, e in new.get("errors", {}).items()}
    merged["provenance"] = " ".join(p for p in (stored.get("provenance", ""), provenance.strip()) if p)
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("new", type=Path, help="the JSON bench/gpu.py wrote on the lent GPU")
    ap.add_argument("into", type=Path, help="the card's stored results (created if absent)")
    ap.add_argument("--label", required=True, help='what to call the new run, e.g. "run 3"')
    ap.add_argument("--provenance", required=True, help="which figures the new run measured, and where and when")
    args = ap.parse_args(argv)
    stored = json.loads(args.into.read_text()) if args.into.exists() else {}
    try:
        merged = merge(stored, json.loads(args.new.read_text()), args.label, args.provenance)
    except ValueError as e:
        print(f"gpu_merge: {e}", file=sys.stderr)
        return 2
    args.into.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
