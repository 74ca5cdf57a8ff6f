"""Property-based tests: any recipe (as a dict or as YAML text) and any freeze flags give a valid result or the
library's user error (FinetuneError), never another exception."""

from __future__ import annotations

import dataclasses
import math
import os
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune import config
from finetune.cli.options import freeze_overrides
from finetune.config import Recipe
from finetune.errors import ConfigError, FinetuneError

# HYP_N=2000 pytest tests/test_properties.py searches harder; the suite's default keeps it to a few seconds
SETTINGS = settings(max_examples=int(os.environ.get("HYP_N", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

SECTIONS = ["name", "description", "model", "data", "freeze", "optimizer", "scheduler", "train"]
KEYS = sorted({f.name for sec in (config.ModelCfg, config.DataCfg, config.FreezeCfg, config.OptimizerCfg,
                                 config.SchedulerCfg, config.TrainCfg) for f in dataclasses.fields(sec)})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 2**63, 10**400, -1, 0]),
    st.sampled_from(["sgd", "cosine", "auto", "cpu", "fp32", "frozen", "layer4", "all", "1e-3", "ü∂ß", ""]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner,
                                                 max_size=3)), max_leaves=8)
sections = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), values, max_size=4)
FIELDS = [(sec, f.name) for sec, cls in (("model", config.ModelCfg), ("data", config.DataCfg),
                                         ("freeze", config.FreezeCfg), ("optimizer", config.OptimizerCfg),
                                         ("scheduler", config.SchedulerCfg), ("train", config.TrainCfg))
          for f in dataclasses.fields(cls)]


def _nest(pairs: list) -> dict:
    out: dict = {}
    for (sec, key), value in pairs:
        out.setdefault(sec, {})[key] = value
    return out


# mostly well-formed recipes with a few fields set to anything: reaches the value checks, not just the key checks
near_valid = st.lists(st.tuples(st.sampled_from(FIELDS), scalars), min_size=1, max_size=4).map(_nest)
recipes = st.one_of(
    near_valid,
    st.dictionaries(st.sampled_from(SECTIONS), st.one_of(sections, values), max_size=4),
    st.dictionaries(st.text(max_size=8), values, max_size=3),
    values,
)


def _numbers(node) -> list[float]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in _numbers(v)]
    return [node] if isinstance(node, float) else []


def _ok(thunk) -> object:
    try:
        return thunk()
    except FinetuneError:
        return None


@SETTINGS
@given(recipes)
def test_from_dict_gives_a_recipe_or_a_config_error(data):
    try:
        r = config.from_dict(data)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    assert isinstance(r, Recipe)
    assert all(math.isfinite(v) for v in _numbers(r.to_dict()))  # nan/inf lr, momentum, ... are errors
    assert config.from_dict(r.to_dict()).to_dict() == r.to_dict()  # a valid recipe round-trips


@SETTINGS
@given(st.one_of(recipes.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
                 st.text(alphabet=string.printable + "äß∂\t", max_size=80)))
def test_load_recipe_from_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipes") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        data, parsed = yaml.safe_load(text), True
    except yaml.YAMLError:
        data, parsed = None, False
    try:
        r = config.load_recipe(str(path))
    except ConfigError as e:  # one line naming the file; a parsed file fails exactly when its data does
        assert str(e).startswith(f"recipe '{path}'") and "\n" not in str(e).strip()
        if parsed:
            with pytest.raises(ConfigError):
                config.from_dict(data)
        return
    assert parsed
    expected = config.from_dict(data)
    expected.name = expected.name or path.stem
    assert r.to_dict() == expected.to_dict()


_model = None


def _smallcnn():
    global _model
    from finetune.models import build_model

    if _model is None:
        _model = build_model("smallcnn", num_classes=3)
    return _model


good = st.sampled_from(["seq.0", "seq.2", "seq.4", "seq.7", "seq.0.weight", "seq.*.bias", "bias", "seq.?"])
bad = st.sampled_from(["seq", "seq.8", "*", "weight", "sq.2", "all", "head", "", " ", ",", "ü", "[", "seq.0\n"])
names = st.one_of(good, good, good, bad)
lists = st.one_of(st.lists(names, max_size=3).map(",".join), st.lists(names, max_size=3).map(",".join),
                  st.text(max_size=10))
unfreeze_items = st.one_of(lists, st.builds(lambda ls, e, m: f"{ls}@{e}{m}", lists,
                                            st.one_of(st.integers(-3, 5).map(str), st.text(max_size=3)),
                                            st.sampled_from(["", ":0.1", ":x", ":-1", ":", ":1e400"])))


@SETTINGS
@given(st.one_of(st.none(), lists), st.one_of(st.none(), st.integers(-5, 20), st.integers(10**20, 10**30)),
       st.one_of(st.none(), lists), st.one_of(st.none(), st.booleans()),
       st.one_of(st.none(), st.lists(unfreeze_items, max_size=3)),
       st.one_of(st.none(), st.sampled_from(["frozen", "train", "freeze", ""])))
def test_freeze_flags_give_a_plan_or_a_user_error(names_, first, layers, backbone, unfreeze, bn):
    import torch

    from finetune.training.freeze import FreezePlan, apply_freeze

    def plan():
        over = freeze_overrides(names_, first, layers, backbone, unfreeze, bn)
        recipe = config.apply_overrides(Recipe(), over)
        bb = _smallcnn()
        for p in bb.model.parameters():
            p.requires_grad_(True)
        return apply_freeze(bb, recipe.freeze)

    result = _ok(plan)
    if result is not None:
        assert isinstance(result, FreezePlan)
        trainable = [n for n, p in _smallcnn().model.named_parameters() if p.requires_grad]
        assert trainable  # a plan that leaves nothing to train is a FreezeError, never a silent result
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("section,key,value,shown", [
    ("optimizer", "lr", math.nan, "nan"), ("optimizer", "momentum", math.inf, "inf"),
    ("train", "clip_grad", -math.inf, "-inf"), ("optimizer", "weight_decay", 10**400, "100000000000... (401 digits)"),
])
def test_non_finite_numbers_are_config_errors(section, key, value, shown):
    """Found by the property test: nan passed every 'must be greater than 0' check (nan <= 0 is False)."""
    with pytest.raises(ConfigError) as e:
        config.from_dict({section: {key: value}})
    assert str(e.value).startswith(f"{section}.{key} must be a finite number, got {shown}")


def test_non_finite_lr_from_the_cli(cli, tmp_path):
    r = cli("train", "--lr", "nan", "--out", tmp_path / "o")
    assert r.exit_code == 1 and r.stderr == "Error: --lr: optimizer.lr must be a finite number, got nan\n"
