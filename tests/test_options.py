"""The flags of ``train`` and ``lr-find`` are declared once, on the recipe schema's fields (``config.Flag``), and
generated from there: each flagged key shows in ``--help`` under its flag, no other code declares those flags, an
error in a key names the flag, and ``--help`` stays free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import config
from finetune.cli import options, train_cmd

CLI = Path(__file__).resolve().parent.parent / "finetune" / "cli"


def _decls(command) -> list[str]:
    """Every flag name a typer command declares (``--x/--no-x`` as two names, short aliases too)."""
    import typer.main

    from finetune.cli.app import app

    click_cmd = typer.main.get_command(app).commands[command]
    return [d for p in click_cmd.params for d in (*p.opts, *p.secondary_opts)]


@pytest.mark.parametrize("command", ["train", "lr-find"])
def test_each_flagged_field_is_an_option_under_its_flag(command, cli):
    decls = _decls(command)
    assert len(decls) == len(set(decls)), "a flag declared twice"
    help_text = cli(command, "--help").stdout
    schema = set()
    for key, _, fl in config.recipe_flags():
        names = fl.name.split("/") + [fl.short] * bool(fl.short)
        schema |= set(names)
        for name in names:
            assert name in decls and name in help_text, (key, name)
    tables = [train_cmd.run_options] + [train_cmd.budget_option] * (command == "train")  # --budget: train's own
    own = {d for t in tables for p in options.inspect.signature(t).parameters.values() for d in p.default.param_decls}
    assert set(decls) == schema | own  # nothing else: the schema and the tables of run options


def test_no_other_code_declares_a_schema_flag():
    """The schema's flags appear in no typer.Option of train's, lr-find's or the shared options' source: each is
    declared on its field only (other commands' flags of the same name, eval's --device, mean their own thing)."""
    schema = {n for _, _, fl in config.recipe_flags() for n in fl.name.split("/")}
    found = []
    for path in (CLI / "train_cmd.py", CLI / "lr_find_cmd.py", CLI / "options.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("Option", "Argument"):
                found += [f"{path.name}: {a.value}" for a in node.args
                          if isinstance(a, ast.Constant) and isinstance(a.value, str)
                          and set(a.value.split("/")) & schema]
    assert found == []


def test_flag_map_is_generated_from_the_schema():
    flags = options.flag_map()
    assert {k: f for k, f in flags.items() if k != "freeze.schedule"} == {
        key: fl.name.split("/")[0] for key, _, fl in config.recipe_flags()}
    assert flags["freeze.schedule"] == "--unfreeze"
    assert not hasattr(train_cmd, "KEYS") and not hasattr(train_cmd, "LR_FIND")


def test_values_become_the_keys_types():
    o = options.overrides({"lr": "auto", "freeze_names": "a, b", "epochs": 3, "unfreeze": ["fc", "layer4@2:0.5"]})
    assert o["optimizer.lr"] == "auto" and o["freeze.names"] == ["a", "b"] and o["train.epochs"] == 3
    assert o["freeze.unfreeze"] == ["fc"] and o["freeze.schedule"] == [{"epoch": 2, "layers": ["layer4"],
                                                                        "lr_mult": 0.5}]
    assert options.overrides({"lr": "0.5"})["optimizer.lr"] == 0.5 and options.overrides({})["model.name"] is None


@pytest.mark.parametrize("command", ["train", "lr-find"])
def test_a_bad_value_names_its_flag(command, cli, tmp_path):
    r = cli(command, "--lr", "-1", "--out", tmp_path / "o")
    assert r.exit_code == 1 and r.stderr == "Error: --lr: optimizer.lr must be greater than 0, got -1.0\n"
    r = cli(command, "--bn", "off", "--out", tmp_path / "o")
    assert r.stderr.startswith("Error: --bn: freeze.bn must be one of frozen, eval, train, got 'off'")
    assert not (tmp_path / "o").exists()


def test_lr_find_refuses_the_flags_of_a_resume_or_a_launch(cli, tmp_path):
    for args in (["--resume", tmp_path], ["--nproc", "2"]):
        r = cli("lr-find", *args)
        assert r.exit_code == 1 and r.stderr == "Error: lr-find takes the flags of a new run; drop --resume and " \
                                                "--nproc\n"


@pytest.mark.subprocess
@pytest.mark.parametrize("command", ["train", "lr-find", "probe"])
def test_help_imports_no_torch(command):
    code = ("import sys\nfrom finetune.cli.app import app\n"
            f"try:\n    app([{command!r}, '--help'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
