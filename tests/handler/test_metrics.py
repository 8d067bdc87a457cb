"""The handler's model metrics (metrics.yaml), against a recording stand-in
for TorchServe's metrics cache; tests/server/test_server.py scrapes them."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from test_handler import multipart_row

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """get_metric(name, type).add_or_update(value, dimension values), as ts.metrics' cache."""

    def __init__(self, fail: bool = False):
        self.values: dict = defaultdict(list)
        self.kinds: dict = {}
        self.fail = fail

    def get_metric(self, name, kind):
        if self.fail:
            raise KeyError(name)
        self.kinds[name] = kind.name
        recorder = self

        class Metric:
            def add_or_update(self, value, dimension_values=(), request_id=""):
                recorder.values[(name, tuple(dimension_values))].append(value)

        return Metric()


@pytest.fixture
def inputs(images):
    return {"content": images.png(images.content(48, 32)), "style": images.png(images.style(32, 32))}


def test_a_served_request_adds_its_steps_and_a_rejected_one_its_code(handler, make_context, inputs):
    ctx = make_context(rows=3)
    ctx.metrics = Recorder()
    handler.handle([multipart_row(inputs, steps=3), multipart_row(inputs, steps=-1),
                    multipart_row(inputs, steps=4)], ctx)
    v = ctx.metrics.values
    dims = ("style_transfer", "Model")
    assert sum(v[("StepsRun", dims)]) == 7 and ctx.metrics.kinds["StepsRun"] == "COUNTER"
    assert v[("RejectedRequests", dims + ("422",))] == [1]
    assert v[("BatchSize", dims)] == [2, 2]
    # counters that averages divide: the served requests and their optimization times added
    assert v[("ServedRequests", dims)] == [1, 1] and ctx.metrics.kinds["ServedRequests"] == "COUNTER"
    assert v[("OptimizationMsSum", dims)] == v[("OptimizationMs", dims)]
    assert ctx.metrics.kinds["OptimizationMsSum"] == "COUNTER"
    for name in ("OptimizationMs", "StepsPerSecond", "DecodeMs", "EncodeMs", "PeakDeviceMemoryMB"):
        assert len(v[(name, dims)]) == 2 and all(x >= 0 for x in v[(name, dims)]), name
        assert ctx.metrics.kinds[name] == "GAUGE"


def test_every_metric_the_handler_records_is_declared_in_metrics_yaml(handler, make_context, inputs):
    """Undeclared model metrics never reach the Prometheus endpoint."""
    ctx = make_context(rows=2)
    ctx.metrics = Recorder()
    handler.handle([multipart_row(inputs, steps=2), multipart_row(inputs, steps=0)], ctx)
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())["model_metrics"]
    by_kind = {kind.upper(): {m["name"]: m for m in metrics} for kind, metrics in declared.items()}
    # a served and a rejected request between them record every declared metric
    # but PredictionTime, which TorchServe's backend records around the handler
    assert {name for name, _ in ctx.metrics.values} == {n for metrics in by_kind.values() for n in metrics} - {
        "PredictionTime"}
    for (name, dims), _ in ctx.metrics.values.items():
        kind = ctx.metrics.kinds[name]
        assert name in by_kind[kind], name
        assert len(by_kind[kind][name]["dimensions"]) == len(dims), name


def test_a_broken_metrics_cache_never_fails_a_request(handler, make_context, inputs):
    ctx = make_context()
    ctx.metrics = Recorder(fail=True)
    handler.handle([multipart_row(inputs, steps=2)], ctx)
    assert ctx.status(0) == 200
