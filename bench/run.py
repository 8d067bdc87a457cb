#!/usr/bin/env python3
"""`make bench`: the product against the reference recipe, side by side, in one run.

Writes bench/results.json, bench/loss_vs_time.png and docs/PERFORMANCE.md.
Every method uses the same weights file and the same input pixels (content
and style resized once to --size), and every result is scored with the
reference recipe's own loss function on the 8-bit PNG it delivers.

Then the quality corpus (bench/corpus.py): every pair of bench/corpus, the
recipe's 2000 steps against the product's default. --corpus-only runs just
that part and keeps the other figures of results.json; --no-corpus skips it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "handler"), str(ROOT / "scripts"), str(ROOT / "bench")]
import corpus  # noqa: E402
import reference_recipe as ref  # noqa: E402
from nst import Limits, VGGFeatures, parse_request, run  # noqa: E402
from nst import imageio  # noqa: E402
from nst import weights as nst_weights  # noqa: E402
from nst.config import Params  # noqa: E402

OUT_DIR = ROOT / "bench"
SWEEP = (10, 20, *range(22, 42, 2), 50, 60, 80, 100, 150)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    return imageio.to_tensor(Image.open(io.BytesIO(data)))  # (1,3,H,W) in [0,1]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    omp = os.environ.get("OMP_WAIT_POLICY")
    return (f"{cpu}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads" + (f", OMP_WAIT_POLICY={omp}" if omp else ""))


def steady_per_step(points: list[tuple[int, float]], steps: int) -> float:
    """Seconds per step from (step, elapsed) points, past the first 10 steps:
    the same slope for every method, without the one-off setup (targets,
    warm-up) that would otherwise be spread over a short sample."""
    later = [(i, t) for i, t in points if i >= 10]
    if len(later) < 2:
        return points[-1][1] / steps
    (i0, t0), (i1, t1) = later[0], later[-1]
    return (t1 - t0) / (i1 - i0)


def load_models(weights: str, device: torch.device):
    """The product's extractor and the recipe's torchvision VGG from one weights file, on `device`."""
    state, kind = nst_weights.load(weights)
    return VGGFeatures(state).to(device), ref.load_vgg(state).to(device), kind


class Bench:
    def __init__(self, args, vgg, ref_vgg, weights_kind):
        self.args = args
        w, h = (int(v) for v in args.size.split("x"))
        self.size = (w, h)
        self.device = torch.device(args.device)
        self.vgg, self.ref_vgg, self.weights_kind = vgg, ref_vgg, weights_kind
        content = Image.open(ROOT / "examples" / "tubingen.jpg").convert("RGB").resize((w, h), Image.LANCZOS)
        style = Image.open(ROOT / "examples" / "starry_night.jpg").convert("RGB").resize((w, h), Image.LANCZOS)
        self.content_png, self.style_png = png_bytes(content), png_bytes(style)
        self.content_n = ref.load_image(Image.open(io.BytesIO(self.content_png)), shape=(h, w)).to(self.device)
        self.style_n = ref.load_image(Image.open(io.BytesIO(self.style_png)), shape=(h, w)).to(self.device)
        self.limits = Limits()
        self.results: dict = {"machine": machine(), "device": str(self.device), "size": args.size,
                              "weights": self.weights_kind, "run_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def score_png(self, data: bytes) -> float:
        return ref.score(decode_png(data).to(self.device), self.content_n, self.style_n, self.ref_vgg)

    def product(self, **fields):
        """One in-process request through the core; wall time includes decode and encode."""
        req = parse_request({"content": self.content_png, "style": self.style_png,
                             "max_size": max(self.size), **fields}, self.limits)
        curve = []
        t0 = time.perf_counter()
        out = run(req, self.vgg, self.limits, callback=lambda p: curve.append((time.perf_counter() - t0, p.loss)))
        wall = time.perf_counter() - t0
        return out, wall, curve

    # -- the reference recipe -------------------------------------------------
    def reference(self):
        steps = self.args.reference_steps
        curve = []
        target = ref.run(self.content_n, self.style_n, self.ref_vgg, steps=steps,
                         on_step=lambda i, loss, t: curve.append((t, loss)))
        wall = curve[-1][0]
        std = torch.tensor(ref.STD, device=target.device).view(1, 3, 1, 1)
        pixels = target * std + torch.tensor(ref.MEAN, device=target.device).view(1, 3, 1, 1)
        data = imageio.encode(pixels)  # clamped and rounded to 8 bits, as the tutorial's im_convert
        per_step = steady_per_step([(i + 1, t) for i, (t, _) in enumerate(curve)], steps)
        self.results["reference"] = {
            "steps_run": steps,
            "per_step_s": per_step,
            "time_2000_s": wall if steps == 2000 else per_step * 2000,
            "extrapolated": steps != 2000,
            "final_loss_png": self.score_png(data),
            "curve": curve[:: max(1, steps // 200)],
        }
        print(f"reference: {steps} steps, {per_step * 1e3:.1f} ms/step, "
              f"loss {self.results['reference']['final_loss_png']:.3f}", flush=True)

    # -- the product's presets ---------------------------------------------
    def seed_preset(self):
        n = self.args.seed_steps
        out, wall, curve = self.product(preset="seed", steps=n)
        per_step = steady_per_step([(p.step, p.elapsed_ms / 1e3) for p in out.result.history], n)
        self.results["seed_preset"] = {
            "steps_run": n, "per_step_s": per_step,
            "per_step_vs_reference": per_step / self.results["reference"]["per_step_s"],
            "loss_png": self.score_png(out.data), "curve": curve,
        }
        print(f"seed preset: {per_step * 1e3:.1f} ms/step", flush=True)

    def default(self):
        out, wall, curve = self.product()
        ref_res = self.results["reference"]
        loss = self.score_png(out.data)
        self.results["default"] = {
            "steps": Params().steps, "wall_s": wall, "loss_png": loss,
            "loss_vs_reference": loss / ref_res["final_loss_png"],
            "speedup_vs_reference": ref_res["time_2000_s"] / wall, "curve": curve,
        }
        print(f"default: {wall:.2f}s loss {loss:.3f}", flush=True)

    def time_to_reference_quality(self):
        target = self.results["reference"]["final_loss_png"]
        sweep = []
        for steps in SWEEP:
            out, wall, _ = self.product(steps=steps)
            loss = self.score_png(out.data)
            sweep.append({"steps": steps, "wall_s": wall, "loss_png": loss})
            print(f"  sweep {steps} steps: {wall:.2f}s loss {loss:.3f}", flush=True)
            if loss <= target:
                break
        hit = next((s for s in sweep if s["loss_png"] <= target), None)
        self.results["time_to_reference_quality"] = {
            "target_loss_png": target, "sweep": sweep,
            "steps": hit and hit["steps"], "wall_s": hit and hit["wall_s"],
            "speedup_vs_reference": hit and self.results["reference"]["time_2000_s"] / hit["wall_s"],
        }

    # -- batching through the server ----------------------------------------------
    def batching(self):
        import batching

        fields = {"steps": str(self.args.batching_steps), "max_size": str(self.args.batching_size)}
        print(f"batching: {fields}", flush=True)
        self.results["batching"] = batching.through_server(
            Path(self.args.weights), {"content": self.content_png, "style": self.style_png}, fields,
            max_batch_delay_ms=self.args.batching_delay_ms, requests_per_client=self.args.requests_per_client,
            log=lambda m: print(m, flush=True))

    # -- through the server ----------------------------------------------------
    def server(self):
        from local_server import running_server

        fields = {"steps": str(self.args.http_steps), "max_size": str(max(self.size))}
        with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp), Path(self.args.weights)) as srv:
            files = {"content": self.content_png, "style": self.style_png}
            srv.predict(files=files, data=fields).raise_for_status()  # warm-up
            local, http, local_outside, http_outside = [], [], [], []
            for _ in range(self.args.repeats):  # interleaved, so drift hits both alike
                t0 = time.perf_counter()
                out, _, _ = self.product(steps=self.args.http_steps)
                local.append(time.perf_counter() - t0)
                local_outside.append(local[-1] - out.result.elapsed_ms / 1e3)
                t0 = time.perf_counter()
                r = srv.predict(files=files, data=fields)
                r.raise_for_status()
                http.append(time.perf_counter() - t0)
                http_outside.append(http[-1] - int(r.headers["X-Elapsed-Ms"]) / 1e3)
            self.results["http_overhead"] = {
                "steps": self.args.http_steps, "repeats": self.args.repeats,
                "local_s": statistics.median(local), "http_s": statistics.median(http),
                "overhead": statistics.median(http) / statistics.median(local) - 1,
                # time outside the optimization loop: transport, parsing, decode, encode
                "outside_optimization_local_s": statistics.median(local_outside),
                "outside_optimization_http_s": statistics.median(http_outside),
            }
            print(f"http overhead: {self.results['http_overhead']['overhead'] * 100:.1f}%", flush=True)

            worker = psutil.Process(srv.worker_pids()[0])
            rss_peak = worker.memory_info().rss
            small = {"steps": "10", "max_size": "64"}
            throughput = {}
            for clients in (1, 2, 4):
                n = clients * self.args.requests_per_client
                lat = []

                def one(_):
                    t = time.perf_counter()
                    srv.predict(files=files, data=small).raise_for_status()
                    return time.perf_counter() - t
                t0 = time.perf_counter()
                with cf.ThreadPoolExecutor(clients) as pool:
                    futures = [pool.submit(one, i) for i in range(n)]
                    while not all(f.done() for f in futures):
                        rss_peak = max(rss_peak, worker.memory_info().rss)
                        time.sleep(0.05)
                    lat = [f.result() for f in futures]
                wall = time.perf_counter() - t0
                throughput[str(clients)] = {"requests": n, "req_per_s": n / wall,
                                            "p50_s": statistics.median(lat), "max_s": max(lat)}
                print(f"throughput {clients} clients: {n / wall:.2f} req/s", flush=True)
            self.results["throughput"] = throughput
            self.results["worker_peak_rss_mib"] = rss_peak / 2**20
        self.results["bench_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("reference", "reference recipe (Adam, 2000 steps)"),
                       ("seed_preset", "product preset=seed"), ("default", "product default")):
        curve = results.get(key, {}).get("curve")
        if curve:
            ax.plot([t for t, _ in curve], [loss for _, loss in curve], label=label)
    ref_res = results["reference"]
    ax.axhline(ref_res["final_loss_png"], color="gray", ls="--", lw=0.8, label="reference final loss (PNG)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("wall time, s")
    ax.set_ylabel("loss (optimizer's own, per step)")
    ax.set_title(f"Loss against time at {results['size']} px, {results['weights']} weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(r: dict, plot_link: str = "../bench/loss_vs_time.png") -> str:
    lines = [
        "# Performance",
        "",
        "Written by `make bench` (bench/run.py); do not edit by hand. The figures of each",
        "section come from one run on one machine, the reference recipe measured side by side.",
    ]
    if "bench_wall_s" in r:
        lines += ["", f"Last `bench/run.py` run: {r['bench_wall_s'] / 60:.1f} min wall in all ({r['bench_parts']}); "
                  f"CPU time of the bench process {r.get('bench_cpu_s', 0) / 60:.1f} min."]
    if "reference" in r:
        lines += ["", "## Tübingen / Starry Night", ""]
        if r.get("engine") != "nst.lbfgs":
            lines += ["(From a run before the engine of issue #11, on torch.optim.LBFGS; a full `make bench` "
                      "on a quiet machine replaces it.)", ""]
        lines += main_report(r, plot_link)
    if "batching" in r:
        import batching

        bt = r["batching"]
        lines += ["", "## Batching (CPU, through the server)", "",
                  f"Requests of {bt['fields']['steps']} steps at max_size {bt['fields']['max_size']} (the "
                  f"Tübingen pair), closed-loop clients, TorchServe's batchSize 1 against 4, maxBatchDelay "
                  f"{bt['max_batch_delay_ms']} ms, on this section's machine; `bench/batching.py`. Small requests "
                  "keep it within minutes on 2 cores.", ""] + batching.report(bt, "Server, CPU")
    if "corpus" in r:
        lines += [""] + corpus.report(r["corpus"], r["corpus"].get("machine", r.get("machine", "")))
    lines += gpu_sections()
    return "\n".join(lines) + "\n"


def gpu_sections() -> list[str]:
    """One section per card, from each bench/gpu_results_*.json that
    `python bench/gpu.py --out ...` wrote on a lent GPU (this CPU has none)."""
    import gpu
    import gpu_batch_equality

    lines = []
    for path in sorted(OUT_DIR.glob("gpu_results_*.json"), reverse=True):  # the newest card first
        r = json.loads(path.read_text())
        lines += ["", gpu.report(r), "", f"(From `{path.relative_to(ROOT)}`. The bench's own memory rows were "
                  "measured after other runs in the same process, which already hold fixed workspaces"
                  + (", with cuDNN's autotuning on: it tries workspaces as large as the free memory (the 1024x768 "
                     "row)" if r.get("cudnn_benchmark") else "")
                  + ". `tests/core/test_memory.py` measures each size fresh; its figures calibrate the estimate."
                  + (f" {r['memory_note']}" if r.get("memory_note") else "") + ")"]
        if r.get("gpu_tests"):
            lines += ["", "GPU tests: " + r["gpu_tests"]]
        equality = path.with_name(path.name.replace("gpu_results_", "gpu_batch_equality_"))
        if equality.exists():
            lines += [""] + gpu_batch_equality.report(json.loads(equality.read_text()))
    return lines


def main_report(r: dict, plot_link: str) -> list[str]:
    ref_res, d, q = r["reference"], r["default"], r["time_to_reference_quality"]
    lines = [
        f"- Machine: {r['machine']}" + (f"; device {r['device']}; run {r['run_at']}" if "run_at" in r else "")
        + (f"; load average (1 min) {r['load_avg_1m'][0]:.1f} at the start, {r['load_avg_1m'][1]:.1f} at the end"
           if "load_avg_1m" in r else ""),
        f"- Image: {r['size']} px (tubingen / starry_night), weights: {r['weights']}",
        f"- Reference recipe (bench/reference_recipe.py, the tutorial's own code): "
        f"{ref_res['per_step_s'] * 1e3:.1f} ms/step (steady state), 2000 steps = {ref_res['time_2000_s']:.1f} s"
        + (f" (extrapolated from {ref_res['steps_run']} steps)" if ref_res["extrapolated"] else " (all 2000 run)")
        + f", final loss on its PNG {ref_res['final_loss_png']:.3f}.",
        "",
        "Scores are the recipe's own loss of the delivered 8-bit PNG. Times are wall",
        "times of a whole in-process request (decode, optimize, encode).",
        "",
        "| measure | result | target |",
        "|---|---|---|",
    ]
    if q["steps"]:
        lines.append(f"| time to the reference quality | {q['speedup_vs_reference']:.0f}x faster "
                     f"({q['steps']} steps, loss {q['sweep'][-1]['loss_png']:.3f}) | >= 100x |")
    else:
        lines.append("| time to the reference quality | not reached in the sweep | >= 100x |")
    lines += [
        f"| default quality (steps={d['steps']}) | loss {d['loss_vs_reference']:.3f} of the reference's, "
        f"{d['speedup_vs_reference']:.0f}x faster | <= 0.1, >= 20x |",
        f"| preset=seed per-step cost (steady state, {r['seed_preset']['steps_run']} steps) | "
        f"{r['seed_preset']['per_step_vs_reference']:.2f}x the reference's | <= 1x |",
    ]
    if "http_overhead" in r:
        h = r["http_overhead"]
        lines.append(f"| HTTP vs in-process ({h['steps']} steps, median of {h['repeats']}) | "
                     f"{h['overhead'] * 100:+.1f}% ({h['http_s']:.2f} s vs {h['local_s']:.2f} s; outside the "
                     f"optimization {h['outside_optimization_http_s'] * 1e3:.0f} ms vs "
                     f"{h['outside_optimization_local_s'] * 1e3:.0f} ms) | <= 5% |")
    lines += ["", f"![loss against wall time]({plot_link})", ""]
    if "throughput" in r:
        lines += ["Throughput (1 worker, 64 px, 10 steps per request):", "",
                  "| clients | requests | req/s | p50 latency, s |", "|---|---|---|---|"]
        for c, t in r["throughput"].items():
            lines.append(f"| {c} | {t['requests']} | {t['req_per_s']:.2f} | {t['p50_s']:.2f} |")
        lines += ["", f"Peak RSS: worker {r['worker_peak_rss_mib']:.0f} MiB, "
                  f"benchmark process {r['bench_peak_rss_mib']:.0f} MiB.", ""]
    lines += ["Time-to-quality sweep (default settings, steps varied):", "",
              "| steps | wall, s | loss (PNG) |", "|---|---|---|"]
    for s in q["sweep"]:
        lines.append(f"| {s['steps']} | {s['wall_s']:.2f} | {s['loss_png']:.3f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(ROOT / "weights" / nst_weights.FILE_NAME))
    ap.add_argument("--size", default="170x128", help="WxH of both images")
    ap.add_argument("--reference-steps", type=int, default=2000,
                    help="reference steps actually run; fewer = per-step time extrapolated to 2000")
    ap.add_argument("--seed-steps", type=int, default=100, help="preset=seed steps timed")
    ap.add_argument("--http-steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--no-server", action="store_true", help="skip the HTTP measurements (batching too)")
    ap.add_argument("--no-batching", action="store_true", help="skip batching through the server")
    ap.add_argument("--batching-only", action="store_true",
                    help="run only batching through the server; the other figures of results.json are kept")
    ap.add_argument("--batching-steps", type=int, default=20)
    ap.add_argument("--batching-size", type=int, default=128, help="max_size of the batching requests")
    ap.add_argument("--batching-delay-ms", type=int, default=25, help="maxBatchDelay of the batched server")
    ap.add_argument("--device", default="cpu", help="torch device of every method (cpu, cuda, cuda:1, ...)")
    corpus_args = ap.add_argument_group("quality corpus (bench/corpus.py)")
    which = corpus_args.add_mutually_exclusive_group()
    which.add_argument("--corpus-only", action="store_true",
                       help="run only the corpus; the other figures of results.json are kept")
    which.add_argument("--no-corpus", action="store_true", help="skip the corpus")
    which.add_argument("--resume", action="store_true",
                       help="finish the incomplete corpus run in results.json (same settings): only its missing pairs")
    corpus_args.add_argument("--pairs", help="comma-separated corpus pairs to run (default: all)")
    corpus_args.add_argument("--recipe-targets", help="the stored recipe targets to use and fill (default: "
                             "recipe_targets.json in the corpus folder, with 2000 recipe steps only)")
    corpus_args.add_argument("--fresh-recipe", action="store_true",
                             help="run all 2000 recipe steps per pair even where bench/corpus/recipe_targets.json "
                                  "holds a matching target (and store the new ones)")
    corpus_args.add_argument("--corpus-scale", type=float, default=1.0,
                             help="resize every pair by this factor (LANCZOS; above 1 upsamples the stored PNGs)")
    corpus_args.add_argument("--corpus-dir", default=str(corpus.CORPUS_DIR))
    corpus_args.add_argument("--corpus-reference-steps", type=int, default=None,
                             help="recipe steps per pair (default: --reference-steps); fewer = time extrapolated")
    corpus_args.add_argument("--search-bound", type=int, default=300,
                             help="most default steps tried to reach the recipe's loss")
    corpus_args.add_argument("--corpus-default-steps", type=int, default=None,
                             help="the default's steps (default: Params().steps)")
    ap.add_argument("--out-dir", default=str(OUT_DIR), help="where results.json and the plot go")
    ap.add_argument("--report", default=str(ROOT / "docs" / "PERFORMANCE.md"), help="the Markdown report")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report from bench/results.json and bench/gpu_results_*.json")
    args = ap.parse_args(argv)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    device = torch.device(args.device)
    vgg, ref_vgg, weights_kind = load_models(args.weights, device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    plot_link = os.path.relpath(out_dir / "loss_vs_time.png", Path(args.report).resolve().parent)
    parts = []

    def save(results: dict) -> None:
        """Results and report so far: a run cut short keeps what it measured."""
        results["bench_wall_s"] = base_wall + time.perf_counter() - t_start
        results["bench_cpu_s"] = base_cpu + time.process_time() - cpu_start  # this process only (not TorchServe's)
        results["bench_parts"] = ", ".join(parts)
        if not args.corpus_only:
            results["engine"] = "nst.lbfgs"  # the device-resident L-BFGS of issue #11
        results_path.write_text(json.dumps(results, indent=2))
        Path(args.report).write_text(report(results, plot_link))
    if args.report_only:  # rewrite the report from the stored results, measuring nothing
        Path(args.report).write_text(report(json.loads(results_path.read_text()), plot_link))
        return 0
    base_wall = base_cpu = 0.0
    if args.batching_only:  # keep the other figures; measure batching alone
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        b = Bench(args, vgg, ref_vgg, weights_kind)
        b.results = results
        b.batching()
        parts.append("batching")
        save(results)
        print(report(results, plot_link))
        return 0
    if args.corpus_only or args.resume:  # keep the figures of the last full run beside the new corpus
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        if args.resume:  # the run cut short and this one add up
            base_wall, base_cpu = results.get("bench_wall_s", 0.0), results.get("bench_cpu_s", 0.0)
            parts.extend(p for p in results.get("bench_parts", "").split(", ") if p and not p.startswith("corpus"))
    else:
        b = Bench(args, vgg, ref_vgg, weights_kind)
        load0 = os.getloadavg()[0]
        b.reference()
        b.seed_preset()
        b.default()
        b.time_to_reference_quality()
        parts.append(f"{args.size} pair")
        if not args.no_server:
            b.server()
            parts.append("server")
            if not args.no_batching:
                b.batching()
                parts.append("batching")
        results = b.results
        results["load_avg_1m"] = [load0, os.getloadavg()[0]]  # other processes on the machine, start and end
        if "reference" in results:
            plot(results, out_dir / "loss_vs_time.png")
        save(results)
    if not args.no_corpus:
        names = [n.strip() for n in args.pairs.split(",") if n.strip()] if args.pairs else None
        parts.append("corpus")

        def progress(c: dict) -> None:
            results["corpus"] = {**c, "machine": machine(), "weights": weights_kind}
            parts[-1] = f"corpus {c['wall_s'] / 60:.1f} min"
            save(results)
        resume = None
        if args.resume:
            resume = results.get("corpus")
            if not resume or resume.get("complete", True):
                raise SystemExit(f"--resume: no incomplete corpus run in {results_path}")
        # Stored recipe targets: the given file, else the corpus's own, used only for its full 2000 steps.
        recipe_steps = args.corpus_reference_steps or args.reference_steps
        recipe_targets = (Path(args.recipe_targets) if args.recipe_targets
                          else Path(args.corpus_dir) / corpus.RECIPE_TARGETS if recipe_steps == 2000 else None)
        corpus.run_corpus(
            vgg, ref_vgg, device, names=names, scale=args.corpus_scale, corpus_dir=Path(args.corpus_dir),
            recipe_steps=recipe_steps, bound=args.search_bound, default_steps=args.corpus_default_steps,
            log=lambda m: print(m, flush=True), on_progress=progress,
            resume=resume, targets=recipe_targets,
            fresh_recipe=args.fresh_recipe)
    save(results)
    print(report(results, plot_link))
    print(f"bench wall time: {results['bench_wall_s'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
