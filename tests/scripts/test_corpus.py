"""The quality corpus (bench/corpus): there, small, diverse as it claims, and
reproducible; the search the bench uses to find the default's steps to the
recipe's loss."""
from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import corpus  # noqa: E402
import make_corpus  # noqa: E402

CORPUS = ROOT / "bench" / "corpus"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
# What issue 11 asks the corpus to cover, as the manifest's `covers` tags.
REQUIRED = {"dark style", "bright style", "flat style", "noise style", "grayscale content",
            "primaries content", "flat regions content", "tiny", "elongated"}


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64) / 255


def luminance(a: np.ndarray) -> np.ndarray:
    return a @ np.array([0.299, 0.587, 0.114])


def constant_3x3_share(a: np.ndarray) -> float:
    """Share of interior pixels whose 3x3 neighbourhood is one colour."""
    centre = a[1:-1, 1:-1]
    same = np.ones(centre.shape[:2], bool)
    h, w = a.shape[:2]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= np.all(a[1 + dy: h - 1 + dy, 1 + dx: w - 1 + dx] == centre, axis=-1)
    return float(same.mean())


def _is_derived(pair: dict, role: str) -> bool:
    return MANIFEST["images"][pair[role]]["source"] != "synthetic"


# Each tag -> a check of the pixels the bench sees (content c, style s: (H,W,3) in [0,1]) and the manifest entry.
CHECKS = {
    "dark style": lambda c, s, p: luminance(s).mean() < 0.08 and (luminance(s) < 0.15).mean() > 0.9,
    "bright style": lambda c, s, p: luminance(s).mean() > 0.85 and (luminance(s) > 0.75).mean() > 0.95,
    "flat style": lambda c, s, p: luminance(s).std() < 0.02 and 0.2 < luminance(s).mean() < 0.8,
    # neighbouring pixels differ by a third of the range on average (a painting: under 0.1)
    "noise style": lambda c, s, p: np.abs(np.diff(s, axis=1)).mean() > 0.2 and np.abs(np.diff(s, axis=0)).mean() > 0.2,
    "grayscale content": lambda c, s, p: np.array_equal(c[..., 0], c[..., 1]) and np.array_equal(c[..., 1], c[..., 2])
    and luminance(c).std() > 0.05,
    "primaries content": lambda c, s, p: _primaries(c),
    "flat regions content": lambda c, s, p: constant_3x3_share(c) > 0.6,
    "tiny": lambda c, s, p: 16 <= min(c.shape[:2]) and max(c.shape[:2]) <= 32,
    "elongated": lambda c, s, p: c.shape[1] == 8 * c.shape[0],
    "photo content": lambda c, s, p: _is_derived(p, "content") and constant_3x3_share(c) < 0.05,
    "painting content": lambda c, s, p: _is_derived(p, "content") and constant_3x3_share(c) < 0.05,
    "painting style": lambda c, s, p: _is_derived(p, "style") and constant_3x3_share(s) < 0.05,
}


def _primaries(a: np.ndarray) -> bool:
    """At least 15% of pixels strongly saturated, among them red, yellow and blue ones."""
    mx, mn = a.max(-1), a.min(-1)
    sat = (mx > 0.7) & ((mx - mn) / np.maximum(mx, 1e-9) > 0.8)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    red = sat & (r > 0.7) & (g < 0.2) & (b < 0.2)
    yellow = sat & (r > 0.7) & (g > 0.7) & (b < 0.2)
    blue = sat & (b > 0.7) & (r < 0.2) & (g < 0.3)
    return sat.mean() > 0.15 and all(m.mean() > 0.02 for m in (red, yellow, blue))


def test_corpus_is_there_small_and_documented():
    pairs = MANIFEST["pairs"]
    assert len(pairs) >= 12
    assert len({p["name"] for p in pairs}) == len(pairs)
    files = set(MANIFEST["images"])
    assert {p[r] for p in pairs for r in ("content", "style")} == files
    readme = (CORPUS / "README.md").read_text()
    for name, entry in MANIFEST["images"].items():
        assert (CORPUS / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert entry["licence"] and entry["how"], name
        assert name in readme and entry["licence"] in readme, name
    for p in pairs:
        for role in ("content", "style"):
            assert Image.open(CORPUS / p[role]).size == tuple(p["size"]), (p["name"], role)
        assert max(p["size"]) <= 256 and min(p["size"]) >= 32  # the recipe's VGG pools 5 times
    total = sum((CORPUS / f).stat().st_size for f in files)
    assert total < 512 * 1024, total


def test_corpus_covers_every_required_case():
    covered = {t for p in MANIFEST["pairs"] for t in p["covers"]}
    assert REQUIRED <= covered, REQUIRED - covered
    assert covered <= set(CHECKS), covered - set(CHECKS)  # every claim has a check below


@pytest.mark.parametrize("pair", MANIFEST["pairs"], ids=lambda p: p["name"])
def test_every_pair_is_what_it_claims(pair):
    (loaded,) = corpus.load_pairs([pair["name"]])
    c, s = rgb(loaded.content_png), rgb(loaded.style_png)
    assert c.shape == s.shape == (pair["size"][1], pair["size"][0], 3)
    for tag in pair["covers"]:
        assert CHECKS[tag](c, s, pair), f"{pair['name']}: not a '{tag}'"
    assert not np.array_equal(c, s)


def test_claims_are_not_vacuous():
    """The checks tell the cases apart: no style passes both the dark and the
    bright check, and the ordinary painting styles pass none of the extreme ones."""
    styles = {}
    for p in corpus.load_pairs():
        styles.setdefault(p.name, rgb(p.style_png))
    extreme = ("dark style", "bright style", "flat style", "noise style")
    for name, s in styles.items():
        claims = {t for t in extreme if CHECKS[t](None, s, None)}
        covers = set(next(p["covers"] for p in MANIFEST["pairs"] if p["name"] == name))
        assert claims == covers & set(extreme), (name, claims)


def test_synthetic_images_regenerate_exactly(tmp_path):
    m = make_corpus.build(tmp_path, make_corpus.SHARED, synthetic_only=True)
    assert m["pairs"] == MANIFEST["pairs"]
    synthetic = [n for n, e in MANIFEST["images"].items() if e["source"] == "synthetic"]
    assert len(synthetic) >= 5
    for name in synthetic:
        a = np.asarray(Image.open(tmp_path / name).convert("RGB"))
        b = np.asarray(Image.open(CORPUS / name).convert("RGB"))
        assert np.array_equal(a, b), name


@pytest.mark.skipif(not make_corpus.SHARED.is_dir(), reason="the shared example images are not on this machine")
def test_whole_corpus_regenerates_exactly(tmp_path):
    make_corpus.build(tmp_path, make_corpus.SHARED)
    assert json.loads((tmp_path / "manifest.json").read_text()) == MANIFEST
    assert (tmp_path / "README.md").read_text() == (CORPUS / "README.md").read_text()
    for name in MANIFEST["images"]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), np.asarray(Image.open(CORPUS / name))), name


def test_scaled_pairs_keep_both_images_the_same_size():
    (p,) = corpus.load_pairs(["elongated"], scale=1.5)
    assert p.size == (384, 48)
    assert Image.open(io.BytesIO(p.content_png)).size == p.size
    assert Image.open(io.BytesIO(p.style_png)).size == p.size


# -- the search for the default's steps to the recipe's loss ----------------------------
def _counting(values):
    calls = []

    def evaluate(n):
        calls.append(n)
        return values[n]
    return evaluate, calls


@pytest.mark.parametrize("seed", range(40))
def test_steps_to_target_finds_the_first_crossing_of_a_falling_curve(seed):
    rng = random.Random(seed)
    bound = rng.randint(1, 300)
    values = [None] + sorted((rng.uniform(0, 100) for _ in range(bound)), reverse=True)
    target = rng.uniform(-5, 105)
    first = next((n for n in range(1, bound + 1) if values[n] <= target), None)
    guess = rng.randint(1, bound) if seed % 2 else (first or bound)
    evaluate, calls = _counting(values)
    assert corpus.steps_to_target(evaluate, target, guess, bound) == first
    if seed % 2 == 0 and first is not None:
        assert len(calls) <= 2  # a right guess costs its own check and its neighbour's


def test_steps_to_target_on_a_bumpy_curve_returns_a_true_crossing():
    rng = random.Random(7)
    values = [None] + [100 / n * (1 + 0.2 * rng.random()) for n in range(1, 201)]
    for target in (30, 5, 1.0):
        n = corpus.steps_to_target(_counting(values)[0], target, 50, 200)
        assert values[n] <= target and (n == 1 or values[n - 1] > target)
    assert corpus.steps_to_target(_counting(values)[0], 0.1, 50, 200) is None


def test_summary_counts_a_pair_not_reached_as_the_worst():
    def pair(name, speedup):
        return {"name": name, "time_to_recipe_loss": {"speedup": speedup}}
    s = corpus.summary([pair("a", 300.0), pair("b", None), pair("c", 40.0), pair("d", 200.0)])
    assert s["worst_pair"] == "b" and s["worst_speedup"] == 0.0 and s["not_reached"] == ["b"]
    assert s["median_speedup"] == 120.0 and not s["meets_median"] and not s["meets_worst"]
    assert s["below_worst_target"] == ["b"]


def test_flat_from_finds_where_a_stalled_curve_stops_moving():
    stalled = {0: 9e5, 1: 3e5, 2: 7622.0, 3: 7508.0, **{n: 7508.0 for n in range(4, 60)}, **{n: 7309.0 for n in range(60, 300)}}
    assert corpus.flat_from(stalled) == 2  # the bf16 -> float32 switch (2.7%) is within the tolerance
    falling = {n: 1000.0 / (n + 1) for n in range(300)}
    assert corpus.flat_from(falling) > 250  # a curve still falling is flat only near its end
