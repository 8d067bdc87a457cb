"""Batching through the real server: TorchServe hands concurrent requests to
the handler as one batch (batchSize, maxBatchDelay), and rows of one shape
share an optimization. Same answer as alone, errors in their own row."""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from example_images import thumbnail
from local_server import running_server

pytestmark = pytest.mark.server

CONTENT = thumbnail("tubingen.jpg", 96)
STYLES = [thumbnail("starry_night.jpg", 64, "JPEG"), thumbnail("starry_night.jpg", 40, "JPEG"),
          thumbnail("starry_night.jpg", 48, "JPEG")]


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    """Up to 4 rows a batch; the frontend waits up to 1.5 s for them, far
    longer than the spread of this test's concurrent requests."""
    with running_server(tmp_path_factory.mktemp("torchserve-batching"),
                        model_config={"batchSize": 4, "maxBatchDelay": 1500}) as srv:
        yield srv


def post(server, style: bytes, **fields):
    data = {"max_size": "48", **{k: str(v) for k, v in fields.items()}}
    return server.predict(files={"content": CONTENT, "style": style}, data=data)


def concurrently(server, requests: list[tuple[bytes, dict]]):
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(post, server, style, **fields) for style, fields in requests]
        return [f.result() for f in futures]


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=np.float64) / 255


def test_concurrent_requests_share_an_optimization_and_match_their_lone_answers(batching_server):
    asks = [(STYLES[0], {"steps": 8, "seed": 1}), (STYLES[1], {"steps": 6, "seed": 2, "style_weight": 3e5}),
            (STYLES[2], {"steps": 8, "seed": 3, "init": "noise"})]
    batched = concurrently(batching_server, asks)
    for r in batched:
        assert r.status_code == 200, r.text
        assert r.headers["X-Batch"] == "3"
    for (style, fields), r in zip(asks, batched):
        lone = post(batching_server, style, **fields)
        assert lone.status_code == 200 and lone.headers["X-Batch"] == "1"
        assert r.headers["X-Steps"] == lone.headers["X-Steps"] == str(fields["steps"])
        assert np.abs(pixels(r.content) - pixels(lone.content)).mean() <= 2 / 255


def test_a_bad_request_in_a_batch_gets_its_own_error(batching_server):
    asks = [(STYLES[0], {"steps": 4}), (STYLES[1], {"steps": -3}), (STYLES[2], {"steps": 4})]
    good, bad, other = concurrently(batching_server, asks)
    assert bad.status_code == 422 and bad.json()["message"].startswith("steps")
    for r in (good, other):
        assert r.status_code == 200, r.text
        assert r.headers["X-Batch"] == "2"


def test_a_streaming_request_in_a_batch_gets_its_own_progress(batching_server):
    asks = [(STYLES[0], {"steps": 12, "stream": "true"}), (STYLES[1], {"steps": 4})]
    streamed, plain = concurrently(batching_server, asks)
    records = [json.loads(line) for line in streamed.text.splitlines()]
    assert [r["step"] for r in records[:-1]] == [10, 12]  # progress_every 10, and the last step
    assert records[-1]["done"] and records[-1]["batch"] == 2
    assert plain.status_code == 200 and plain.headers["X-Batch"] == "2"
