"""The optimization loop: progress, convergence, reproducibility, failures."""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from nst import BudgetExceeded, Diverged, Limits, parse_request, run
from nst.request import build_params
from nst.optimize import quantize, stylize, transfer_luminance


@pytest.fixture(scope="module")
def pair(images):
    return images.tensor(images.content(48, 32)), images.tensor(images.style(48, 32))


@pytest.mark.parametrize(
    "given, optimizer",
    [({"steps": 8}, "lbfgs"), ({"steps": 8, "optimizer": "adam"}, "adam")],
    ids=["fast-lbfgs", "fast-adam"],
)
def test_loss_decreases(vgg, pair, given, optimizer):
    content, style = pair
    params = build_params(given, Limits())
    assert params.optimizer == optimizer and params.preset == "fast"
    progress = []
    result = stylize(vgg, content, [style], params, callback=progress.append, progress_every=1)

    assert [p.step for p in progress] == list(range(1, 9))
    assert result.history == progress and result.steps == 8
    losses = [p.loss for p in progress]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert losses[-1] < losses[0]
    assert result.loss < losses[0]  # the delivered image beats the starting point
    assert min(losses[1:]) < losses[0]
    if optimizer == "adam":  # small, steady steps: monotone
        assert all(b < a for a, b in zip(losses, losses[1:]))


def test_progress_every(vgg, pair):
    content, style = pair
    params = build_params({"steps": 7, "optimizer": "adam"}, Limits())
    progress = []
    stylize(vgg, content, [style], params, callback=progress.append, progress_every=3)
    assert [p.step for p in progress] == [3, 6, 7]  # and always the last one
    assert all(p.steps == 7 and p.elapsed_ms >= 0 for p in progress)
    assert [p.elapsed_ms for p in progress] == sorted(p.elapsed_ms for p in progress)


# --- 4. seed ---------------------------------------------------------------


def test_seed_gives_identical_tensors(vgg, pair):
    content, style = pair
    params = build_params({"steps": 3, "init": "noise", "seed": 42}, Limits())
    a = stylize(vgg, content, [style], params)
    b = stylize(vgg, content, [style], params)
    assert torch.equal(a.image, b.image)
    assert a.loss == b.loss
    c = stylize(vgg, content, [style], dataclasses.replace(params, seed=43))
    assert not torch.equal(a.image, c.image)


def test_seed_gives_identical_png_bytes(vgg, images):
    fields = {
        "content": images.png(images.content(40, 32)),
        "style": images.jpeg(images.style(32, 32)),
        "steps": b"3",
        "max_size": b"40",
        "init": b"noise",
    }
    limits = Limits()
    out = {seed: run(parse_request({**fields, "seed": seed}, limits), vgg, limits).data for seed in (b"7", b"8")}
    again = run(parse_request({**fields, "seed": b"7"}, limits), vgg, limits).data
    assert out[b"7"] == again
    assert out[b"7"] != out[b"8"]


def test_noise_init_depends_on_seed_only_not_global_rng(vgg, pair):
    content, style = pair
    params = build_params({"steps": 1, "init": "noise", "seed": 5, "optimizer": "adam"}, Limits())
    torch.manual_seed(1)
    a = stylize(vgg, content, [style], params)
    torch.manual_seed(2)
    b = stylize(vgg, content, [style], params)
    assert torch.equal(a.image, b.image)


# --- 11. failures ------------------------------------------------------------


def test_deadline_in_the_past_raises_budget_exceeded(vgg, pair):
    content, style = pair
    params = build_params({"steps": 3}, Limits())
    progress = []
    with pytest.raises(BudgetExceeded):
        stylize(vgg, content, [style], params, callback=progress.append, deadline=time.monotonic() - 1)
    assert progress == []


def test_absurd_lr_in_recipe_mode_diverges(vgg, pair):
    content, style = pair
    params = dataclasses.replace(build_params({"preset": "seed", "steps": 4}, Limits()), lr=1e30)
    assert params.normalized_space and params.optimizer == "adam"
    with pytest.raises(Diverged):
        stylize(vgg, content, [style], params)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_nan_input_diverges(vgg, pair, optimizer):
    content, style = pair
    poisoned = content.clone()
    poisoned[0, :, 3, 4] = float("nan")
    params = build_params({"steps": 3, "optimizer": optimizer}, Limits())
    with pytest.raises(Diverged):
        stylize(vgg, poisoned, [style], params)


# --- helpers of the loop -----------------------------------------------------


def test_quantize_clamps_and_rounds_to_8_bit():
    x = torch.tensor([-0.5, 0.0, 0.1, 0.5, 0.999, 1.7])
    expected = torch.tensor([round(min(max(v, 0.0), 1.0) * 255) / 255 for v in x.tolist()])
    torch.testing.assert_close(quantize(x), expected)


def test_transfer_luminance_keeps_content_chroma_and_stylized_luma():
    gen = torch.Generator().manual_seed(0)
    stylized = 0.2 + 0.6 * torch.rand(1, 3, 8, 8, generator=gen)
    content = 0.2 + 0.6 * torch.rand(1, 3, 8, 8, generator=gen)

    def ycbcr(rgb):  # BT.601, independent constants (ITU-R BT.601 / JFIF)
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        y = 0.299 * r + 0.587 * g + 0.114 * b
        return y, (b - y) / 1.772, (r - y) / 1.402

    out = transfer_luminance(stylized, content)
    y_out, cb_out, cr_out = ycbcr(out)
    y_sty, _, _ = ycbcr(stylized)
    _, cb_con, cr_con = ycbcr(content)
    # pixels that were not clamped keep the exact split
    inside = ((out > 0) & (out < 1)).all(1)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(y_out[inside], y_sty[inside], atol=2e-3, rtol=0)
    torch.testing.assert_close(cb_out[inside], cb_con[inside], atol=2e-3, rtol=0)
    torch.testing.assert_close(cr_out[inside], cr_con[inside], atol=2e-3, rtol=0)
