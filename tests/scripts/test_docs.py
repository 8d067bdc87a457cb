"""The README's tables say what the code does."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml

from nst.config import RESPONSE_MARGIN_S, Limits, Params
from nst.request import PARSERS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _table_rows(header_start: str) -> dict[str, list[str]]:
    table = README.split(header_start, 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        for name in re.findall(r"`(\w+)`", cells[0]):
            rows[name] = cells
    return rows


def test_parameter_table_lists_every_parameter_with_its_default():
    from nst.request import Request

    rows = _table_rows("| name | type / range | default | meaning |")
    assert set(PARSERS) <= set(rows)
    defaults = Params()
    transport = {f.name: f.default for f in dataclasses.fields(Request)}  # stream travels beside the Params
    for name in PARSERS:
        documented = rows[name][2].strip("`")
        value = getattr(defaults, name) if hasattr(defaults, name) else transport[name]
        if value is None:
            assert documented in ("none", "equal"), name
        elif isinstance(value, bool):
            assert documented == str(value).lower(), name
        elif isinstance(value, dict):
            assert json.loads(documented) == value, name
        else:
            assert documented == str(value), name


def _bound(text: str, limits: Limits) -> float:
    """A bound as the parameter table writes it: a number, 2^63-1, or a
    server limit's name in backticks."""
    text = text.strip()
    if text.startswith("`"):
        return getattr(limits, text.strip("`"))
    return 2**63 - 1 if text == "2^63-1" else float(text)


def test_parameter_table_ranges_are_what_the_parsers_accept():
    """Every numeric range the table states is the parser's, bound by bound:
    a closed end is accepted, an open one refused, and just past either end
    is refused (a 422 naming the field). The upper bounds were once left out
    of the table, so a client read 'float > 0' and met a 422 at 1e13."""
    from nst.request import InvalidParameter

    limits = Limits()
    rows = _table_rows("| name | type / range | default | meaning |")
    checked = set()
    for name, cells in rows.items():
        m = re.match(r"(int|float) in ([\[(])([^,]+), ([^\]]+)\]", cells[1])
        each = re.search(r"each weight in \[([^,]+), ([^\]]+)\]", cells[1])
        if not (m or each):
            continue
        checked.add(name)
        if m:
            kind, bracket, lo, hi = m.group(1), m.group(2), _bound(m.group(3), limits), _bound(m.group(4), limits)
            wrap = int if kind == "int" else float
        else:  # a JSON collection: each of its weights has the range (beside a positive one: "one > 0")
            bracket, lo, hi = "[", _bound(each.group(1), limits), _bound(each.group(2), limits)
            wrap = ((lambda v: json.dumps({"conv1_1": v, "conv2_1": 1})) if name == "style_layer_weights"
                    else (lambda v: json.dumps([v, 1])))
        parse = PARSERS[name]

        def accepts(value, name=name, parse=parse, wrap=wrap) -> bool:
            try:
                parse(wrap(value), limits)
            except InvalidParameter as e:
                assert name in str(e), (name, str(e))
                return False
            return True

        past = (lambda v, d: v + d) if wrap is int else (lambda v, d: v + d * max(abs(v) * 1e-6, 1e-6))
        assert accepts(hi), (name, hi)
        assert not accepts(past(hi, 1)), (name, hi)
        assert accepts(lo) == (bracket == "["), (name, lo)
        assert not accepts(past(lo, -1)), (name, lo)
    numeric = {"steps", "max_size", "lr", "content_weight", "style_weight", "style_layer_weights", "seed",
               "style_blend", "style_scale", "tv_weight", "quality", "timeout_s", "deadline"}
    assert numeric <= checked, numeric - checked


def test_limits_table_matches_code_and_shipped_yaml():
    rows = _table_rows("| limit | default | meaning |")
    # One home per default: the shipped model config lists a limit only to change it.
    shipped = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text()).get("limits") or {}
    for name, value in shipped.items():
        assert getattr(Limits.from_mapping({name: value}), name) != getattr(Limits(), name), name
    for f in dataclasses.fields(Limits):
        assert f.name in rows, f.name
        # The documented default, read as the model config's YAML would read
        # it, must be accepted by the loader and equal the code's default, type
        # included: float() once let "0" pass for False, and a worker
        # configured as the README said failed to load.
        documented = yaml.safe_load(rows[f.name][1])
        assert Limits.from_mapping({f.name: documented}) == Limits(), f.name
        assert type(documented) is type(getattr(Limits(), f.name)) or (
            isinstance(getattr(Limits(), f.name), float) and type(documented) is int), f.name


def test_warm_up_sizes_in_the_readme_are_the_code_default():
    from nst.config import WARM_UP_SIZES

    documented = re.findall(r"(\d+)x(\d+)", README.split("`nst.config.WARM_UP_SIZES`:", 1)[1].split(";", 1)[0])
    assert [(int(w), int(h)) for w, h in documented] == list(WARM_UP_SIZES)


def test_warm_up_presets_in_the_readme_and_the_model_config_are_the_code_default():
    from nst.config import WARM_UP_PRESETS

    said = README.split("`nst.config.WARM_UP_PRESETS`:", 1)[1].split("]", 1)[0] + "]"
    assert yaml.safe_load(said.replace("`", "").replace("\n", " ")) == list(WARM_UP_PRESETS)
    yaml_text = (ROOT / "handler" / "model-config.yaml").read_text()
    said = yaml_text.split("# warm_up_presets:", 1)[1].split("default", 1)[1].split("]", 1)[0] + "]"
    assert yaml.safe_load(said.replace("#", " ").replace("\n", " ")) == list(WARM_UP_PRESETS)


def test_kept_optimizations_in_the_readme_are_the_code_default():
    from nst.config import KEEP_PROGRAMS, KEEP_PROGRAMS_MAX_PIXELS, KEEP_PROGRAMS_MEMORY

    said = README.split("`nst.config.KEEP_PROGRAMS`:", 1)[1].split(")", 1)[0]
    count, fraction = re.fullmatch(r" (\d+), at most (a quarter|a half|all) of the GPU's memory", said.replace("\n", " ")
                                   ).groups()
    assert int(count) == KEEP_PROGRAMS["cuda"] and "cpu" not in KEEP_PROGRAMS
    assert "for\nimages of up to a megapixel" in README and KEEP_PROGRAMS_MAX_PIXELS == 1024 * 1024
    assert {"a quarter": 0.25, "a half": 0.5, "all": 1.0}[fraction] == KEEP_PROGRAMS_MEMORY


def test_response_timeout_above_time_budget():
    cfg = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    limits = Limits.from_mapping(cfg.get("limits"))
    assert cfg["responseTimeout"] - limits.time_budget_s >= RESPONSE_MARGIN_S
    limits.check_response_timeout(cfg["responseTimeout"])  # the handler's own check


def test_every_test_named_in_the_fault_matrix_exists():
    text = (ROOT / "docs" / "FAULTS.md").read_text()
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(named) >= 25
    for path, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"


def test_every_setting_the_docs_name_exists_in_the_config():
    """`nst.config.NAME` in the README and docs/PERFORMANCE.md names a real
    setting: a renamed or removed one would leave the docs pointing at nothing."""
    import nst.config

    text = README + (ROOT / "docs" / "PERFORMANCE.md").read_text()
    named = set(re.findall(r"nst\.config\.([A-Z][A-Z0-9_]*)\b", text))  # settings, not classes (Limits)
    assert {"ADAM_CUDA_GRAPHS", "LBFGS_COMPILE", "KEEP_PROGRAMS"} <= named
    assert sorted(n for n in named if not hasattr(nst.config, n)) == []
