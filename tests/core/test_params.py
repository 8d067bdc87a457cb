"""Request fields -> Request: both wire shapes, presets, and every error's code and field."""
from __future__ import annotations

import base64
import json

import pytest

from nst import Limits, Params, RequestError, parse_request
from nst.config import FAST_ADAM_LR, RECIPE_STYLE_LAYERS
from nst.request import build_params, parse_json_body

LIMITS = Limits()
CONTENT = b"\x89PNG-content-bytes"  # parse_request never decodes images
STYLE = b"\xff\xd8style-bytes"
STYLE2 = b"style-two"
STYLE3 = b"style-three"


def b64(data: bytes, pad: bool = True) -> str:
    s = base64.b64encode(data).decode()
    return s if pad else s.rstrip("=")


def fails(fields: dict, code: int, field: str, limits: Limits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(fields, limits)
    err = info.value
    assert (err.code, err.field) == (code, field), err.message
    assert err.message.startswith(field)
    assert err.as_dict() == {"code": code, "type": err.type, "message": err.message}
    assert err.type != "Error"
    return err


def multipart(**extra) -> dict:
    return {"content": bytearray(CONTENT), "style": bytearray(STYLE), **extra}


def json_body(**extra) -> dict:
    return {"content": b64(CONTENT), "style": b64(STYLE), **extra}


# --- the two shapes ----------------------------------------------------------


def test_multipart_shaped_values():
    req = parse_request(
        multipart(
            steps=bytearray(b"300"),
            max_size=bytearray(b" 256\n"),
            lr=bytearray(b"0.5"),
            stream=bytearray(b"TRUE"),
            preserve_color=bytearray(b"0"),
            optimizer=bytearray(b"Adam"),
            style_layer_weights=bytearray(b'{"relu1_1": 1, "conv3_1": 0.5}'),
            style_blend=bytearray(b"[2]"),
            tv_weight=bytearray(b"1e-3"),
            pooling=bytearray(b"avg"),
            format=bytearray(b"webp"),
            quality=bytearray(b"70"),
        ),
        LIMITS,
    )
    assert req.content == CONTENT and req.styles == [STYLE]
    assert isinstance(req.content, bytes)
    p = req.params
    assert req.stream is True
    assert (p.steps, p.max_size, p.lr, p.preserve_color, p.optimizer) == (300, 256, 0.5, False, "adam")
    assert p.style_layer_weights == {"conv1_1": 1.0, "conv3_1": 0.5}
    assert p.style_blend == (2.0,)
    assert (p.tv_weight, p.pooling, p.format, p.quality) == (1e-3, "avg", "webp", 70)


def test_json_shaped_values():
    req = parse_request(
        json_body(
            steps=12,
            max_size=64,
            lr=2,
            content_weight=0,
            style_weight=1e5,
            stream=False,
            preserve_color=True,
            init="noise",
            seed=123,
            style_layer_weights={"conv4_1": 1, "conv5_1": 0},
            style_blend=[1, 3],
            style_2=b64(STYLE2),
            style_scale=0.5,
        ),
        LIMITS,
    )
    assert req.content == CONTENT and req.styles == [STYLE, STYLE2]
    p = req.params
    assert (p.steps, p.max_size, p.lr, p.content_weight, p.style_weight) == (12, 64, 2.0, 0.0, 1e5)
    assert req.stream is False
    assert (p.preserve_color, p.init, p.seed, p.style_scale) == (True, "noise", 123, 0.5)
    assert p.style_layer_weights == {"conv4_1": 1.0, "conv5_1": 0.0}
    assert p.style_blend == (1.0, 3.0)


def test_defaults_are_the_fast_preset():
    p = parse_request(multipart(), LIMITS).params
    assert p == Params()
    assert (p.preset, p.optimizer, p.lr, p.steps, p.init) == ("fast", "lbfgs", 1.0, 100, "content")
    assert dict(p.style_layer_weights) == dict(RECIPE_STYLE_LAYERS)


@pytest.mark.parametrize("value", ["true", "True", "1", b"true", bytearray(b"1"), True, 1])
def test_bool_truthy_spellings(value):
    assert parse_request(multipart(stream=value), LIMITS).stream is True


@pytest.mark.parametrize("value", ["false", "FALSE", "0", b"0", False, 0])
def test_bool_falsy_spellings(value):
    assert parse_request(multipart(stream=value), LIMITS).stream is False


# --- base64 ------------------------------------------------------------------


def test_base64_padding_optional_and_data_prefix_tolerated():
    data = b"abcd-xyz"  # 8 bytes: padded base64 ends in '='
    assert b64(data).endswith("=")
    prefixes = ("data:image/png;base64,", "DATA:;base64,", "data:image/png;name=a.png;base64,",  # RFC 2397
                "data:image/jpeg;charset=x;name=b;base64,")
    for text in (b64(data), b64(data, pad=False), *(p + b64(data) for p in prefixes),
                 " " + b64(data)[:4] + "\n" + b64(data)[4:]):
        assert parse_request({"content": text, "style": b64(STYLE)}, LIMITS).content == data


# The last two: a data: URL that is not base64 (RFC 2397's percent-encoded
# form), and a parameter with no value: not skipped, so not valid base64.
@pytest.mark.parametrize("text", ["not base64!!", "abc$", "data:image/png;base64,@@@@", "data:image/png,QUJD",
                                  "data:image/png;x;base64,QUJD"])
def test_bad_base64_is_400(text):
    fails({"content": b64(CONTENT), "style": text}, 400, "style")


def test_base64_size_checked_before_decoding():
    fails({"content": "A" * 400, "style": b64(STYLE)}, 413, "content", Limits(max_input_bytes=100))


@pytest.mark.parametrize("value", [123, None, {"a": 1}, 1.5])
def test_image_of_wrong_json_type_is_400(value):
    fails({"content": value, "style": b64(STYLE)}, 400, "content")


# --- styles ------------------------------------------------------------------


def test_style_as_json_list():
    req = parse_request({"content": b64(CONTENT), "style": [b64(STYLE), b64(STYLE2), b64(STYLE3)]}, LIMITS)
    assert req.styles == [STYLE, STYLE2, STYLE3]


def test_style_list_is_not_mutated():
    styles = [b64(STYLE)]
    parse_request({"content": b64(CONTENT), "style": styles, "style_2": b64(STYLE2)}, LIMITS)
    assert styles == [b64(STYLE)]


def test_empty_style_list_is_400():
    fails({"content": b64(CONTENT), "style": []}, 400, "style")


def test_bad_item_in_style_list_names_its_index():
    fails({"content": b64(CONTENT), "style": [b64(STYLE), "%%%"]}, 400, "style[1]")


def test_numbered_styles_in_order():
    req = parse_request(multipart(style_3=bytearray(STYLE3), style_2=bytearray(STYLE2)), LIMITS)
    assert req.styles == [STYLE, STYLE2, STYLE3]


def test_style_3_without_style_2_is_400():
    fails(multipart(style_3=bytearray(STYLE3)), 400, "style_2")


def test_too_many_styles_is_422():
    fails(multipart(style_2=b"a", style_3=b"b"), 422, "style", Limits(max_styles=2))


@pytest.mark.parametrize("blend", ["[1]", "[1, 2, 3]", [1.0]])
def test_style_blend_length_mismatch_is_422(blend):
    fails(multipart(style_2=bytearray(STYLE2), style_blend=blend), 422, "style_blend")


@pytest.mark.parametrize(
    "blend, field",
    [
        ("[0, 0]", "style_blend"),
        ("[]", "style_blend"),
        ("{}", "style_blend"),
        ("1", "style_blend"),
        ("[1,", "style_blend"),
        ("[1, -1]", "style_blend[1]"),
        ('[1, "x"]', "style_blend[1]"),
    ],
)
def test_bad_style_blend_is_422(blend, field):
    fails(multipart(style_2=bytearray(STYLE2), style_blend=blend), 422, field)


# --- missing / unknown ---------------------------------------------------------


def test_missing_content_or_style_is_400():
    fails({"style": STYLE}, 400, "content")
    fails({"content": CONTENT}, 400, "style")


@pytest.mark.parametrize("name", ["stepz", "style_1", "Steps", "content_uri", "query"])
def test_unknown_parameter_is_422(name):
    fails(multipart(**{name: b"3"}), 422, name)


@pytest.mark.parametrize("name", ["content_url", "style_url"])
def test_url_inputs_are_422_while_disabled(name):
    fails({**multipart(), name: "https://example.com/a.png"}, 422, name)


# --- numbers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [0, -1, 3001, "0", b"3001", "abc", "3.5", 3.5, True, False, "", "1e3", [3], None, "9" * 30],
)
def test_bad_steps_is_422(value):
    fails(multipart(steps=value), 422, "steps")


def test_steps_limit_is_the_servers():
    assert parse_request(multipart(steps="3000"), LIMITS).params.steps == 3000
    assert parse_request(multipart(steps=5), Limits(max_steps=5)).params.steps == 5
    fails(multipart(steps=6), 422, "steps", Limits(max_steps=5))


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", float("nan"), float("inf"), "1e400"])
def test_non_finite_lr_is_422(value):
    err = fails(multipart(lr=value), 422, "lr")
    assert "finite" in err.message


@pytest.mark.parametrize("value", [0, "0", -0.1, "1e4", "x", True, [1]])
def test_bad_lr_is_422(value):
    fails(multipart(lr=value), 422, "lr")


@pytest.mark.parametrize(
    "name, value",
    [
        ("stream", "yes"),
        ("stream", 2),
        ("preserve_color", "maybe"),
        ("preserve_color", b"tru"),
        ("stream", None),
        ("stream", 1.0),
    ],
)
def test_bad_bool_is_422(name, value):
    fails(multipart(**{name: value}), 422, name)


@pytest.mark.parametrize(
    "name, value",
    [
        ("preset", "slow"),
        ("optimizer", "sgd"),
        ("init", "zeros"),
        ("pooling", "min"),
        ("format", "gif"),
        ("preset", 1),
        ("quality", 0),
        ("quality", 101),
        ("max_size", 15),
        ("max_size", 1025),
        ("style_scale", 0),
        ("style_scale", 4.5),
        ("tv_weight", -1),
        ("content_weight", "-1"),
        ("style_weight", "big"),
        ("seed", -1),
        ("seed", "1.5"),
        ("style_layer_weights", '{"conv6_1": 1}'),
        ("style_layer_weights", '{"conv1_1": 0}'),
        ("style_layer_weights", "[1, 2]"),
        ("style_layer_weights", "{not json"),
        ("style_layer_weights", {}),
    ],
)
def test_out_of_range_or_wrong_values_are_422(name, value):
    fails(multipart(**{name: value}), 422, name)


def test_two_names_of_one_layer_are_422_not_one_silently_winning():
    """relu1_1 is conv1_1 (the activation the recipe reads): given both, the
    later once replaced the earlier, and {"conv1_1": 1, "relu1_1": 0} was
    refused as having no weight above 0."""
    for given in ('{"conv1_1": 1, "relu1_1": 0}', '{"relu3_1": 0.5, "conv3_1": 0.5, "conv4_1": 1}'):
        err = fails(multipart(style_layer_weights=given), 422, "style_layer_weights")
        assert err.message.endswith("name the same layer"), err.message
    assert "conv1_1 and relu1_1" in fails(multipart(style_layer_weights='{"conv1_1": 1, "relu1_1": 0}'), 422,
                                          "style_layer_weights").message


def test_layer_weight_error_names_the_layer_key():
    err = fails(multipart(style_layer_weights={"conv1_1": "heavy"}), 422, "style_layer_weights.conv1_1")
    assert err.field == "style_layer_weights.conv1_1"


def test_non_utf8_text_is_422():
    fails(multipart(steps=bytearray(b"\xff\xfe")), 422, "steps")


# --- hostile JSON: nesting deeper than the parser's recursion limit, integers
# too large for a float or for int() ------------------------------------------

DEEP = "[" * 5000  # RecursionError in json.loads, not a ValueError
BIG = "1" + "0" * 400  # 10**400: int() takes it, float() raises OverflowError
HUGE = "9" * 5000  # over int()'s 4300-digit limit: json.loads raises ValueError


@pytest.mark.parametrize("name", ["style_layer_weights", "style_blend"])
@pytest.mark.parametrize("wrap", [bytearray, str], ids=["multipart", "text"])
def test_deeply_nested_json_field_is_422_naming_it(name, wrap):
    value = wrap(DEEP.encode()) if wrap is bytearray else DEEP
    err = fails(multipart(**{name: value}), 422, name)
    assert "nested too deeply" in err.message


@pytest.mark.parametrize(
    "given, field",
    [
        ({"lr": 10**400}, "lr"),
        ({"style_weight": -(10**400)}, "style_weight"),
        ({"style_blend": [10**400]}, "style_blend[0]"),
        ({"style_layer_weights": {"conv1_1": 10**400}}, "style_layer_weights.conv1_1"),
        ({"steps": 10**400}, "steps"),
        ({"seed": 10**5000}, "seed"),  # str() of it would raise: the message must not need it
        ({"style_blend": f"[{BIG}]"}, "style_blend[0]"),
        ({"style_layer_weights": bytearray(f'{{"conv1_1": {BIG}}}'.encode())}, "style_layer_weights.conv1_1"),
        ({"style_blend": f"[{HUGE}]"}, "style_blend[0]"),
        ({"style_layer_weights": f'{{"relu2_1": {HUGE}}}'}, "style_layer_weights.relu2_1"),
    ],
    ids=["lr", "negative", "blend", "layer-weight", "steps", "seed-over-4300-digits",
         "blend-text", "layer-weight-text", "blend-over-4300-digits", "layer-weight-over-4300-digits"],
)
def test_huge_integers_are_422_naming_the_field(given, field):
    err = fails(json_body(**given), 422, field)
    assert "digit" in err.message and "0" * 30 not in err.message


@pytest.mark.parametrize(
    "body, code, field",
    [
        ("[" * 200_000, 400, "body"),
        ('{"content": "eA==", "style_layer_weights": ' + DEEP + "}", 422, "style_layer_weights"),
        ('{"style": "eA==", "style_blend": [' + DEEP + "]}", 422, "style_blend"),
        ('{"a": ' + '{"a": ' * 200_000, 422, "a"),
    ],
    ids=["array-200k", "layer-weights", "blend", "object-200k"],
)
@pytest.mark.parametrize("wrap", [bytes, bytearray, str])
def test_deeply_nested_json_body_names_the_field(body, code, field, wrap):
    """TorchServe passes a JSON body its own json.loads failed on as raw bytes."""
    raw = wrap(body.encode()) if wrap is not str else body
    with pytest.raises(RequestError) as info:
        parse_json_body(raw)
    err = info.value
    assert (err.code, err.field) == (code, field)
    assert err.message == f"{field}: JSON nested too deeply"


@pytest.mark.parametrize(
    "name, literal, field",
    [
        ("lr", BIG, "lr"),
        ("lr", HUGE, "lr"),
        ("steps", HUGE, "steps"),
        ("quality", "-" + HUGE, "quality"),
        ("style_blend", f"[1, {HUGE}]", "style_blend[1]"),
        ("style_layer_weights", f'{{"conv1_1": {BIG}}}', "style_layer_weights.conv1_1"),
    ],
)
def test_huge_integer_literals_in_a_raw_json_body_name_the_field(name, literal, field):
    raw = f'{{"content": "{b64(CONTENT)}", "style": "{b64(STYLE)}", "{name}": {literal}}}'.encode()
    fails(parse_json_body(raw), 422, field)


# --- presets -------------------------------------------------------------------


def test_seed_preset_values():
    p = build_params({"preset": "seed"}, LIMITS)
    assert (p.steps, p.optimizer, p.lr, p.max_size, p.init) == (2000, "adam", 0.003, 400, "content")
    assert (p.content_weight, p.style_weight, p.tv_weight, p.pooling) == (1.0, 1e6, 0.0, "max")
    assert dict(p.style_layer_weights) == {"conv1_1": 1.0, "conv2_1": 0.75, "conv3_1": 0.2, "conv4_1": 0.2, "conv5_1": 0.2}
    assert p.normalized_space


def test_seed_preset_fields_can_be_overridden():
    p = build_params({"preset": b"seed", "steps": b"5", "lr": "0.01", "max_size": 64, "init": "noise"}, LIMITS)
    assert (p.steps, p.lr, p.max_size, p.init, p.optimizer) == (5, 0.01, 64, "noise", "adam")


def test_seed_preset_is_capped_by_server_limits():
    p = build_params({"preset": "seed"}, Limits(max_steps=100, max_size=128))
    assert (p.steps, p.max_size) == (100, 128)
    p = build_params({}, Limits(max_size=128))
    assert p.max_size == 128


def test_fast_with_adam_gets_its_own_lr():
    assert build_params({"optimizer": "adam"}, LIMITS).lr == FAST_ADAM_LR == 0.02
    assert build_params({"preset": "fast", "optimizer": "adam"}, LIMITS).lr == 0.02
    assert build_params({"optimizer": "adam", "lr": 0.1}, LIMITS).lr == 0.1
    assert build_params({"optimizer": "lbfgs"}, LIMITS).lr == 1.0
    assert build_params({"preset": "seed", "optimizer": "adam"}, LIMITS).lr == 0.003


# --- Limits.from_mapping -------------------------------------------------------


def test_limits_from_mapping_good_values():
    assert Limits.from_mapping(None) == Limits() == Limits.from_mapping({})
    lim = Limits.from_mapping({"max_steps": 5, "time_budget_s": 10, "max_size": 256, "progress_every": 1})
    assert (lim.max_steps, lim.max_size, lim.progress_every) == (5, 256, 1)
    assert lim.time_budget_s == 10.0 and isinstance(lim.time_budget_s, float)
    assert Limits.from_mapping({"time_budget_s": 0.5}).time_budget_s == 0.5


def test_limits_from_shipped_model_config_yaml():
    import pathlib

    import yaml

    cfg = yaml.safe_load((pathlib.Path(__file__).resolve().parents[2] / "handler" / "model-config.yaml").read_text())
    lim = Limits.from_mapping(cfg.get("limits"))
    assert lim.max_steps >= 2000  # the seed recipe must fit
    assert lim.time_budget_s < cfg["responseTimeout"]


@pytest.mark.parametrize(
    "raw",
    [
        {"max_stepz": 5},
        {"max_steps": "5"},
        {"max_steps": True},
        {"max_steps": 0},
        {"max_steps": -3},
        {"max_steps": 2.5},
        {"max_size": None},
        {"time_budget_s": "ten"},
        {"time_budget_s": True},
        {"time_budget_s": 0},
        {"time_budget_s": -1.0},
        {"time_budget_s": [1]},
        {"min_input_side": 8},  # conv5_1 would get no pixel: a 500 on a 12 px image
        {"max_size": 12},  # below min_input_side: no output size is allowed
        {"max_size_gpu": 32, "min_input_side": 64},
        {"allow_urls": "yes"},
        {"allow_urls": 1},
    ],
)
def test_limits_from_mapping_rejects_bad_values(raw):
    """The message names the key at fault: the first one of each case."""
    with pytest.raises(ValueError) as info:
        Limits.from_mapping(raw)
    assert next(iter(raw)) in str(info.value)


def test_request_fields_are_not_consumed():
    fields = json_body(steps=3, style_2=b64(STYLE2))
    before = json.dumps(fields, sort_keys=True)
    parse_request(fields, LIMITS)
    assert json.dumps(fields, sort_keys=True) == before


def test_the_largest_max_size_follows_the_device():
    limits = Limits()
    assert limits.for_device("cpu").max_size == 1024
    assert limits.for_device("cuda").max_size == 2048
    assert limits.for_device("cuda").max_size_gpu == 2048
    fields = {"content": b"x", "style": b"y", "max_size": "2048"}
    with pytest.raises(RequestError) as e:
        parse_request(fields, limits.for_device("cpu"))
    assert e.value.code == 422 and e.value.field == "max_size"
    assert parse_request(fields, limits.for_device("cuda")).params.max_size == 2048


def test_a_preset_only_sets_defaults_and_the_space_is_its_own_parameter():
    """issue #9: preset=seed used to switch the optimization space silently."""
    seed = build_params({"preset": "seed"}, LIMITS)
    assert seed.space == "normalized" and seed.normalized_space
    assert build_params({}, LIMITS).space == "pixels"
    mixed = build_params({"preset": "seed", "space": "pixels", "optimizer": "lbfgs"}, LIMITS)
    assert (mixed.space, mixed.optimizer, mixed.steps) == ("pixels", "lbfgs", 2000) and not mixed.normalized_space
    assert build_params({"space": "normalized"}, LIMITS).normalized_space
    err = fails({"content": b64(CONTENT), "style": b64(STYLE), "space": "clamped"}, 422, "space")
    assert "pixels" in err.message
