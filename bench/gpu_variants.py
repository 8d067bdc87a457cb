#!/usr/bin/env python3
"""Which engine variant is fastest on this GPU: ms per step of the default
optimizer at 512x512, float32 and bf16 steps apart, for the CUDA graph alone,
torch.compile (one program per shape) inside the graph, and cuDNN
autotuning off; then a profile of where a step's GPU time goes. (Dynamic
shapes were measured once, on an H200: 133 s to compile, slower steps; see
bench/gpu_results_h200.json.) Measured to choose `COMPILE` / `COMPILE_DYNAMIC` in nst/config.py;
`bench/gpu.py` measures the chosen engine against the recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "handler"), str(ROOT / "bench")]
from nst import VGGFeatures  # noqa: E402
from nst import optimize as o  # noqa: E402
from nst.config import Params  # noqa: E402
from nst.vgg import random_features_state  # noqa: E402


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def run(vgg, size, steps, **kw) -> float:
    w, h = size
    gen = torch.Generator().manual_seed(1)
    content, style = (torch.rand((1, 3, h, w), generator=gen).cuda() for _ in range(2))
    t0 = sync_time()
    o.stylize(vgg, content, [style], dataclasses.replace(Params(), steps=steps, **kw), progress_every=steps)
    return sync_time() - t0


def per_step(vgg, size, a=20, b=220) -> float:
    diffs = [(run(vgg, size, b) - run(vgg, size, a)) / (b - a) * 1e3 for _ in range(3)]
    return statistics.median(diffs)


def measure(vgg, size, label) -> dict:
    lowp = o.LOWP_STEPS
    out = {}
    o.LOWP_STEPS = 0
    out["fp32_ms"] = per_step(vgg, size, 20, 220)
    o.LOWP_STEPS = 10**9
    out["bf16_ms"] = per_step(vgg, size, 20, 220)
    o.LOWP_STEPS = lowp
    out["default_500_s"] = min(run(vgg, size, 500) for _ in range(2))
    print(label, json.dumps(out), flush=True)
    return out


def reset_compile(dynamic: bool, enabled: bool) -> None:
    torch._dynamo.reset()
    o._COMPILED.clear()
    o.COMPILE, o.COMPILE_DYNAMIC = enabled, dynamic


def profile(vgg, size, label, top=14) -> dict:
    """Kernel time of 10 float32 steps without the graph (the graph replays the same kernels)."""
    from torch.profiler import ProfilerActivity, profile as prof
    o.CUDA_GRAPHS, lowp, o.LOWP_STEPS = False, o.LOWP_STEPS, 0
    run(vgg, size, 3)
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        run(vgg, size, 10)
    o.CUDA_GRAPHS, o.LOWP_STEPS = True, lowp
    rows = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in p.key_averages()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"{label}: GPU busy {total / 10:.3f} ms per step (10 steps + set-up)", flush=True)
    for k, t, n in rows[:top]:
        print(f"  {t / 10:8.3f} ms/step  x{n / 10:6.1f}  {k[:110]}", flush=True)
    return {"gpu_ms_per_step": total / 10, "top": [(k[:110], t / 10, n / 10) for k, t, n in rows[:top]]}


def setup(autotune: bool) -> tuple:
    """The GPU's settings as the handler makes them (autotuning as given), and the extractor."""
    torch.backends.cudnn.benchmark = autotune
    torch.set_float32_matmul_precision("high")
    vgg = VGGFeatures(random_features_state(0)).cuda()
    return vgg, {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "cudnn_benchmark": autotune}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_variants.json")
    args = ap.parse_args(argv)
    vgg, r = setup(autotune=True)
    size = (512, 512)
    r["size"] = "512x512"
    reset_compile(False, False)
    r["graph"] = measure(vgg, size, "graph only")
    r["graph_profile"] = profile(vgg, size, "graph only (eager kernels)")
    reset_compile(False, True)
    r["static_warm_s"] = o.warm_up(vgg, [size])
    print("static warm-up", r["static_warm_s"], flush=True)
    r["compile_static"] = measure(vgg, size, "compile static")
    r["compile_profile"] = profile(vgg, size, "compile static")
    torch.backends.cudnn.benchmark = False
    r["compile_static_no_autotune"] = measure(vgg, size, "compile static, cudnn.benchmark off")
    torch.backends.cudnn.benchmark = True
    args.out.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
