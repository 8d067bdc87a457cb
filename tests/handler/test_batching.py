"""Several rows in one handle() call, as TorchServe hands them over with
batchSize > 1: rows of one shape share an optimization, every row gets its
own answer, and a row's failure stays in its row."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nst.pipeline
from test_handler import assert_error, multipart_row, png_of


@pytest.fixture
def inputs(images):
    return {"content": images.png(images.content(48, 32)), "style": images.png(images.style(32, 32))}


@pytest.fixture
def other(images):
    return {"content": images.png(images.content(40, 40)), "style": images.png(images.style(24, 24))}


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(png_of(body), dtype=np.float64) / 255


def alone(handler, make_context, row) -> bytes:
    ctx = make_context()
    [out] = handler.handle([row], ctx)
    assert ctx.status(0) == 200 and ctx.get_response_headers(0)["X-Batch"] == "1"
    return out


def test_rows_of_one_shape_share_an_optimization_and_get_their_own_answers(handler, make_context, inputs,
                                                                           images):
    swapped = {"content": inputs["content"], "style": images.png(images.style(36, 20))}
    rows = [multipart_row(inputs, steps=12), multipart_row(swapped, steps=8, style_weight=3e5),
            multipart_row(inputs, steps=10, init="noise", seed=4)]
    ctx = make_context(rows=3)
    outs = handler.handle(rows, ctx)
    for i, (row, out) in enumerate(zip(rows, outs)):
        assert ctx.status(i) == 200
        headers = ctx.get_response_headers(i)
        assert headers["X-Batch"] == "3" and headers["X-Steps"] == str(int(row["steps"].decode()))
        diff = np.abs(pixels(out) - pixels(alone(handler, make_context, row))).mean()
        assert diff <= 2 / 255, (i, diff)


def test_a_bad_row_gets_its_own_error_and_the_others_are_served(handler, make_context, inputs):
    rows = [multipart_row(inputs, steps=4), multipart_row(inputs, steps=-3), multipart_row(inputs, steps=4),
            {"content": bytearray(b"not an image"), "style": bytearray(inputs["style"])}]
    ctx = make_context(rows=4)
    outs = handler.handle(rows, ctx)
    assert_error(ctx, 1, outs[1], 422, "steps")
    assert_error(ctx, 3, outs[3], 415, "content")
    for i in (0, 2):
        assert ctx.status(i) == 200 and ctx.get_response_headers(i)["X-Batch"] == "2"
        png_of(outs[i])


def test_rows_of_different_shapes_run_in_their_own_groups(handler, make_context, inputs, other):
    rows = [multipart_row(inputs, steps=3), multipart_row(other, steps=3), multipart_row(inputs, steps=3),
            multipart_row(inputs, steps=3, optimizer="adam")]
    ctx = make_context(rows=4)
    outs = handler.handle(rows, ctx)
    assert [ctx.get_response_headers(i)["X-Batch"] for i in range(4)] == ["2", "1", "2", "1"]
    assert png_of(outs[1]).size == (40, 40) and png_of(outs[0]).size == (48, 32)


def test_a_row_past_its_own_deadline_fails_alone(handler, make_context, inputs):
    rows = [multipart_row(inputs, steps=5), multipart_row(inputs, steps=3000, timeout_s=0.5)]
    ctx = make_context(rows=2)
    outs = handler.handle(rows, ctx)
    err = assert_error(ctx, 1, outs[1], 504, "timeout_s")
    assert "of 3000 steps" in err["message"]
    assert ctx.status(0) == 200 and ctx.get_response_headers(0)["X-Batch"] == "2"


def test_each_streaming_row_gets_its_own_progress(handler, make_context, inputs, monkeypatch):
    sent = []
    monkeypatch.setattr(handler, "send_intermediate", lambda line, idx, ctx: sent.append((idx, json.loads(line))))
    rows = [multipart_row(inputs, steps=3, stream="true"), multipart_row(inputs, steps=2),
            multipart_row(inputs, steps=2, stream="true")]
    ctx = make_context(rows=3)
    outs = handler.handle(rows, ctx)
    assert [(i, r["step"]) for i, r in sent if i == 0] == [(0, 1), (0, 2), (0, 3)]
    assert [(i, r["step"]) for i, r in sent if i == 2] == [(2, 1), (2, 2)]
    assert not any(i == 1 for i, _ in sent)
    for i in (0, 2):
        final = json.loads(outs[i])
        assert final["done"] and final["batch"] == 3
    png_of(outs[1])


def test_a_batch_that_runs_out_of_memory_is_retried_row_by_row(handler, make_context, inputs, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(nst.pipeline, "stylize_batch", oom)
    rows = [multipart_row(inputs, steps=3), multipart_row(inputs, steps=3)]
    ctx = make_context(rows=2)
    outs = handler.handle(rows, ctx)
    for i in range(2):
        assert ctx.status(i) == 200 and ctx.get_response_headers(i)["X-Batch"] == "1"
        png_of(outs[i])


def test_a_group_larger_than_the_memory_budget_is_cut(make_handler, make_context, inputs, monkeypatch):
    """The memory budget holds two of these rows at a time: four rows run as two batches of two."""
    one = nst.pipeline.memory.estimate_bytes(32, 48, 32 * 32, nst.Params())
    handler = make_handler({"memory_budget_mb": int(2.5 * one / 2**20) + 1})
    rows = [multipart_row(inputs, steps=2) for _ in range(4)]
    ctx = make_context(rows=4)
    handler.handle(rows, ctx)
    assert [ctx.get_response_headers(i)["X-Batch"] for i in range(4)] == ["2"] * 4


def test_a_bug_in_a_batch_is_a_500_for_its_rows_and_the_call_returns(handler, make_context, inputs, other,
                                                                     monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom in /work/main/handler/nst/secret.py")

    monkeypatch.setattr(nst.pipeline, "stylize_batch", broken)
    rows = [multipart_row(inputs, steps=2), multipart_row(inputs, steps=2), multipart_row(other, steps=2)]
    ctx = make_context(rows=3)
    outs = handler.handle(rows, ctx)
    for i in (0, 1):
        err = assert_error(ctx, i, outs[i], 500, None)
        assert "boom" not in err["message"]
    assert ctx.status(2) == 200  # alone in its group: not the batch path
