"""pipeline.run: bytes in, encoded image out, every option through the real loop."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from nst import Limits, RequestError, parse_request, run

LIMITS = Limits()


def stylize_bytes(vgg, fields: dict, limits: Limits = LIMITS):
    return run(parse_request(fields, limits), vgg, limits)


def open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def tv(img: Image.Image) -> float:
    """Mean squared neighbour difference, in 8-bit units (independent of nst.losses)."""
    a = np.asarray(img.convert("RGB"), np.float64)
    return float(((a[:, 1:] - a[:, :-1]) ** 2).mean() + ((a[1:] - a[:-1]) ** 2).mean())


def mean_chroma(img: Image.Image) -> np.ndarray:
    """Mean (Cb, Cr) via Pillow's own JPEG YCbCr conversion."""
    ycc = np.asarray(img.convert("RGB").convert("YCbCr"), np.float64)
    return ycc[..., 1:].reshape(-1, 2).mean(0)


@pytest.mark.parametrize(
    "content_size, max_size, expected",
    [
        ((80, 40), 48, (48, 24)),
        ((60, 45), 40, (40, 30)),
        ((45, 60), 40, (30, 40)),
        ((50, 37), 32, (32, round(37 * 32 / 50))),
        ((40, 30), 96, (40, 30)),  # never upscales
        ((40, 30), 40, (40, 30)),
    ],
)
def test_output_size_and_aspect(vgg, images, content_size, max_size, expected):
    fields = {
        "content": images.png(images.content(*content_size)),
        "style": images.jpeg(images.style(40, 40)),
        "steps": b"2",
        "max_size": str(max_size).encode(),
    }
    out = stylize_bytes(vgg, fields)
    img = open_image(out.data)
    assert out.content_type == "image/png" and img.format == "PNG"
    assert img.size == expected
    assert max(img.size) == min(max_size, max(content_size))
    w, h = content_size
    assert abs(img.size[0] / img.size[1] - w / h) < 0.05
    assert out.result.steps == 2 and out.result.image.shape == (1, 3, expected[1], expected[0])


def test_jpeg_content_is_drafted_but_output_size_exact(vgg, images):
    big = images.content(400, 300)
    out = stylize_bytes(vgg, {"content": images.jpeg(big), "style": images.png(images.style()), "steps": 1, "max_size": 48})
    assert open_image(out.data).size == (48, 36)


@pytest.mark.parametrize("fmt, pil, ctype", [("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp"), ("png", "PNG", "image/png")])
def test_output_formats(vgg, images, fmt, pil, ctype):
    out = stylize_bytes(
        vgg,
        {
            "content": images.png(images.content(40, 32)),
            "style": images.png(images.style()),
            "steps": b"2",
            "format": fmt,
            "quality": b"80",
        },
    )
    img = open_image(out.data)
    assert (out.content_type, img.format, img.size) == (ctype, pil, (40, 32))


def test_preserve_color_keeps_content_chroma(vgg, images):
    content, style = images.content(40, 40), images.style(40, 40)
    base = {
        "content": images.png(content),
        "style": images.png(style),
        "steps": b"8",
        "optimizer": b"adam",
        "lr": b"0.05",
        "init": b"noise",  # the start image carries neither image's colours
        "seed": b"3",
    }
    kept = open_image(stylize_bytes(vgg, {**base, "preserve_color": b"true"}).data)
    free = open_image(stylize_bytes(vgg, {**base, "preserve_color": b"false"}).data)
    c, s = mean_chroma(content), mean_chroma(style)
    assert np.linalg.norm(c - s) > 30  # the two really differ in colour
    d_kept = np.linalg.norm(mean_chroma(kept) - c)
    assert d_kept < 3  # 8-bit chroma units
    assert d_kept < np.linalg.norm(mean_chroma(kept) - s) / 10
    assert d_kept < np.linalg.norm(mean_chroma(free) - c)
    # luminance is the stylized one, not the content's
    assert not np.array_equal(np.asarray(kept.convert("L")), np.asarray(content.convert("L")))


def test_multi_style_blend_runs_and_blend_weights_matter(vgg, images):
    content = images.png(images.content(40, 32))
    style_a = images.png(images.style(32, 32))
    style_b = images.png(images.content(32, 32).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    common = {"content": content, "steps": b"3", "optimizer": b"adam"}

    only_a = stylize_bytes(vgg, {**common, "style": style_a})
    a_via_blend = stylize_bytes(vgg, {**common, "style": style_a, "style_2": style_b, "style_blend": b"[1, 0]"})
    mixed = stylize_bytes(vgg, {**common, "style": [style_a, style_b], "style_blend": [0.5, 0.5]})
    equal = stylize_bytes(vgg, {**common, "style": style_a, "style_2": style_b})

    # weight 0 on style_2 makes the Gram targets exactly style_a's
    assert a_via_blend.data == only_a.data
    assert a_via_blend.result.loss == only_a.result.loss
    assert open_image(mixed.data).size == (40, 32)
    assert mixed.data != only_a.data
    # no style_blend means equal weights
    assert equal.data == mixed.data


def test_avg_pooling_runs_and_differs_from_max(vgg, images):
    base = {"content": images.png(images.content(40, 32)), "style": images.png(images.style()), "steps": b"3"}
    out_max = stylize_bytes(vgg, {**base, "pooling": "max"})
    out_avg = stylize_bytes(vgg, {**base, "pooling": "avg"})
    assert open_image(out_avg.data).size == (40, 32)
    assert out_avg.data != out_max.data
    assert out_avg.result.loss != out_max.result.loss


def test_tv_weight_smooths(vgg, images):
    base = {
        "content": images.png(images.content(40, 40)),
        "style": images.png(images.style(40, 40)),
        "steps": b"10",
        "optimizer": b"adam",
        "lr": b"0.05",
        "init": b"noise",
        "seed": b"1",
    }
    rough = open_image(stylize_bytes(vgg, {**base, "tv_weight": b"0"}).data)
    smooth = open_image(stylize_bytes(vgg, {**base, "tv_weight": b"1e7"}).data)
    assert tv(smooth) < 0.8 * tv(rough)


def test_style_scale_runs(vgg, images):
    base = {"content": images.png(images.content(48, 32)), "style": images.png(images.style(64, 64)), "steps": b"2"}
    out = stylize_bytes(vgg, {**base, "style_scale": b"0.5"})
    assert open_image(out.data).size == (48, 32)
    assert out.data != stylize_bytes(vgg, base).data


def test_seed_preset_through_pipeline_resizes_style_to_content(vgg, images):
    out = stylize_bytes(
        vgg,
        {
            "content": images.png(images.content(48, 32)),
            "style": images.png(images.style(20, 50)),
            "preset": b"seed",
            "steps": b"2",
        },
    )
    assert open_image(out.data).size == (48, 32)


def test_progress_callback_and_limits_progress_every(vgg, images):
    seen = []
    limits = Limits(progress_every=2)
    fields = {"content": images.png(images.content(32, 32)), "style": images.png(images.style()), "steps": b"5"}
    run(parse_request(fields, limits), vgg, limits, callback=seen.append)
    assert [p.step for p in seen] == [2, 4, 5]


def test_bad_style_image_names_its_field(vgg, images):
    fields = {
        "content": images.png(images.content(32, 32)),
        "style": images.png(images.style()),
        "style_2": b"not an image",
        "steps": b"1",
    }
    with pytest.raises(RequestError) as info:
        stylize_bytes(vgg, fields)
    assert (info.value.code, info.value.field) == (415, "style_2")
    assert info.value.message.startswith("style_2")


def test_bad_item_of_a_json_style_list_names_its_index(vgg, images):
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    fields = {"content": b64(images.png(images.content(32, 32))),
              "style": [b64(images.png(images.style())), b64(b"not an image")], "steps": 1}
    with pytest.raises(RequestError) as info:
        stylize_bytes(vgg, fields)
    assert (info.value.code, info.value.field) == (415, "style[1]")


@pytest.mark.parametrize("field", ["content_url", "style_url"])
def test_fetched_bytes_that_are_not_an_image_name_the_url_field(vgg, images, field):
    """The client gave a URL, so the error names the URL field, not the image it stands for."""
    limits = Limits(allow_urls=True)
    image = field.removesuffix("_url")
    other = "style" if image == "content" else "content"
    fields = {field: "https://example.com/x", other: images.png(images.style()), "steps": b"1"}
    request = parse_request(fields, limits, fetch=lambda url, name: b"<html>not an image</html>")
    with pytest.raises(RequestError) as info:
        run(request, vgg, limits)
    assert (info.value.code, info.value.field) == (415, field)
    assert info.value.message.startswith(field)


def test_elongated_content_that_max_size_shrinks_below_min_side_is_422(vgg, images):
    # 64x16 passes the input check, but at max_size 16 it would become 16x4:
    # too small for VGG's four poolings. A client error, not a 500.
    fields = {"content": images.png(images.content(64, 16)), "style": images.png(images.style()), "max_size": b"16", "steps": b"1"}
    with pytest.raises(RequestError) as info:
        stylize_bytes(vgg, fields)
    assert info.value.code == 422 and info.value.message.startswith(info.value.field)
    # the same image at a size that keeps 16 px works
    fields["max_size"] = b"64"
    assert open_image(stylize_bytes(vgg, fields).data).size == (64, 16)


def test_deadline_reaches_the_loop(vgg, images):
    from nst import BudgetExceeded

    fields = {"content": images.png(images.content(32, 32)), "style": images.png(images.style()), "steps": b"2"}
    with pytest.raises(BudgetExceeded):
        run(parse_request(fields, LIMITS), vgg, LIMITS, deadline=0.0)


def test_result_image_matches_encoded_png(vgg, images):
    out = stylize_bytes(vgg, {"content": images.png(images.content(32, 24)), "style": images.png(images.style()), "steps": 2})
    arr = np.asarray(open_image(out.data).convert("RGB"), np.float32) / 255
    torch.testing.assert_close(torch.from_numpy(arr).permute(2, 0, 1)[None], out.result.image, rtol=0, atol=0)


def _jobs(vgg, images, n: int, job_kw: dict | None = None):
    """n prepared requests of one shape (on a CPU they share an optimization);
    `job_kw`: row index -> Job fields (callback, deadline)."""
    from nst.pipeline import Job, prepare

    out = []
    for i in range(n):
        fields = {"content": images.png(images.content(40, 32)), "style": images.png(images.style(32, 32)),
                  "steps": "4", "seed": str(i)}
        out.append(Job(prepare(parse_request(fields, LIMITS), vgg, LIMITS), **(job_kw or {}).get(i, {})))
    return out


def test_a_failed_batch_row_lets_go_of_the_batch(vgg, images):
    """A row's exception is returned without its traceback: its frames held
    the batch's images and every row's L-BFGS history until the cycle
    collector ran (a lone row's always dropped it)."""
    from nst.pipeline import run_batch

    def gone(progress):
        raise ConnectionError("the client went away")

    jobs = _jobs(vgg, images, 2, {0: {"callback": gone}})
    failed, ok = run_batch(jobs, vgg, LIMITS)
    assert isinstance(failed, ConnectionError) and failed.__traceback__ is None
    assert ok.result.steps == 4 and ok.batch == 2


def test_a_request_past_its_deadline_before_it_starts_builds_nothing(vgg, images, monkeypatch):
    """Whether its batch's earlier groups used its time up or it waited in
    the queue: BudgetExceeded before its targets' VGG passes (seconds a
    request on a CPU at 1024 px, toward responseTimeout), the others run."""
    import time

    import nst.optimize as nst_optimize
    from nst.optimize import BudgetExceeded, stylize
    from nst.pipeline import run_batch

    built = []
    real = nst_optimize.request_objective
    monkeypatch.setattr(nst_optimize, "request_objective", lambda *a, **k: built.append(1) or real(*a, **k))
    late, ok = run_batch(_jobs(vgg, images, 2, {0: {"deadline": time.monotonic() - 1}}), vgg, LIMITS)
    assert isinstance(late, BudgetExceeded) and "after 0 of 4 steps" in str(late)
    assert ok.result.steps == 4 and len(built) == 1  # the live request's targets only
    job = _jobs(vgg, images, 1)[0]
    with pytest.raises(BudgetExceeded):
        stylize(vgg, job.prepared.content, job.prepared.styles, job.prepared.request.params,
                deadline=time.monotonic() - 1)
    assert len(built) == 1


def test_a_batched_row_whose_encoding_fails_fails_alone_and_memory_is_freed(vgg, images, monkeypatch):
    """Encoding a shared optimization's row can run out of memory too (a
    large PNG on a full host): that row's outcome is the error, without its
    traceback, the device's cache is released, and the other row is served."""
    import nst.pipeline as pipeline
    from nst.pipeline import run_batch

    real, freed = pipeline.finish, []

    def finish(prepared, result, batch=1):
        if prepared.request.params.seed == 0:
            raise MemoryError("no room for the PNG")
        return real(prepared, result, batch)

    monkeypatch.setattr(pipeline, "finish", finish)
    monkeypatch.setattr(pipeline, "free_memory", lambda device: freed.append(device))
    failed, ok = run_batch(_jobs(vgg, images, 2), vgg, LIMITS)
    assert isinstance(failed, MemoryError) and failed.__traceback__ is None
    assert ok.result.steps == 4 and ok.batch == 2
    assert freed == [vgg.mean.device]
