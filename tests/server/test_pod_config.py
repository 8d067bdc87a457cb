"""TorchServe as deploy/kubernetes runs it in a pod: the repo's config with
the pod's keys (its own token authorization off, since the gateway beside it
checks the Secret's key). The probes' paths answer without a key, and so do
predictions: only the gateway may stand between this server and a client."""
from __future__ import annotations

import io

import pytest
import requests
import yaml
from PIL import Image

from example_images import thumbnail
from local_server import ROOT, running_server
from manage import properties

pytestmark = pytest.mark.server


def test_torchserve_with_the_pods_config_serves_probes_and_predictions_without_keys(tmp_path):
    text = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())["data"]["config.properties"]
    pod = properties(text)
    # The pod's token setting; the addresses stay this test's free localhost ports.
    with running_server(tmp_path, config={"disable_token_authorization": pod["disable_token_authorization"]}) as srv:
        assert not srv.key_file.exists()
        ping = requests.get(f"{srv.inference}/ping", timeout=10)  # the gateway's readiness probe
        assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
        metrics = requests.get(f"{srv.metrics}/metrics", timeout=10)  # TorchServe's liveness probe
        assert metrics.status_code == 200
        files = {"content": thumbnail("tubingen.jpg", 48), "style": thumbnail("starry_night.jpg", 48)}
        r = requests.post(f"{srv.inference}/predictions/style_transfer", files=files, data={"steps": "3"}, timeout=120)
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).format == "PNG"
