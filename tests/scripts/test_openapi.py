"""docs/openapi.yaml says what the handler's parsers accept: the same
parameter names, choices and bounds, each bound checked by parsing the value
on it and the value just past it."""
from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import pytest
import yaml

from nst import Limits, RequestError, parse_request
from nst.config import FORMATS, INITS, OPTIMIZERS, POOLINGS, PRESETS, SPACES
from nst.request import PARSERS
from nst.vgg import LAYER_NAMES

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "docs/openapi.yaml").read_text())
SCHEMAS = SPEC["components"]["schemas"]
POST = SPEC["paths"]["/predictions/style_transfer"]["post"]


def _named(ref: dict) -> str:
    """{"$ref": "#/components/schemas/Steps"} -> "Steps"."""
    return ref["$ref"].removeprefix("#/components/schemas/")


# parameter -> its schema: each a named schema of its own, which generators
# can follow (openapi-python-client made no endpoint of $refs into a
# schema's properties)
PARAMETERS = {name: SCHEMAS[_named(ref)] for name, ref in SCHEMAS["Parameters"]["properties"].items()}
# what the spec's maxima are: the default limits, max_size at a GPU's
LIMITS = Limits().for_device("cuda")
IMAGE_FIELDS = ({"content", "style", "content_url", "style_url"}
                | {f"style_{i}" for i in range(2, LIMITS.max_styles + 1)})


def test_the_file_is_valid_openapi_3_1():
    from openapi_spec_validator import validate

    assert SPEC["openapi"].startswith("3.1.")
    validate(SPEC)  # raises, naming the path, where the file breaks the specification


def test_the_spec_names_every_parameter_and_image_field_and_nothing_else():
    """Each request body lists the images and every parameter, each parameter
    by reference to its one entry in Parameters; unknown names are a 422."""
    assert set(PARAMETERS) == set(PARSERS)
    for body in ("FormRequest", "JsonRequest"):
        schema = SCHEMAS[body]
        assert set(schema["properties"]) == IMAGE_FIELDS | set(PARSERS), body
        for name in PARSERS:
            prop = schema["properties"][name]
            if body == "FormRequest" and name == "style_blend":  # a list travels as one JSON text part
                assert prop["contentMediaType"] == "application/json"
                prop = prop["contentSchema"]
            assert prop == SCHEMAS["Parameters"]["properties"][name], (body, name)
        assert schema["additionalProperties"] is False
        assert schema["required"] == ["content", "style"]  # what a server without allow_urls requires


def test_a_request_without_an_image_is_refused_as_the_spec_says():
    for missing in ("content", "style"):
        fields = {"content": b"x", "style": b"x"}
        del fields[missing]
        with pytest.raises(RequestError) as e:
            parse_request(fields, LIMITS)
        assert e.value.code == 400 and e.value.message.startswith(missing), e.value.message
    content = POST["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}


@pytest.mark.parametrize("name, choices", [
    ("preset", PRESETS), ("space", SPACES), ("optimizer", OPTIMIZERS), ("init", INITS),
    ("pooling", POOLINGS), ("format", FORMATS),
])
def test_choices_are_the_parsers(name, choices):
    assert tuple(PARAMETERS[name]["enum"]) == choices


def _parses(name, value) -> bool:
    try:
        PARSERS[name](value, LIMITS)
    except RequestError as e:
        assert e.code == 422 and e.message.startswith(name), e.message
        return False
    return True


NUMERIC = [n for n, s in PARAMETERS.items() if s.get("type") in ("integer", "number")]


@pytest.mark.parametrize("name", NUMERIC)
def test_numeric_bounds_are_the_parsers(name):
    schema = PARAMETERS[name]
    integer = schema["type"] == "integer"
    past = (lambda v, d: v + d) if integer else (lambda v, d: v + d * max(abs(v), 1) * 1e-9)
    if "minimum" in schema:
        lo = schema["minimum"]
        assert _parses(name, lo) and not _parses(name, past(lo, -1)), name
    else:
        lo = schema["exclusiveMinimum"]
        assert not _parses(name, lo) and _parses(name, past(lo, 1)), name
    hi = schema["maximum"]
    assert _parses(name, hi) and not _parses(name, past(hi, 1)), name
    if integer:
        assert not _parses(name, 1.5)


def test_defaults_are_the_fast_presets():
    """A parameter's `default` is what a request that leaves it out gets."""
    from nst.config import Params
    from nst.request import Request

    defaults = Params()
    documented = {name: schema["default"] for name, schema in PARAMETERS.items() if "default" in schema}
    assert documented["stream"] is False and Request.__dataclass_fields__["stream"].default is False
    for name, value in documented.items():
        if name != "stream":
            assert getattr(defaults, name) == value, name
    # the others default to none (no seed, no deadline) or to equal weights (style_blend)
    assert {n for n in PARSERS if n not in documented} == {"seed", "style_blend", "timeout_s", "deadline"}
    assert all(getattr(defaults, n) is None for n in ("seed", "style_blend", "timeout_s", "deadline"))


def test_booleans_layers_and_blends_are_the_parsers():
    for name in ("stream", "preserve_color"):
        assert PARAMETERS[name]["type"] == "boolean"
        assert all(_parses(name, v) for v in (True, False, "true", "FALSE", "1", "0", b"true", 1, 0))
        assert not any(_parses(name, v) for v in ("yes", "", 2, None))
    layers = PARAMETERS["style_layer_weights"]
    pattern = re.compile(layers["propertyNames"]["pattern"])
    names = [f"{kind}{layer[4:]}" for layer in LAYER_NAMES for kind in ("conv", "relu")]
    assert all(pattern.fullmatch(n) for n in names)
    # every other name the pattern's shape could take is refused by the parser, and by the pattern
    for block in range(1, 7):
        for i in range(1, 6):
            for kind in ("conv", "relu"):
                n = f"{kind}{block}_{i}"
                assert bool(pattern.fullmatch(n)) == _parses("style_layer_weights", {n: 1}), n
    weight = layers["additionalProperties"]
    assert _parses("style_layer_weights", {"conv1_1": weight["maximum"]})
    assert not _parses("style_layer_weights", {"conv1_1": math.nextafter(weight["maximum"], math.inf)})
    blend = PARAMETERS["style_blend"]
    assert blend["maxItems"] == LIMITS.max_styles
    assert _parses("style_blend", [blend["items"]["maximum"]]) and not _parses("style_blend", [-1])
    json_style = SCHEMAS["JsonRequest"]["properties"]["style"]["oneOf"][1]
    assert json_style["maxItems"] == LIMITS.max_styles


def test_a_url_input_is_bounded_as_the_fetcher_bounds_it():
    from nst.config import MAX_URL_CHARS

    assert SCHEMAS["Url"]["maxLength"] == MAX_URL_CHARS


def test_the_json_example_is_a_request_the_parser_accepts():
    """The example a client generator or a fuzzer starts from: two PNGs the
    decoder reads, and parameters within the bounds."""
    from nst.imageio import decode

    example = POST["requestBody"]["content"]["application/json"]["examples"]["tiny"]["value"]
    request = parse_request(example, Limits())
    assert request.params.steps == example["steps"]
    for field in ("content", "style"):
        assert decode(base64.b64decode(example[field]), field, Limits()).size == (16, 16)


def test_every_error_status_of_the_contract_is_documented_with_the_error_body():
    responses = POST["responses"]
    contract = {"400", "413", "415", "422", "503", "504", "507"}
    assert contract <= set(responses)
    for code, response in responses.items():
        if code != "200":
            assert response == {"$ref": "#/components/responses/Error"}, code
    error = SPEC["components"]["responses"]["Error"]["content"]["application/json"]["schema"]
    assert SCHEMAS[_named(error)]["required"] == ["code", "type", "message"]
