"""finetune inspect with freeze flags / --recipe: the plan preview, its JSON, and one-line errors."""

import json

import pytest

from finetune.cli.options import freeze_overrides
from finetune.errors import ConfigError

EARLY = ("conv1", "bn1", "layer1", "layer2")


def test_inspect_freeze_layers_json(cli):
    r = cli("inspect", "resnet18", "--freeze-layers", ",".join(EARLY), "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    frozen = [p["name"] for p in doc["parameters"] if not p["trainable"]]
    assert frozen == [p["name"] for p in doc["parameters"] if p["name"].split(".")[0] in EARLY]
    assert len(frozen) == 30 and doc["frozen"] == 683_072 and doc["trainable"] == 11_689_512 - 683_072
    assert doc["plan"]["steps"] == ["freeze layers conv1,bn1,layer1,layer2"] and doc["plan"]["bn"] == "frozen"
    assert doc["plan"]["summary"][3] == {"module": "layer2", "tensors": 15, "params": 525_568, "trainable": 0,
                                         "frozen": 525_568}


def test_inspect_freeze_preview_table(cli):
    r = cli("inspect", "resnet18", "--freeze-layers", ",".join(EARLY))
    out = r.stdout
    assert r.exit_code == 0
    assert "tensors: 62   parameters: 11,689,512   trainable: 11,006,440   frozen: 683,072" in out
    assert "frozen: 30 tensors / 683,072   trainable: 32 tensors / 11,006,440" in out
    assert "freeze plan  (BatchNorm: frozen)" in out and "steps: freeze layers conv1,bn1,layer1,layer2" in out
    assert "│ layer1 │      12 │   147,968 │         0 │ 147,968 │" in out
    assert "│ layer3 │      15 │ 2,099,712 │ 2,099,712 │       0 │" in out


def test_inspect_typo_suggests_the_layer(cli):
    r = cli("inspect", "resnet18", "--freeze-layers", "conv1,bn1,layr1")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == ("Error: freeze layer 'layr1' matches no module of resnet18 (did you mean 'layer1', "
                        "'layer4.1', 'layer3.1'?); see 'finetune inspect resnet18 --modules'\n")


def test_inspect_recipe_and_flags_override_it(cli):
    doc = json.loads(cli("inspect", "--recipe", "linear-probe", "--json").stdout)
    assert doc["model"] == "resnet18" and doc["trainable"] == 2052  # head sized from the recipe's data: 4 classes
    doc = json.loads(cli("inspect", "--recipe", "linear-probe", "-n", "2", "--no-freeze-backbone",
                         "--freeze-first", "3", "--unfreeze", "layer4@1:0.1", "--bn", "train", "--json").stdout)
    assert [p["name"] for p in doc["parameters"] if not p["trainable"]] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert doc["plan"]["bn"] == "train"
    assert doc["plan"]["schedule"] == [{"epoch": 1, "layers": ["layer4"], "lr_mult": 0.1}]
    doc = json.loads(cli("inspect", "smallcnn", "--recipe", "linear-probe", "--json").stdout)  # MODEL wins
    assert doc["model"] == "smallcnn" and doc["trainable"] == 260  # seq.8 for the data's 4 classes


def test_inspect_needs_a_model_or_recipe(cli):
    r = cli("inspect")
    assert r.exit_code == 1
    assert r.stderr == "Error: give a MODEL (e.g. 'finetune inspect resnet18') or --recipe NAME\n"


def test_inspect_without_plan_has_no_plan_key(cli):
    assert "plan" not in json.loads(cli("inspect", "smallcnn", "--json").stdout)


@pytest.mark.parametrize("args, message", [
    (["--unfreeze", "layer4@x"], "Error: --unfreeze 'layer4@x' must be LAYERS or LAYERS@EPOCH[:LR_MULT], e.g. "
                                 "layer4@2:0.1\n"),
    (["--bn", "fronzen"],
     "Error: --bn: freeze.bn must be one of frozen, eval, train, got 'fronzen' (did you mean 'frozen'?)\n"),
    (["--freeze-first", "-1"], "Error: --freeze-first: freeze.first must not be negative, got -1\n"),
    (["--freeze-first", "11"], "Error: freeze first N must be between 0 and 10 (the number of parameter tensors in "
                               "smallcnn), got 11\n"),
    (["--freeze-backbone", "--freeze-names", "seq.8"], "Error: the freeze plan leaves nothing to train: all 10 "
                                                      "parameter tensors of smallcnn are frozen; unfreeze something "
                                                      "(e.g. --unfreeze seq.8)\n"),
])
def test_inspect_flag_errors(cli, args, message):
    r = cli("inspect", "smallcnn", *args)
    assert r.exit_code == 1 and r.stderr == message


def test_freeze_overrides_mapping():
    assert freeze_overrides() == {"freeze.names": None, "freeze.first": None, "freeze.stages": None,
                                  "freeze.layers": None, "freeze.backbone": None, "freeze.bn": None}
    o = freeze_overrides("a, b", 0, "", False, ["fc,layer4", "layer3@2", "all@4:0.01"], "train")
    assert o == {"freeze.names": ["a", "b"], "freeze.first": 0, "freeze.stages": None, "freeze.layers": [],
                 "freeze.backbone": False,
                 "freeze.bn": "train", "freeze.unfreeze": ["fc", "layer4"],
                 "freeze.schedule": [{"epoch": 2, "layers": ["layer3"], "lr_mult": 1.0},
                                     {"epoch": 4, "layers": ["all"], "lr_mult": 0.01}]}
    with pytest.raises(ConfigError, match=r"^--unfreeze '@2' must be LAYERS"):
        freeze_overrides(unfreeze=["@2"])
