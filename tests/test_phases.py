"""A run as phases over one state (issue 12): the run directory first, listeners for the events, a typed
checkpoint, and the loop's phases (cached head, then full model after an unfreeze)."""

import ast
import pathlib

import pytest
import torch

from finetune.run import checkpoint as ck
from finetune import config
from finetune.run.callbacks import Callback
from finetune.errors import CheckpointError, DataError
from finetune.run.runner import train

PKG = pathlib.Path(__file__).resolve().parents[1] / "finetune"


def recipe(data=None, **over):
    """``data``: a data folder (the ``mini_sample`` fixture); the bundled sample when None."""
    base = {"train.epochs": 2, "train.batch_size": 64, "train.precision": "fp32", "train.tensorboard": False,
            "data.augment": "none", "scheduler.name": "constant", **({"data.path": str(data)} if data else {})}
    return config.apply_overrides(config.load_recipe("default"), {**base, **over})


def test_a_clash_on_out_is_reported_before_the_data_is_read(tmp_path):
    """The run directory is prepared first: a taken --out is the error even when the data would fail too."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        train(recipe(**{"data.path": str(tmp_path / "no-such-data")}), out=out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_setup_error_leaves_no_run_directory_behind(tmp_path, mini_sample):
    """The directory made for a run whose data fails is removed; a directory that existed (empty) is kept."""
    bad = recipe(**{"data.path": str(tmp_path / "no-such-data")})
    with pytest.raises(DataError):
        train(bad, out=tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        train(bad, out=tmp_path / "empty")
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []
    train(recipe(mini_sample, **{"train.epochs": 1}), out=tmp_path / "new")  # the same --out works at once
    assert (tmp_path / "new" / "last.pt").is_file()


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_run_start(self, run):
        self.events.append(("start", run.start_epoch))

    def on_epoch_start(self, run, epoch, phase):
        self.events.append(("epoch_start", epoch, phase.name))

    def on_note(self, run, message):
        self.events.append(("note", message.split(":")[0]))

    def on_epoch_end(self, run, row):
        self.events.append(("epoch_end", row["epoch"], (run.run_dir / "last.pt").is_file(), row["best"]))

    def on_run_end(self, run):
        self.events.append(("end", run.best["epoch"]))

    def on_close(self, run):
        self.events.append(("close",))


@pytest.mark.slow
def test_listeners_see_the_phases_in_order(tmp_path, mini_sample):
    """Head on cached features for epoch 1, the unfreeze note, then the full model; each epoch_end comes after
    its checkpoint was committed."""
    rec = Recorder()
    r = recipe(mini_sample, **{"train.epochs": 3, "freeze.backbone": True, "train.cache_features": "on",
                  "freeze.schedule": [{"epoch": 2, "layers": ["stage:-1"], "lr_mult": 0.1}]})
    res = train(r, out=tmp_path / "run", callbacks=[rec])
    assert rec.events[0] == ("start", 0)
    assert rec.events[1:] == [
        ("epoch_start", 0, "cached head"), ("epoch_end", 1, True, True),
        ("note", "epoch 2"), ("epoch_start", 1, "full model"), ("epoch_end", 2, True, rec.events[5][3]),
        ("epoch_start", 2, "full model"), ("epoch_end", 3, True, rec.events[7][3]),
        ("end", res.best_epoch), ("close",)]


@pytest.mark.slow
def test_close_runs_when_the_run_fails(tmp_path, mini_sample):
    class Boom(Callback):
        def on_epoch_end(self, run, row):
            raise RuntimeError("listener failed")

    rec = Recorder()
    with pytest.raises(RuntimeError, match="listener failed"):
        train(recipe(mini_sample, **{"train.epochs": 2}), out=tmp_path / "run", callbacks=[Boom(), rec])
    assert rec.events[-1] == ("close",) and ("end", 1) not in rec.events


@pytest.mark.slow
def test_checkpoint_dict_round_trip_keeps_unknown_keys(tmp_path, mini_sample):
    train(recipe(mini_sample, **{"train.epochs": 1}), out=tmp_path / "run")
    raw = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    c = ck.Checkpoint.from_dict({**raw, "from_a_newer_version": [1, 2]})
    assert c.epoch == 1 and c.epoch_base == 1 and c.partial is None and c.optimizer is not None
    d = c.to_dict()
    assert d["from_a_newer_version"] == [1, 2]
    assert list(d)[:len(raw)] == list(raw)  # same keys, same order as written
    for k in raw:
        if k != "model":
            assert d[k] == raw[k], k
    assert all(torch.equal(d["model"][k], raw["model"][k]) for k in raw["model"])
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert set(raw) - set(best) == {"optimizer", "scaler"}
    assert ck.Checkpoint.from_dict({k: v for k, v in raw.items() if k != "epoch_base"}).epoch_base == 0


def _long_functions(limit=60):
    """Functions whose body (docstring included) is over ``limit`` lines. The signature is not counted: a Typer
    command declares one option per parameter line (``train`` has ~60 flags and a 2-line body)."""
    out = []
    for p in sorted(PKG.rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = n.end_lineno - n.body[0].lineno + 1
                if size > limit:
                    out.append(f"{p.relative_to(PKG.parent)}:{n.name} ({size} lines)")
    return out


def test_no_function_in_the_package_is_over_60_lines():
    assert _long_functions() == []
