"""No stall: on the corpus's hardest pairs, shrunk, the default (the fast preset,
its default steps) delivers an image at least as good as the tutorial
recipe's, by the recipe's own loss of the two delivered 8-bit PNGs.

Issue 11's bar is the recipe's 2000-step loss, and `make bench` measures that
on every pair. Here 2000 recipe steps would take about a minute per pair on 2
CPU cores, so the recipe runs RECIPE_STEPS = 700 of them (35%) on the same
input: a lower bar, which a stalled optimizer still misses. (At 43x32 the
dark pair's stalled default sits at about 3.4e3 from its fifth step; the
recipe passes that near step 650 and reaches 1.4e2 at 2000.)

The recipe's VGG is cut after relu5_1 (`[:30]`): the layers after it never
reach the loss, so losses and gradients are the tutorial's, bit for bit,
without the forward work it throws away.

Quality only: nothing here is timed. Same code as the bench (bench/corpus.py),
with the test suite's deterministic random VGG. The pairs are the hardest of
the corpus for the L-BFGS default of issue 11 (stalled, or worst against the
recipe, at this size): a near-black style, a noise style on flat shapes, and
saturated primaries.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nst import Params

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import corpus  # noqa: E402
import reference_recipe as ref  # noqa: E402

RECIPE_STEPS = 700  # 35% of the recipe's 2000
SCALE = 4 / 9  # the regular pairs are 96x72: 43x32
HARDEST = ["dark_style", "noise_style", "primaries_content"]


@pytest.fixture(scope="module")
def ref_vgg(vgg_state):
    full = ref.load_vgg(vgg_state)
    cut = full[:30]
    (pair,) = corpus.load_pairs(["dark_style"], SCALE)
    b = corpus.PairBench(pair, None, full, torch.device("cpu"))
    assert ref.score(b.content_n * 0 + 0.5, b.content_n, b.style_n, cut) == ref.score(
        b.content_n * 0 + 0.5, b.content_n, b.style_n, full)
    return cut


@pytest.mark.parametrize("name", HARDEST)
def test_default_reaches_the_recipe_loss(name, vgg, ref_vgg):
    (pair,) = corpus.load_pairs([name], SCALE)
    assert min(pair.size) >= 32 and max(pair.size) <= 64
    b = corpus.PairBench(pair, vgg, ref_vgg, torch.device("cpu"))
    recipe = b.recipe(RECIPE_STEPS)["loss_png"]
    steps = Params().steps
    loss, _ = b.request(steps)
    assert loss <= recipe, (
        f"{name} at {pair.size[0]}x{pair.size[1]}: the default's {steps} steps deliver loss {loss:.4g}, "
        f"{loss / recipe:.3g}x the recipe's {RECIPE_STEPS}-step {recipe:.4g}"
    )
