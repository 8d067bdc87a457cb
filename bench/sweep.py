"""Sweep one engine tunable over the quality corpus: how a value of
`LBFGS_MAX_MOVE`, `LOWP_STEPS`, `LBFGS_HISTORY` or `LBFGS_HISTORY_DTYPE` moves every pair's steps
and time to the recipe's loss and its default (100-step) quality.

    python bench/sweep.py LBFGS_MAX_MOVE 0.15 0.25 0.35 0.5 --out bench/sweep_lbfgs_max_move.json

Uses the corpus part of `make bench` (bench/corpus.py) with the stored recipe
targets, so each value costs the product's runs only; the recipe's first
steps are timed once per pair (its time does not depend on the tunable) and
shared by every value. Reports, per value, the median and worst speed-up,
the pairs not reached within the bound, and the worst default loss ratio,
then each pair's steps to the recipe's loss. For choosing a value, not for
`make test`: it takes minutes per value on the 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handler"))
sys.path.insert(0, str(ROOT / "bench"))

import corpus  # noqa: E402
import reference_recipe as ref  # noqa: E402
from nst import config as nst_config  # noqa: E402
from nst import lbfgs as nst_lbfgs  # noqa: E402
from nst import optimize as nst_optimize  # noqa: E402
from nst import weights as nst_weights  # noqa: E402
from nst.vgg import VGGFeatures  # noqa: E402

# Where each tunable is read at run time (module globals imported from config).
TUNABLES = {
    "LBFGS_MAX_MOVE": (float, (nst_config, nst_optimize)),
    "LOWP_STEPS": (int, (nst_config, nst_optimize)),
    "LBFGS_HISTORY": (int, (nst_config, nst_lbfgs)),
    "LBFGS_HISTORY_DTYPE": (str, (nst_config, nst_lbfgs)),
}


def set_tunable(name: str, value) -> None:
    """`value` where `name` is read; in a per-device mapping
    (LBFGS_HISTORY_DTYPE), the CPU's entry: the sweep runs on the CPU."""
    for module in TUNABLES[name][1]:
        current = getattr(module, name)
        if isinstance(current, Mapping) and not isinstance(value, Mapping):
            value = {**current, "cpu": value}
        setattr(module, name, value)


def sweep(name: str, values: list, *, names=None, weights: Path = ROOT / "weights" / nst_weights.FILE_NAME,
          log=print) -> dict:
    device = torch.device("cpu")
    # As bench/run.py builds them: the recipe's model has layers past conv5_1
    # that the file lacks, initialized from this seed, and the stored targets'
    # key hashes them too.
    torch.manual_seed(0)
    state, _ = nst_weights.load(weights)
    vgg, ref_vgg = VGGFeatures(state), ref.load_vgg(state)
    stored = corpus.load_targets(corpus.CORPUS_DIR / corpus.RECIPE_TARGETS, corpus.target_key(ref_vgg, device, 2000))
    missing = [p.name for p in corpus.load_pairs(names) if f"{p.name}@{p.size[0]}x{p.size[1]}" not in stored]
    if missing:
        raise SystemExit(f"no stored recipe target for {', '.join(missing)} with these weights, torch and recipe: "
                         "run `make bench` first (a sweep would run each recipe's 2000 steps)")
    shipped = getattr(nst_config, name)
    recipes: dict = {}
    real_recipe = corpus.PairBench.recipe

    def recipe_once(self, steps=2000, stored=None):  # the recipe does not depend on the tunable: time it once
        key = self.pair.name
        if key not in recipes:
            recipes[key] = real_recipe(self, steps, stored)
        return recipes[key]

    out = {"tunable": name, "shipped": shipped, "run_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "values": {}}
    corpus.PairBench.recipe = recipe_once
    try:
        for value in values:
            set_tunable(name, value)
            log(f"{name} = {value}")
            t0 = time.perf_counter()
            res = corpus.run_corpus(vgg, ref_vgg, device, names=names, log=log)
            out["values"][str(value)] = {"summary": res["summary"], "wall_s": time.perf_counter() - t0, "pairs": {
                p["name"]: {"steps": p["time_to_recipe_loss"]["steps"], "speedup": p["time_to_recipe_loss"]["speedup"],
                            "default_loss_ratio": p["default"]["loss_ratio"]} for p in res["pairs"]}}
    finally:
        corpus.PairBench.recipe = real_recipe
        set_tunable(name, shipped)
    out["recipes_timed"] = len(recipes)
    return out


def merge(earlier: dict, later: dict) -> dict:
    """Two sweeps of one tunable as one, values in order (a value in both:
    the later run's). Steps are deterministic; times are each run's own."""
    if earlier["tunable"] != later["tunable"]:
        raise SystemExit(f"cannot merge a sweep of {earlier['tunable']} with one of {later['tunable']}")
    kind = TUNABLES[later["tunable"]][0]
    values = {**earlier["values"], **later["values"]}
    return {**later, "values": {k: values[k] for k in sorted(values, key=kind)},
            "run_at": f"{earlier['run_at']} and {later['run_at']}",
            "recipes_timed": earlier.get("recipes_timed", 0) + later.get("recipes_timed", 0)}


def report(r: dict) -> list[str]:
    values = list(r["values"])
    lines = [f"{r['tunable']} over the quality corpus (shipped: {r['shipped']}; {r['run_at']}, torch {r['torch']}, "
             f"{r['threads']} threads), bench/sweep.py:", "",
             "| value | median speed-up | worst pair | not reached | steps, all pairs reached | "
             "worst default loss ratio |", "|---|---|---|---|---|---|"]
    for v in values:
        s, pairs = r["values"][v]["summary"], r["values"][v]["pairs"]
        worst_ratio = max(pairs.values(), key=lambda p: p["default_loss_ratio"])
        total = sum(p["steps"] for p in pairs.values() if p["steps"] is not None)
        lines.append(f"| {v} | {s['median_speedup']:.0f}x | {s['worst_pair']} {s['worst_speedup']:.0f}x | "
                     f"{len(s['not_reached'])} | {total} | {worst_ratio['default_loss_ratio']:.3g} |")
    names = list(r["values"][values[0]]["pairs"])
    lines += ["", "Steps to the recipe's loss, per pair:", "",
              "| pair | " + " | ".join(values) + " |", "|---|" + "---|" * len(values)]
    for n in names:
        cells = [r["values"][v]["pairs"][n]["steps"] for v in values]
        lines.append(f"| {n} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tunable", choices=sorted(TUNABLES))
    ap.add_argument("values", nargs="+")
    ap.add_argument("--pairs", nargs="*", help="corpus pairs (default: all)")
    ap.add_argument("--out", type=Path, help="JSON results")
    ap.add_argument("--weights", type=Path, default=ROOT / "weights" / nst_weights.FILE_NAME)
    ap.add_argument("--merge", type=Path, help="an earlier sweep's JSON (same tunable): its values join this run's")
    args = ap.parse_args(argv)
    kind = TUNABLES[args.tunable][0]
    r = sweep(args.tunable, [kind(v) for v in args.values], names=args.pairs, weights=args.weights)
    if args.merge:
        r = merge(json.loads(args.merge.read_text()), r)
    if args.out:
        args.out.write_text(json.dumps(r, indent=1) + "\n")
    print("\n".join(report(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
