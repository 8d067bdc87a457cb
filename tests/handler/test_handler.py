"""StyleTransferHandler with TorchServe-shaped rows and a fake Context."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import math
import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import style_transfer_handler
from nst import BudgetExceeded, Diverged, Progress, WouldExceedBudget
from style_transfer_handler import StyleTransferHandler


@pytest.fixture(scope="module")
def inputs(images):
    return {
        "content": images.png(images.content(64, 48)),
        "style": images.jpeg(images.style(40, 40)),
    }


def multipart_row(inputs, **fields) -> dict:
    """What TorchServe hands the handler for a multipart/form-data request."""
    row = {"content": bytearray(inputs["content"]), "style": bytearray(inputs["style"])}
    row.update({k: bytearray(str(v).encode()) if not isinstance(v, (bytes, bytearray)) else bytearray(v) for k, v in fields.items()})
    return row


def json_fields(inputs, **fields) -> dict:
    return {
        "content": base64.b64encode(inputs["content"]).decode(),
        "style": base64.b64encode(inputs["style"]).decode(),
        **fields,
    }


# what must never reach a client: tracebacks, source paths, exception reprs
LEAK = re.compile(r"Traceback|\.py\b|File \"|/work/|Error\(")


def png_of(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()
    return img


def assert_error(ctx, idx: int, body: bytes, code: int, field: str | None) -> dict:
    assert ctx.status(idx) == code
    assert ctx.get_response_content_type(idx) == "application/json"
    err = json.loads(body)
    assert set(err) == {"code", "type", "message"}
    assert err["code"] == code and isinstance(err["type"], str) and err["type"]
    if field is not None:
        assert err["message"].startswith(field)
    assert not LEAK.search(err["message"]), err["message"]
    return err


# --- initialize --------------------------------------------------------------


def test_initialize_reads_weights_kind_and_limits(make_handler):
    h = make_handler({"max_steps": 5, "time_budget_s": 30})
    assert h.initialized and h.weights_kind == "random"
    assert h.limits.max_steps == 5 and h.limits.time_budget_s == 30.0
    assert h.device == torch.device("cpu")
    assert h.vgg is not None and not any(p.requires_grad for p in h.vgg.parameters())


def test_initialize_without_limits_uses_defaults(make_handler):
    from nst import Limits

    assert make_handler(None).limits == Limits()


def test_initialize_rejects_bad_limits(make_context):
    with pytest.raises(ValueError, match="max_stepz"):
        StyleTransferHandler().initialize(make_context(limits={"max_stepz": 5}))


@pytest.mark.parametrize("response_timeout", [120, 560])
def test_initialize_rejects_a_budget_the_response_timeout_would_cut_short(make_context, response_timeout):
    """540 s of budget needs a responseTimeout of at least 570 s."""
    ctx = make_context(response_timeout=response_timeout)
    with pytest.raises(ValueError, match=r"time_budget_s \(540 s\).*responseTimeout"):
        StyleTransferHandler().initialize(ctx)
    fits = make_context(limits={"time_budget_s": response_timeout - 30}, response_timeout=response_timeout)
    StyleTransferHandler().initialize(fits)


@pytest.mark.parametrize("sizes, message", [
    ("512x512", "must be a list"),
    (["512by384"], "'512by384' is not a WxH size"),
    (["512x384x3"], "is not a WxH size"),
    (["8x512"], r"outside 16\.\.1024 px"),
    (["2048x1024"], r"'2048x1024' is outside 16\.\.1024 px"),  # over a CPU's max_size: no request gets there
])
def test_initialize_rejects_bad_warm_up_sizes(make_context, sizes, message):
    ctx = make_context()
    ctx.model_yaml_config["warm_up_sizes"] = sizes
    with pytest.raises(ValueError, match=message):
        StyleTransferHandler().initialize(ctx)


def test_warm_up_sizes_and_batch_size_from_the_model_config_reach_the_warm_up(make_context, monkeypatch):
    import style_transfer_handler as module

    seen = []
    monkeypatch.setattr(module, "warm_up",
                        lambda vgg, sizes, params, max_batch: seen.append((sizes, params.preset, max_batch)) or {})
    ctx = make_context(rows=8)  # TorchServe's batchSize reaches the worker as system property batch_size
    ctx.model_yaml_config["warm_up_sizes"] = ["640x360", [360, 640]]
    StyleTransferHandler().initialize(ctx)
    StyleTransferHandler().initialize(make_context())
    # the default presets (WARM_UP_PRESETS): preset=seed's at those sizes fit to its 400 px, one row
    assert module.WARM_UP_PRESETS == ("fast", "seed")
    assert seen == [([(640, 360), (360, 640)], "fast", 8), ([(400, 225), (225, 400)], "seed", 1),
                    (list(module.WARM_UP_SIZES), "fast", 1), ([(400, 400), (400, 300), (300, 400)], "seed", 1)]
    seen.clear()
    ctx = make_context()
    ctx.model_yaml_config["warm_up_presets"] = ["fast"]  # the opt-out: a sooner start
    StyleTransferHandler().initialize(ctx)
    assert seen == [(list(module.WARM_UP_SIZES), "fast", 1)]
    # a deployment whose max_size no default size fits loads, warming only what its requests reach
    seen.clear()
    ctx = make_context(limits={"max_size": 400})
    ctx.model_yaml_config["warm_up_presets"] = ["fast"]
    StyleTransferHandler().initialize(ctx)
    assert all(max(size) > 400 for size in module.WARM_UP_SIZES)  # none reachable there
    assert seen == [([], "fast", 1)]


def test_warm_up_presets_compile_the_seed_preset_at_the_sizes_its_requests_come_out_at(make_context, monkeypatch,
                                                                                       vgg, images):
    """`warm_up_presets: [fast, seed]`: the seed preset's loss (the recipe's:
    Adam, normalized space) is warmed too, at each size fit to its 400 px,
    the shapes its requests have by default, and for one row only (Adam's
    requests never share an optimization)."""
    import style_transfer_handler as module
    from nst import Limits, parse_request, pipeline

    seen = []

    def fake_warm_up(vgg, sizes, params, max_batch):
        seen.append((params, sizes, max_batch))
        return {f"{w}x{h}": 1.0 for w, h in sizes}

    monkeypatch.setattr(module, "warm_up", fake_warm_up)
    ctx = make_context(rows=4)
    ctx.model_yaml_config["warm_up_presets"] = ["fast", "seed"]
    ctx.model_yaml_config["warm_up_sizes"] = ["512x384", "384x512", "640x480", "200x100"]
    StyleTransferHandler().initialize(ctx)
    (fast, fast_sizes, fast_batch), (seed, seed_sizes, seed_batch) = seen
    assert fast.preset == "fast" and fast_batch == 4
    assert fast_sizes == [(512, 384), (384, 512), (640, 480), (200, 100)]  # as listed
    assert (seed.preset, seed.optimizer, seed.space, seed.max_size) == ("seed", "adam", "normalized", 400)
    assert seed_sizes == [(400, 300), (300, 400), (200, 100)] and seed_batch == 1  # 640x480 fits to 400x300 too
    # the very shape a seed request of a 4:3 content is optimized at
    request = parse_request({"content": images.png(images.content(1024, 768)),
                             "style": images.png(images.style(64, 64)), "preset": "seed"}, Limits())
    assert pipeline.prepare(request, vgg, Limits()).content.shape[-2:] == (300, 400)  # (H, W)


@pytest.mark.parametrize("presets, message", [
    ("seed", "must be a list of presets"),
    (["fast", "recipe"], "'recipe' is not a preset"),
])
def test_initialize_rejects_bad_warm_up_presets(make_context, presets, message):
    ctx = make_context()
    ctx.model_yaml_config["warm_up_presets"] = presets
    with pytest.raises(ValueError, match=message):
        StyleTransferHandler().initialize(ctx)


def test_initialize_assumes_torchserves_120_s_without_a_response_timeout(make_context):
    ctx = make_context()
    del ctx.model_yaml_config["responseTimeout"]
    with pytest.raises(ValueError, match=r"responseTimeout \(120 s\)"):
        StyleTransferHandler().initialize(ctx)


def test_url_download_time_counts_against_the_budget(make_handler, make_context, inputs, monkeypatch):
    handler = make_handler({"time_budget_s": 0.3, "allow_urls": True})

    def slow_fetch(url, field):
        time.sleep(0.5)
        return inputs["content"]

    monkeypatch.setattr(handler, "_fetch", slow_fetch)
    row = multipart_row(inputs, steps=3, max_size=32)
    row["content_url"] = bytearray(b"https://example.com/c.png")
    del row["content"]
    ctx = make_context()
    [out] = handler.handle([row], ctx)
    err = assert_error(ctx, 0, out, 504, None)
    assert "before the first step" in err["message"]


def test_initialize_ignores_gpu_id_without_cuda(make_context, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    h = StyleTransferHandler()
    h.initialize(make_context(gpu_id=0))
    assert h.device == torch.device("cpu")


# --- success -----------------------------------------------------------------


def test_multipart_row_returns_png_with_facts(handler, make_context, inputs):
    ctx = make_context()
    row = {
        "content": bytearray(inputs["content"]),
        "style": bytearray(inputs["style"]),
        "steps": bytearray(b"3"),
        "max_size": bytearray(b"48"),
    }
    [out] = handler.handle([row], ctx)
    assert isinstance(out, bytes)
    assert png_of(out).size == (48, 36)
    assert not ctx.status_was_set(0) and ctx.status(0) == 200
    headers = ctx.get_response_headers(0)
    assert headers["content-type"] == "image/png"
    assert headers["X-Steps"] == "3"
    loss = float(headers["X-Loss"])
    assert math.isfinite(loss) and loss > 0
    assert int(headers["X-Elapsed-Ms"]) >= 0
    assert headers["X-Weights"] == "random"
    assert headers["X-Skipped-Steps"] == "0"
    # the README's list of facts, exactly, and times in whole milliseconds
    assert sorted(k for k in headers if k.startswith("X-")) == sorted(
        ["X-Steps", "X-Loss", "X-Elapsed-Ms", "X-Decode-Ms", "X-Encode-Ms", "X-Total-Ms", "X-Batch", "X-Weights",
         "X-Skipped-Steps"])
    assert all(headers[k].isdigit() for k in ("X-Elapsed-Ms", "X-Decode-Ms", "X-Encode-Ms", "X-Total-Ms", "X-Batch"))


def test_json_row_returns_png(handler, make_context, inputs):
    ctx = make_context()
    [out] = handler.handle([{"body": json_fields(inputs, steps=3, max_size=32)}], ctx)
    assert png_of(out).size == (32, 24)
    assert ctx.status(0) == 200 and ctx.get_response_content_type(0) == "image/png"
    assert ctx.get_response_headers(0)["X-Steps"] == "3"


@pytest.mark.parametrize("wrap", [bytes, bytearray, lambda b: b.decode()], ids=["bytes", "bytearray", "str"])
def test_json_body_as_raw_bytes_also_works(handler, make_context, inputs, wrap):
    """Sent with a Content-Type other than application/json, TorchServe passes
    the body undecoded (bytes) or, for text/*, as str."""
    ctx = make_context()
    body = wrap(json.dumps(json_fields(inputs, steps=2, max_size=32)).encode())
    [out] = handler.handle([{"body": body}], ctx)
    assert ctx.status(0) == 200, out[:200]
    assert png_of(out).size == (32, 24)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_x_loss_is_the_delivered_images_loss(handler, make_context, images, vgg_state, fmt):
    """X-Loss scored independently: the tutorial's own loss code
    (bench/reference_recipe.py, torchvision's VGG19 with the same weights) on
    the image as the client decodes it from the answer, JPEG and WebP
    included (it once scored the image before their compression), against
    the inputs as the fast preset sizes them. The
    style has the content's aspect, so it is sized to the content's shape,
    where its target is the tutorial's unscaled Gram (tests/core/test_style_targets.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import reference_recipe as ref
    from nst import imageio, Limits

    inputs = {"content": images.png(images.content(64, 48)), "style": images.jpeg(images.style(40, 30))}
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=3, max_size=64, format=fmt, quality=30)], ctx)
    assert ctx.get_response_content_type(0) == f"image/{fmt}"
    limits = Limits()
    content = imageio.to_tensor(imageio.decode(inputs["content"], "content", limits))  # 64x48 already
    style = imageio.to_tensor(imageio.decode(inputs["style"], "style", limits).resize((64, 48), Image.LANCZOS))
    delivered = imageio.to_tensor(Image.open(io.BytesIO(out)).convert("RGB"))
    mean, std = torch.tensor(ref.MEAN).view(1, 3, 1, 1), torch.tensor(ref.STD).view(1, 3, 1, 1)
    expected = ref.score(delivered, (content - mean) / std, (style - mean) / std, ref.load_vgg(vgg_state))
    assert float(ctx.get_response_headers(0)["X-Loss"]) == pytest.approx(expected, rel=1e-4)


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", bytearray(b"\xff\xfe"), "not json either", b"[1, 2]", [1, 2], "42"])
def test_body_that_is_not_a_json_object_is_400(handler, make_context, body):
    ctx = make_context()
    [out] = handler.handle([{"body": body}], ctx)
    assert_error(ctx, 0, out, 400, "body")


@pytest.mark.parametrize(
    "row, code, field",
    [
        ({"body": bytearray(b"[" * 200_000)}, 400, "body"),
        ({"body": bytearray(b'{"style_layer_weights": ' + b"[" * 5000 + b"}")}, 422, "style_layer_weights"),
        ({"body": {"content": "eA==", "style": "eA==", "lr": 10**400}}, 422, "lr"),
        ({"content": bytearray(b"x"), "style": bytearray(b"x"), "style_blend": bytearray(b"[" * 5000)}, 422, "style_blend"),
    ],
    ids=["deep-body", "deep-field-in-raw-body", "huge-int", "deep-multipart-field"],
)
def test_hostile_json_is_a_client_error_not_a_500(handler, make_context, row, code, field):
    """RecursionError and OverflowError are no ValueError: before, they fell
    through to the handler's catch-all 500."""
    ctx = make_context()
    [out] = handler.handle([row], ctx)
    assert_error(ctx, 0, out, code, field)


@pytest.mark.parametrize(
    "row, code, field",
    [
        ({"style": b"x"}, 400, "content"),
        ({"content": b"x"}, 400, "style"),
        ({"content": bytearray(b"not an image"), "style": bytearray(b"x"), "steps": bytearray(b"2")}, 415, "content"),
        ({"content": bytearray(b""), "style": bytearray(b"x")}, 400, "content"),
    ],
)
def test_bad_rows_get_contract_errors(handler, make_context, row, code, field):
    ctx = make_context()
    [out] = handler.handle([row], ctx)
    assert_error(ctx, 0, out, code, field)


def test_batch_with_a_bad_middle_row_gets_per_row_statuses(make_handler, make_context, inputs):
    handler = make_handler({"progress_every": 1}, rows=3)
    ctx = make_context(rows=3)
    rows = [
        multipart_row(inputs, steps=2, max_size=32),
        multipart_row(inputs, steps=2, stepz=3),
        {"body": json_fields(inputs, steps=2, max_size=40)},
    ]
    outs = handler.handle(rows, ctx)
    assert len(outs) == 3
    assert ctx.status(0) == 200 and png_of(outs[0]).size == (32, 24)
    err = assert_error(ctx, 1, outs[1], 422, "stepz")
    assert err["type"] == "InvalidParameter"
    assert ctx.status(2) == 200 and png_of(outs[2]).size == (40, 30)
    assert ctx.get_response_content_type(0) == ctx.get_response_content_type(2) == "image/png"
    assert "X-Steps" not in ctx.get_response_headers(1)


def test_limits_from_model_config_are_applied(make_handler, make_context, inputs):
    handler = make_handler({"max_steps": 5, "max_size": 32})
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=6)], ctx)
    assert_error(ctx, 0, out, 422, "steps")

    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, max_size=48)], ctx)
    assert_error(ctx, 0, out, 422, "max_size")

    ctx = make_context()  # the defaults are capped too
    [out] = handler.handle([multipart_row(inputs, steps=1)], ctx)
    assert ctx.status(0) == 200 and max(png_of(out).size) == 32


def fail_every_optimization(monkeypatch, fn):
    """Each row's optimization becomes fn(job): what it raises is that row's outcome."""
    def fake_run_batch(jobs, vgg, limits):
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(fn(job))
            except Exception as e:  # noqa: BLE001  as run_batch reports a row's failure
                outcomes.append(e)
        return outcomes

    monkeypatch.setattr(style_transfer_handler, "run_batch", fake_run_batch)


def test_every_row_of_a_call_has_the_budget_from_when_the_worker_took_the_call(
        make_handler, make_context, inputs, monkeypatch):
    """TorchServe's responseTimeout runs from when the worker took the batch:
    a row's budget once began when its own decode did, after its neighbours'
    decodes (and URL downloads, up to 15 s each), and could end past it."""
    handler = make_handler(rows=3)
    seen = []

    def slow_decode(real):
        def decode(row, raw, context):
            real(row, raw, context)
            time.sleep(0.05)  # a neighbour's slow decode
        return decode

    monkeypatch.setattr(handler, "_decode", slow_decode(handler._decode))
    fail_every_optimization(monkeypatch, lambda job: seen.append(job.deadline) or _raise(BudgetExceeded("x")))
    ctx = make_context(rows=3)
    handler.handle([multipart_row(inputs, steps=2) for _ in range(3)], ctx)
    assert len(seen) == 3 and len(set(seen)) == 1


def test_internal_error_is_500_without_details(handler, make_context, inputs, monkeypatch):
    def broken(job):
        raise RuntimeError("boom in /work/main/handler/nst/secret.py line 3")

    fail_every_optimization(monkeypatch, broken)
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=2)], ctx)
    err = assert_error(ctx, 0, out, 500, None)
    assert "boom" not in err["message"] and "secret" not in err["message"]


def test_the_worker_log_shows_the_level_of_our_records_and_leaves_others_bare(make_handler, monkeypatch):
    """In a TorchServe worker the root logger prints bare messages on stdout
    (its metrics are such lines): initialize puts the level and logger in
    front of the handler's and the core's records only."""
    import io
    import sys

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bare = logging.StreamHandler(sys.stdout)  # as ts/model_service_worker.py's basicConfig makes it
    bare.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # setLevel, not the attribute: loggers cache what is enabled
    root.addHandler(bare)
    try:
        make_handler()  # initialize
        logging.getLogger("nst.weights").warning("weights are RANDOM")
        logging.getLogger("style_transfer_handler").info("request r0 rejected")
        logging.getLogger("ts.metrics.caching_metric").info("[METRICS]StepsRun.Count:3|#ModelName:m|")
    finally:
        root.removeHandler(bare)
        root.setLevel(level)
    assert out.getvalue().splitlines()[-3:] == [
        "WARNING nst.weights: weights are RANDOM", "INFO style_transfer_handler: request r0 rejected",
        "[METRICS]StepsRun.Count:3|#ModelName:m|"]


def test_the_log_names_each_failed_row_by_its_request_id(handler, make_context, inputs, monkeypatch, caplog):
    """TorchServe's request id (the client's x-request-id): the row index
    that the log gave before is the same 0 for every request alone."""
    def broken(job):
        raise RuntimeError("boom")

    fail_every_optimization(monkeypatch, broken)
    ctx = make_context(rows=2)
    ctx.request_ids = {0: "3f0c-bad-params", 1: "9a1e-internal"}
    with caplog.at_level(logging.INFO, logger="style_transfer_handler"):
        handler.handle([multipart_row(inputs, steps=0), multipart_row(inputs, steps=2)], ctx)
    assert "request 3f0c-bad-params rejected: 422 steps: 0 is out of range" in caplog.text
    failed = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert failed.getMessage() == "request 9a1e-internal failed" and failed.exc_info[1].args == ("boom",)
    assert "request 9a1e-internal rejected: 500" in caplog.text


def _raise(exc):
    raise exc


@pytest.mark.parametrize(
    "fail",
    [
        lambda: _raise(MemoryError()),
        lambda: _raise(torch.cuda.OutOfMemoryError("CUDA out of memory")),
        lambda: torch.empty(2**50, dtype=torch.uint8),  # the host allocator's real RuntimeError
    ],
    ids=["MemoryError", "cuda-oom", "host-allocator"],
)
def test_out_of_memory_is_507(handler, make_context, inputs, monkeypatch, fail):
    fail_every_optimization(monkeypatch, lambda job: fail())
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=2)], ctx)
    err = assert_error(ctx, 0, out, 507, None)
    assert "max_size" in err["message"]


@pytest.mark.parametrize(
    "exc, code, field",
    [(BudgetExceeded("after 3 of 9 steps"), 504, None), (Diverged("loss became nan"), 422, "lr")],
)
def test_budget_and_divergence_map_to_contract_codes(handler, make_context, inputs, monkeypatch, exc, code, field):
    fail_every_optimization(monkeypatch, lambda job: _raise(exc))
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=2)], ctx)
    assert_error(ctx, 0, out, code, field)


def test_a_budget_too_short_for_the_steps_is_a_504_naming_the_budget(handler, make_context, inputs, monkeypatch):
    exc = WouldExceedBudget("stopped after 20 of 100 steps: at 6.0 s per step ...")
    fail_every_optimization(monkeypatch, lambda job: _raise(exc))
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=100)], ctx)
    err = assert_error(ctx, 0, out, 504, None)
    assert err["message"] == ("time budget (540 s) too short: stopped after 20 of 100 steps: at 6.0 s per "
                              "step ...; ask for fewer steps or a smaller max_size")


def test_real_time_budget_gives_504(make_handler, make_context, inputs):
    handler = make_handler({"time_budget_s": 1e-9})
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=3)], ctx)
    assert_error(ctx, 0, out, 504, None)


def test_handler_survives_errors(handler, make_context, inputs):
    for _ in range(2):
        ctx = make_context()
        handler.handle([multipart_row(inputs, steps="x")], ctx)
        assert ctx.status(0) == 422
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=1, max_size=32)], ctx)
    assert ctx.status(0) == 200 and png_of(out).size == (32, 24)


# --- streaming -----------------------------------------------------------------


@pytest.fixture
def sent(handler, monkeypatch):
    lines: list[tuple[bytes, int]] = []
    monkeypatch.setattr(handler, "send_intermediate", lambda line, idx, context: lines.append((line, idx)))
    return lines


def test_stream_sends_progress_then_final_record(handler, make_context, inputs, sent):
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=3, max_size=48, stream="true")], ctx)
    assert ctx.status(0) == 200
    assert ctx.get_response_content_type(0) == "application/x-ndjson"

    assert [idx for _, idx in sent] == [0, 0, 0]
    progress = []
    for line, _ in sent:
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        progress.append(json.loads(line))
    assert [p["step"] for p in progress] == [1, 2, 3]
    for p in progress:
        assert p["steps"] == 3 and p["loss"] > 0 and p["elapsed_ms"] >= 0
        assert {"step", "steps", "loss", "elapsed_ms"} <= set(p)

    assert out.endswith(b"\n") and out.count(b"\n") == 1
    final = json.loads(out)
    assert final["done"] is True
    assert final["steps"] == 3 and final["weights"] == "random"
    assert final["loss"] > 0 and final["elapsed_ms"] >= 0
    assert png_of(base64.b64decode(final["image"])).size == (48, 36)
    # Headers set after the first chunk never reach the client: none are set.
    assert not any(k.startswith("X-") for k in ctx.get_response_headers(0))
    assert list(final) == ["done", "image", "content_type", "steps", "loss", "elapsed_ms", "decode_ms", "encode_ms",
                           "total_ms", "batch", "weights", "skipped_steps"]  # the README's record, in its order


def test_stream_json_row(handler, make_context, inputs, sent):
    ctx = make_context()
    [out] = handler.handle([{"body": json_fields(inputs, steps=2, max_size=32, stream=True)}], ctx)
    assert [json.loads(line)["step"] for line, _ in sent] == [1, 2]
    assert json.loads(out)["done"] is True


def test_stream_lines_are_the_records_docs_openapi_yaml_describes(make_handler, make_context, inputs, monkeypatch):
    """Progress records, the final record (every fact it carries documented),
    and the error record of a stream cut after its status went out (here: an
    answer over max_response_bytes)."""
    import jsonschema
    import yaml

    schemas = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs/openapi.yaml").read_text())
    schemas = schemas["components"]["schemas"]

    def lines_of(handler):
        lines = []
        monkeypatch.setattr(handler, "send_intermediate", lambda line, idx, context: lines.append(line))
        [out] = handler.handle([{"body": json_fields(inputs, steps=2, max_size=32, stream=True)}], make_context())
        return [json.loads(line) for line in lines], json.loads(out)

    progress, final = lines_of(make_handler({"progress_every": 1}))
    assert len(progress) == 2
    for record in progress:
        jsonschema.validate(record, schemas["ProgressRecord"])
        assert set(record) == set(schemas["ProgressRecord"]["properties"])
    jsonschema.validate(final, schemas["FinalRecord"])
    assert set(final) == set(schemas["FinalRecord"]["properties"])
    progress, failed = lines_of(make_handler({"progress_every": 1, "max_response_bytes": 100}))
    assert progress and failed["error"]["code"] == 413
    jsonschema.validate(failed, schemas["StreamError"])
    assert set(failed) == set(schemas["StreamError"]["properties"])


def test_stream_progress_every_from_limits(make_handler, make_context, inputs, monkeypatch):
    handler = make_handler({"progress_every": 2})
    lines = []
    monkeypatch.setattr(handler, "send_intermediate", lambda line, idx, context: lines.append(line))
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=5, max_size=32, stream=1)], ctx)
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 5]
    assert json.loads(out)["done"] is True


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_a_cpu_worker_shares_the_cores_among_the_workers(make_handler, make_context, inputs, monkeypatch,
                                                        torch_threads):
    """limits.cpu_threads 0: the cores this process may use divided among
    TorchServe's worker processes, counted at each call; or the number given."""
    monkeypatch.setattr(style_transfer_handler.os, "sched_getaffinity", lambda pid: set(range(8)))
    workers = [3]
    monkeypatch.setattr(style_transfer_handler, "_worker_processes", lambda: workers[0])
    handler = make_handler()
    handler.handle([multipart_row(inputs, steps=1, max_size=32)], make_context())
    assert torch.get_num_threads() == 2  # 8 cores, 3 workers
    workers[0] = 1  # scaled down: this one alone
    handler.handle([multipart_row(inputs, steps=1, max_size=32)], make_context())
    assert torch.get_num_threads() == 8
    make_handler({"cpu_threads": 1}).handle([multipart_row(inputs, steps=1, max_size=32)], make_context())
    assert torch.get_num_threads() == 1


def test_a_handler_outside_torchserve_counts_itself_as_the_one_worker():
    assert style_transfer_handler._worker_processes() == 1  # pytest's parent runs no model_service_worker.py


def test_stream_progress_every_s_from_limits_records_by_time_on_a_cpu(make_handler, make_context, inputs, monkeypatch):
    """limits.progress_every_s: steps far apart in time still send records
    (here a microsecond: every step), whatever progress_every says."""
    handler = make_handler({"progress_every": 1000, "progress_every_s": 1e-6})
    lines = []
    monkeypatch.setattr(handler, "send_intermediate", lambda line, idx, context: lines.append(line))
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=4, max_size=32, stream=1)], ctx)
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads(out)["done"] is True


@pytest.mark.parametrize(
    "exc, code",
    [(Diverged("loss became inf at step 2"), 422), (BudgetExceeded("after 1 of 3 steps"), 504), (RuntimeError("bug at /x.py"), 500)],
)
def test_error_after_stream_started_is_an_in_band_record(handler, make_context, inputs, sent, monkeypatch, exc, code):
    def fails_after_one_step(job):
        job.callback(Progress(1, job.prepared.request.params.steps, 123.0, 5.0))
        raise exc

    fail_every_optimization(monkeypatch, fails_after_one_step)
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=3, stream="true")], ctx)
    assert len(sent) == 1 and json.loads(sent[0][0])["step"] == 1
    assert not ctx.status_was_set(0)  # the 200 went out with the first chunk
    assert ctx.get_response_content_type(0) == "application/x-ndjson"
    record = json.loads(out)
    assert record["done"] is True and "image" not in record
    assert record["error"]["code"] == code and record["error"]["message"]
    assert not LEAK.search(record["error"]["message"])


def test_real_divergence_during_stream_is_in_band(handler, make_context, inputs, sent, monkeypatch):
    """A run that really diverges after progress went out: Adam with an absurd
    lr in recipe mode (unclamped) overflows at step 2."""
    from nst.pipeline import stylize as real_stylize

    def absurd_lr(vgg, content, styles, params, **kwargs):
        return real_stylize(vgg, content, styles, dataclasses.replace(params, lr=1e30), **kwargs)

    monkeypatch.setattr("nst.pipeline.stylize", absurd_lr)
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=4, max_size=32, preset="seed", stream="true")], ctx)
    assert len(sent) >= 1
    record = json.loads(out)
    assert record == {"done": True, "error": {"code": 422, "message": record["error"]["message"]}}
    assert record["error"]["message"].startswith("lr")


@pytest.mark.parametrize(
    "fields, code, field",
    [
        ({"content": b"not an image"}, 415, "content"),
        ({"style_2": b"not an image"}, 415, "style_2"),
    ],
)
def test_error_before_any_chunk_keeps_its_status(handler, make_context, inputs, sent, fields, code, field):
    """With stream=true but nothing sent yet, the status line is still ours:
    the client gets the contract's code, not a 200 with an in-band error."""
    ctx = make_context()
    row = multipart_row(inputs, steps=3, stream="true")
    row.update({k: bytearray(v) for k, v in fields.items()})
    [out] = handler.handle([row], ctx)
    assert sent == []
    assert_error(ctx, 0, out, code, field)


def test_stream_parse_error_is_a_plain_error(handler, make_context, inputs, sent):
    ctx = make_context()
    [out] = handler.handle([multipart_row(inputs, steps=0, stream="true")], ctx)
    assert sent == []
    assert_error(ctx, 0, out, 422, "steps")


def test_result_over_the_response_limit_is_refused_not_sent(make_handler, make_context, inputs):
    """TorchServe kills a worker whose response passes max_response_size: refuse first."""
    handler = make_handler({"max_response_bytes": 200})
    ctx = make_context()
    out = handler.handle([multipart_row(inputs, steps=1, max_size=32)], ctx)[0]
    err = assert_error(ctx, 0, out, 413, "max_size")
    assert "response limit" in err["message"]
    assert "X-Loss" not in ctx.get_response_headers(0)


# --- gRPC ----------------------------------------------------------------------
# TorchServe 0.12.0's GRPCJob.response reads ts_stream_next for a StreamPredictions
# call and throws without it (restarting the worker); RestJob takes any
# ts_stream_next for a stream, so an HTTP answer must never carry one the
# handler set.


def test_grpc_answers_say_no_more_responses_follow(handler, make_context, inputs):
    ctx = make_context(grpc=True)
    [out] = handler.handle([multipart_row(inputs, steps=1, max_size=32)], ctx)
    assert png_of(out).size == (32, 24)
    assert ctx.get_response_headers(0)["ts_stream_next"] == "false"


def grpc_failure(handler, ctx, rows) -> tuple[int, str]:
    """A gRPC error as the backend reports it: the batch fails with the code,
    which TorchServe's frontend maps to a gRPC status, and the error's message."""
    from ts.utils.util import PredictionException

    with pytest.raises(PredictionException) as info:
        handler.handle(rows, ctx)
    return info.value.error_code, info.value.message


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_grpc_error_fails_the_call_with_its_code_and_message(handler, make_context, inputs, sent, stream):
    ctx = make_context(grpc=True)
    code, message = grpc_failure(handler, ctx, [multipart_row(inputs, steps=1, stream=stream, **{"größe": 1})])
    assert code == 422 and message.startswith("größe") and not LEAK.search(message)
    assert ctx.get_response_headers(0)["ts_stream_next"] == "false"


def test_grpc_errors_batched_with_a_success_stay_ok_answers_with_the_json_error(handler, make_context, inputs):
    """Failing the batch would fail the neighbour that succeeded: the failed
    call keeps TorchServe's OK answer carrying its JSON error."""
    ctx = make_context(rows=2, grpc=True)
    bad, good = handler.handle([multipart_row(inputs, steps=-1), multipart_row(inputs, steps=1, max_size=32)], ctx)
    assert_error(ctx, 0, bad, 422, "steps")
    assert png_of(good).size == (32, 24)


def test_grpc_errors_of_different_codes_in_one_batch_stay_ok_answers(handler, make_context, inputs):
    """One failure for the batch would send one call the other's message."""
    ctx = make_context(rows=2, grpc=True)
    a, b = handler.handle([multipart_row(inputs, steps=-1), {"content": bytearray(b"x"),
                                                            "style": bytearray(inputs["style"])}], ctx)
    assert_error(ctx, 0, a, 422, "steps")
    assert_error(ctx, 1, b, 415, "content")


def test_grpc_stream_sends_no_progress_only_the_final_record(handler, make_context, inputs, sent):
    """The worker cannot tell Predictions from StreamPredictions, and a
    progress record ends a Predictions call (the next response then took the
    model's worker thread down): over gRPC, stream=true answers with the final
    record alone."""
    ctx = make_context(grpc=True)
    [out] = handler.handle([multipart_row(inputs, steps=3, max_size=32, stream="true")], ctx)
    assert sent == []
    final = json.loads(out)
    assert final["done"] is True and final["steps"] == 3
    assert png_of(base64.b64decode(final["image"])).size == (32, 24)
    assert ctx.get_response_headers(0)["ts_stream_next"] == "false"


def test_grpc_stream_error_is_the_json_error_not_an_in_band_record(handler, make_context, inputs, sent, monkeypatch):
    """With no progress record out, a failure mid-run is an error answer, as
    for stream=false (over HTTP the same failure after a record is in-band)."""
    def fails_after_one_step(job):
        assert job.callback is None
        raise BudgetExceeded("after 1 of 3 steps")

    fail_every_optimization(monkeypatch, fails_after_one_step)
    ctx = make_context(grpc=True)
    code, message = grpc_failure(handler, ctx, [multipart_row(inputs, steps=3, stream="true")])
    assert sent == []
    assert code == 504 and message.startswith("time budget exceeded")


def test_http_answers_never_carry_ts_stream_next(handler, make_context, inputs, sent):
    for fields in ({"steps": 1, "max_size": 32}, {"steps": "x"}, {"steps": 1, "max_size": 32, "stream": "true"}):
        ctx = make_context()
        handler.handle([multipart_row(inputs, **fields)], ctx)
        assert "ts_stream_next" not in ctx.get_response_headers(0), fields
    assert sent  # the streamed request did stream: the backend, not the handler, ends that stream


def test_every_row_of_a_grpc_batch_gets_the_header(make_handler, make_context, inputs):
    handler = make_handler(rows=2)
    ctx = make_context(rows=2, grpc=True)
    handler.handle([multipart_row(inputs, steps=1, max_size=32), multipart_row(inputs, steps="x")], ctx)
    assert ctx.status(0) == 200 and ctx.status(1) == 422
    assert [ctx.get_response_headers(i).get("ts_stream_next") for i in (0, 1)] == ["false", "false"]


@pytest.mark.parametrize("name", ["Host", "url_path", "explain", "Content-Type", "authorization"])
def test_a_grpc_field_named_like_an_http_header_is_still_grpc(make_context, name):
    """A gRPC field reaches the row's header map as {"content-type": ...}, never
    as a string: a client cannot make its call look like HTTP by its names."""
    ctx = make_context(grpc=True)
    ctx._request_headers = {**ctx._request_headers, name: {"content-type": ""}}
    assert style_transfer_handler.is_grpc(ctx, 0)
    assert not style_transfer_handler.is_grpc(make_context(), 0)


def test_the_handler_module_defines_exactly_one_class():
    """TorchServe refuses to load a handler module with more than one class
    (ts/model_loader.py: 'Expected only one class in custom service code')."""
    import inspect

    classes = [c for _, c in inspect.getmembers(style_transfer_handler, inspect.isclass)
               if c.__module__ == style_transfer_handler.__name__]
    assert classes == [style_transfer_handler.StyleTransferHandler]
