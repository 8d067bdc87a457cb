"""Coarse-to-fine (config.COARSE_TO_FINE_FROM): half size for the first part
of the steps, then full size from the coarse stylization carried onto the
content. Off by default: on an H100 it lost to single-scale at 1024 and
2048 px (nst.config.COARSE_TO_FINE_FROM); here the threshold is lowered to
run it on small images."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import nst.optimize as optimize_mod
from nst.config import Params
from nst.losses import make_objective
from nst.optimize import stylize


@pytest.fixture
def pair():
    gen = torch.Generator().manual_seed(7)
    return torch.rand(1, 3, 48, 64, generator=gen), torch.rand(1, 3, 48, 64, generator=gen)


def recipe_loss(vgg, image, content, style) -> float:
    p = Params()
    objective = make_objective(vgg, vgg.normalize(content), [vgg.normalize(style)],
                               style_layer_weights=p.style_layer_weights, content_weight=p.content_weight,
                               style_weight=p.style_weight)
    return objective(vgg.normalize(image)).total.item()


def test_off_by_default_and_below_the_threshold(vgg, pair, monkeypatch):
    assert optimize_mod.COARSE_TO_FINE_FROM is None
    calls = []
    monkeypatch.setattr(optimize_mod, "_coarse_to_fine", lambda *a, **k: calls.append(1))
    content, style = pair
    stylize(vgg, content, [style], dataclasses.replace(Params(), steps=2))
    monkeypatch.setattr(optimize_mod, "COARSE_TO_FINE_FROM", 65)  # 64 px is below it
    stylize(vgg, content, [style], dataclasses.replace(Params(), steps=2))
    assert calls == []


def test_steps_are_numbered_across_both_stages_and_the_result_is_full_size(vgg, pair, monkeypatch):
    monkeypatch.setattr(optimize_mod, "COARSE_TO_FINE_FROM", 64)
    content, style = pair
    seen = []
    result = stylize(vgg, content, [style], dataclasses.replace(Params(), steps=20), callback=seen.append,
                     progress_every=5)
    assert result.image.shape == content.shape and result.steps == 20
    assert [p.step for p in seen] == [5, 10, 15, 20]  # 10 coarse steps, then 10 at full size
    assert all(p.steps == 20 for p in seen) and [p.step for p in result.history] == [5, 10, 15, 20]
    elapsed = [p.elapsed_ms for p in seen]
    assert elapsed == sorted(elapsed)  # one clock for the whole request
    assert result.loss == pytest.approx(recipe_loss(vgg, result.image, content, style), rel=1e-4)


def test_the_fine_stage_starts_from_the_coarse_stylization(vgg, pair, monkeypatch):
    """The full-size start is the content plus the coarse stage's change: better
    than the content, better than the coarse image merely upsampled (which
    blurs the content's detail away), and the fine steps improve on it."""
    content, style = pair
    start = recipe_loss(vgg, content, content, style)
    monkeypatch.setattr(optimize_mod, "COARSE_TO_FINE_FROM", 64)
    inits, coarse = [], []
    real = optimize_mod.stylize

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("first_step", 1) > 1:
            inits.append(kwargs["init"])
        elif kwargs.get("init") is not None:
            coarse.append(out.image)
        return out

    monkeypatch.setattr(optimize_mod, "stylize", spy)
    result = optimize_mod.stylize(vgg, content, [style], dataclasses.replace(Params(), steps=40))
    (init,) = inits
    assert init.shape == content.shape and 0 <= init.min() and init.max() <= 1
    at_switch = recipe_loss(vgg, init, content, style)
    upsampled = torch.nn.functional.interpolate(coarse[0], size=content.shape[-2:], mode="bilinear")
    assert at_switch < start
    assert at_switch < recipe_loss(vgg, upsampled, content, style)
    assert result.loss < at_switch
