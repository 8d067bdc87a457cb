#!/usr/bin/env python3
"""cuDNN autotuning off, measured in a fresh process (cuDNN keeps the plans it
chose for a shape for the life of the process, so turning autotuning off
after a run with it on measures nothing). Against the figures of a
`bench/gpu.py` run with autotuning on, on the same kind of card: the step at
512x512 compiled and not, a first request of a shape not warmed, and the
fresh peak memory of a warmed (compiled) and a cold shape against the
admission-control estimate.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "handler"), str(ROOT / "bench")]
from gpu_variants import per_step, run, setup  # noqa: E402
from nst import optimize as o  # noqa: E402
from nst.config import Params  # noqa: E402
from nst.memory import estimate_bytes  # noqa: E402


def peak(vgg, size, steps=70) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(vgg, size, steps)
    p = torch.cuda.max_memory_allocated() - base
    w, h = size
    est = estimate_bytes(h, w, w * h, Params(), "cuda", o.step_dtypes(torch.device("cuda"), Params()))
    return {"size": f"{w}x{h}", "peak_gib": p / 2**30, "estimate_gib": est / 2**30, "ratio": est / p}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_autotune.json")
    args = ap.parse_args(argv)
    vgg, r = setup(autotune=False)
    sq = (512, 512)
    r["warm_up_s"] = o.warm_up(vgg, [sq])
    print("warm-up", r["warm_up_s"], flush=True)
    r["first_request_warmed_s"] = run(vgg, sq, 100)
    cold = (512, 288)
    r["first_request_cold_s"] = run(vgg, cold, 100)
    r["cold_again_s"] = run(vgg, cold, 100)
    print("first requests", r, flush=True)
    r["peak_warmed_512"] = peak(vgg, sq)
    r["peak_cold_1024x768"] = peak(vgg, (1024, 768))
    print("peaks", r["peak_warmed_512"], r["peak_cold_1024x768"], flush=True)
    lowp = o.LOWP_STEPS
    o.LOWP_STEPS = 0
    r["fp32_ms"] = per_step(vgg, sq)
    o.LOWP_STEPS = 10**9
    r["bf16_ms"] = per_step(vgg, sq)
    o.LOWP_STEPS = lowp
    r["default_500_s"] = min(run(vgg, sq, 500) for _ in range(2))
    o.COMPILE, o.LOWP_STEPS = False, 0
    r["fp32_uncompiled_ms"] = per_step(vgg, sq)
    o.COMPILE, o.LOWP_STEPS = True, lowp
    print(json.dumps(r, indent=1), flush=True)
    args.out.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
