"""The truncated VGG19 extractor and loading weights in both checkpoint layouts."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchvision

from nst import weights
from nst.vgg import (
    LAYER_NAMES,
    TORCHVISION_INDEX,
    VGGFeatures,
    canonical_layer,
    features_state_dict,
    random_features_state,
)

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28)  # torchvision's VGG19 features, up to conv5_1
EXPECTED_KEYS = {f"{i}.{k}" for i in CONV_INDICES for k in ("weight", "bias")}


@pytest.fixture(scope="module")
def torchvision_vgg19():
    torch.manual_seed(0)
    return torchvision.models.vgg19(weights=None)


@pytest.fixture
def counting_vgg(vgg_state, monkeypatch):
    """A fresh extractor whose convolutions are counted, per layer, by weight identity."""
    import nst.vgg

    model = VGGFeatures(vgg_state)
    calls = [0] * len(model.convs)
    index = {id(conv.weight): k for k, conv in enumerate(model.convs)}
    real_conv2d = F.conv2d

    def counting_conv2d(x, weight, *args, **kwargs):
        calls[index[id(weight)]] += 1
        return real_conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(nst.vgg.F, "conv2d", counting_conv2d)
    return model, calls


def test_layer_table_matches_torchvision(torchvision_vgg19):
    tv = torchvision_vgg19.features
    convs = [i for i, m in enumerate(tv) if isinstance(m, torch.nn.Conv2d)]
    assert tuple(convs[:13]) == CONV_INDICES
    assert [TORCHVISION_INDEX[n] for n in LAYER_NAMES] == list(CONV_INDICES)


@pytest.mark.parametrize("layers, last", [(["conv1_1"], 0), (["relu2_1"], 2), (["conv1_1", "conv3_1"], 4), (["conv4_2"], 9), (["conv5_1", "conv1_1"], 12)])
def test_forward_stops_at_deepest_requested_layer(counting_vgg, layers, last):
    model, calls = counting_vgg
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x, layers)
    assert calls == [1] * (last + 1) + [0] * (len(calls) - last - 1)
    assert set(out) == {canonical_layer(n) for n in layers}


def test_outputs_are_post_relu_convs(vgg, vgg_state):
    """conv1_1 and conv2_1 recomputed with functional ops straight from the state dict."""
    x = torch.randn(1, 3, 24, 20)
    with torch.no_grad():
        out = vgg(x, ["conv1_1", "conv2_1"])
        a = F.relu(F.conv2d(x, vgg_state["0.weight"], vgg_state["0.bias"], padding=1))
        b = F.relu(F.conv2d(a, vgg_state["2.weight"], vgg_state["2.bias"], padding=1))
        c = F.relu(F.conv2d(F.max_pool2d(b, 2, 2), vgg_state["5.weight"], vgg_state["5.bias"], padding=1))
        c_avg = F.relu(F.conv2d(F.avg_pool2d(b, 2, 2), vgg_state["5.weight"], vgg_state["5.bias"], padding=1))
        out_avg = vgg(x, ["conv2_1"], pooling="avg")
    torch.testing.assert_close(out["conv1_1"], a)
    torch.testing.assert_close(out["conv2_1"], c)
    torch.testing.assert_close(out_avg["conv2_1"], c_avg)
    assert (out["conv1_1"] >= 0).all()


def test_relu_alias_names(vgg):
    assert canonical_layer("relu3_1") == "conv3_1"
    assert canonical_layer("conv4_2") == "conv4_2"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        by_relu = vgg(x, ["relu3_1", "relu1_2"])
        by_conv = vgg(x, ["conv3_1", "conv1_2"])
    assert set(by_relu) == {"conv3_1", "conv1_2"}
    for name in by_conv:
        torch.testing.assert_close(by_relu[name], by_conv[name])


@pytest.mark.parametrize("name", ["conv5_2", "relu6_1", "conv0_1", "pool1", "conv1_3", "Conv1_1", "conv1_1 ", ""])
def test_unknown_layer_names(name):
    with pytest.raises(ValueError):
        canonical_layer(name)


def test_extractor_is_frozen(vgg):
    assert not any(p.requires_grad for p in vgg.parameters())
    assert not vgg.training
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(vgg.denormalize(vgg.normalize(x)), x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(vgg.normalize(x), (x - mean) / std)


# --- state dict layouts --------------------------------------------------------


def test_full_torchvision_checkpoint_is_accepted(torchvision_vgg19):
    full = torchvision_vgg19.state_dict()
    assert any(k.startswith("classifier.") for k in full) and "features.34.weight" in full
    out = features_state_dict(full)
    assert set(out) == EXPECTED_KEYS  # classifier and convs past conv5_1 dropped
    for key in out:
        assert torch.equal(out[key], full[f"features.{key}"])


def test_features_only_state_dict_is_accepted(torchvision_vgg19):
    feats = torchvision_vgg19.features.state_dict()
    assert "30.weight" in feats
    out = features_state_dict(feats)
    assert set(out) == EXPECTED_KEYS
    assert all(torch.equal(out[k], feats[k]) for k in out)


def test_random_features_state_is_seed_zero_torchvision(torchvision_vgg19, vgg_state):
    expected = features_state_dict(torchvision_vgg19.state_dict())
    assert set(vgg_state) == EXPECTED_KEYS
    assert all(torch.equal(vgg_state[k], expected[k]) for k in expected)
    # and building it leaves the caller's RNG alone
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    random_features_state(1)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("drop", ["28.bias", "0.weight", "21.weight"])
def test_missing_tensors_raise(vgg_state, drop):
    broken = {k: v for k, v in vgg_state.items() if k != drop}
    with pytest.raises(ValueError, match="lacks"):
        features_state_dict(broken)
    with pytest.raises(ValueError):
        VGGFeatures(broken)


def test_unrelated_dict_raises():
    with pytest.raises(ValueError):
        features_state_dict({"fc.weight": torch.zeros(1), "conv1.weight": torch.zeros(1)})


def test_a_conv_of_another_shape_or_no_state_dict_raises_naming_it(vgg_state):
    """Another network's checkpoint with VGG's keys (a grayscale first conv)
    is refused where the weights are read, not when a worker builds VGG."""
    with pytest.raises(ValueError, match=r"0\.weight has shape \(64, 1, 3, 3\), VGG19's is \(64, 3, 3, 3\)"):
        features_state_dict({**vgg_state, "0.weight": torch.zeros(64, 1, 3, 3)})
    with pytest.raises(ValueError, match="28.bias has shape"):
        features_state_dict({**vgg_state, "28.bias": torch.zeros(256)})
    with pytest.raises(ValueError, match="not a state dict"):
        features_state_dict(torch.zeros(3))


def test_extractor_from_full_checkpoint_equals_from_features_dict(torchvision_vgg19, vgg):
    from_full = VGGFeatures(torchvision_vgg19.state_dict())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a = from_full(x, ["conv5_1"])["conv5_1"]
        b = vgg(x, ["conv5_1"])["conv5_1"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- weights.load and the sidecar ----------------------------------------------


def tiny_state(prefix: str = "") -> dict[str, torch.Tensor]:
    """Right keys and shapes, one stored value each (a stride-0 view saves
    its one-element storage): enough for load(), which checks the shapes
    but builds no network, without writing 52 MB a test."""
    from nst.vgg import CONVS

    shapes = {}
    for _, _, cin, cout, idx in CONVS:
        shapes[f"{idx}.weight"], shapes[f"{idx}.bias"] = (cout, cin, 3, 3), (cout,)
    return {f"{prefix}{k}": torch.full((1,), float(i)).expand(shapes[k]) for i, k in enumerate(sorted(EXPECTED_KEYS))}


@pytest.mark.parametrize(
    "sidecar, kind",
    [({"kind": "random", "source": "seed 0"}, "random"), ({"kind": "imagenet"}, "imagenet"), ({"kind": "custom"}, "custom"), ({"kind": "bogus"}, "custom"), ({}, "custom"), (None, "custom")],
)
def test_load_reads_sidecar_kind(tmp_path, sidecar, kind):
    path = tmp_path / "vgg19_features.pth"
    torch.save(tiny_state(), path)
    if sidecar is not None:
        (tmp_path / "vgg19_features.json").write_text(json.dumps(sidecar))
    state, got = weights.load(path)
    assert got == kind
    assert set(state) == EXPECTED_KEYS


def test_load_accepts_full_checkpoint_layout_and_drops_extras(tmp_path):
    path = tmp_path / "full.pth"
    raw = tiny_state("features.")
    raw["classifier.0.weight"] = torch.zeros(3)
    raw["features.30.weight"] = torch.zeros(3)
    torch.save(raw, path)
    state, kind = weights.load(str(path))
    assert set(state) == EXPECTED_KEYS and kind == "custom"
    assert torch.equal(state["28.bias"], raw["features.28.bias"])


def test_load_real_weights_builds_the_extractor(tmp_path, vgg_state, vgg):
    path = tmp_path / "w.pth"
    torch.save(vgg_state, path)
    weights.sidecar(path).write_text(json.dumps({"kind": "random"}))
    assert weights.sidecar(path).name == "w.json"
    state, kind = weights.load(path)
    assert kind == "random"
    model = VGGFeatures(state)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, ["conv2_2"])["conv2_2"], vgg(x, ["conv2_2"])["conv2_2"], rtol=0, atol=0)


def test_load_refuses_pickled_code(tmp_path):
    """weights_only=True: a checkpoint carrying arbitrary objects is refused."""
    import os
    import pickle

    path = tmp_path / "evil.pth"
    torch.save({"0.weight": os.getcwd}, path)  # a global reference, as a malicious file would carry
    with pytest.raises(pickle.UnpicklingError):
        weights.load(path)
