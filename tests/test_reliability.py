"""Reliability: mid-epoch checkpoints and exact resume in-process, safe loading with --trust-checkpoint, export,
and NaN/inf loss stopping with one line while keeping the last good checkpoint."""

from __future__ import annotations

import json
import shutil

import torch

from finetune import config
from finetune.run.checkpoint import load_checkpoint
from finetune.data.loader import EpochSampler
from finetune.run.runner import Interrupted
from finetune.training.engine import Reporter
from finetune.models import build_model
from finetune.run.runner import train
import pytest

from helpers import tiny_tree

FAST = ("--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--no-tensorboard", "--quiet")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_tree(tmp_path_factory.mktemp("rel") / "data", per_class=16)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "run"
    train(recipe(data, epochs=1), out=out)
    return out


def recipe(data, **train_over):
    over = {"data.path": str(data), "model.weights": "none", "train.batch_size": 8, "train.precision": "fp32",
            "train.device": "cpu", "train.tensorboard": False, "train.seed": 5, "data.augment": "light"}
    over.update({f"train.{k}": v for k, v in train_over.items()})
    return config.apply_overrides(config.load_recipe("default"), over)


def test_sampler_start_skips_items_and_keeps_order_and_seeds():
    s = EpochSampler(10, shuffle=True, seed=7, keyed=True)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=4)
    assert list(s) == full[4:] and len(s) == 10
    assert len(list(s)) == 10  # the start applies to one iteration only (this one is epoch 4, whole)
    s.set_epoch(3)
    assert list(s) == full


def test_mid_epoch_checkpoint_then_resume_is_exact(data, tmp_path):
    r = recipe(data, epochs=2, save_every_steps=2, accumulate=2)
    full = train(r, out=tmp_path / "full")

    class Interrupt(Reporter):
        n = 0

        def batch(self, i, batches, *a):
            Interrupt.n += 1
            if Interrupt.n == 5 + 5:  # epoch 2 (5 batches each), batch 5: saved after batch 4 (optimizer step 2)
                raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(r, out=tmp_path / "part", reporter=Interrupt())
    ck = load_checkpoint(tmp_path / "part" / "last.pt")
    assert ck["epoch"] == 1 and ck["partial"]["batches"] == 4  # saved at optimizer-step boundaries only
    assert ck["partial"]["rng"].dtype == torch.uint8 and ck["partial"]["seen"] == 32
    res = train(None, resume=tmp_path / "part")
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert "partial" not in b and b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):  # the partial epoch's sums were restored
        assert [e[k] for e in full.epochs] == [e[k] for e in res.epochs], k


def test_whole_pickled_model_needs_trust_checkpoint(data, tmp_path, cli):
    torch.manual_seed(0)
    whole = build_model("smallcnn", num_classes=3).model
    torch.save(whole, tmp_path / "whole.pth")  # the tutorial's torch.save(model, PATH)
    msg = (f"Error: '{tmp_path / 'whole.pth'}' holds pickled Python objects (e.g. a whole model saved with "
           "torch.save(model)), which can run code when loaded; re-save the weights with "
           "torch.save(model.state_dict(), PATH), or pass --trust-checkpoint if you trust where the file came "
           "from\n")
    r = cli("inspect", "smallcnn", "-n", "3", "--weights", tmp_path / "whole.pth")
    assert r.exit_code == 1 and r.stderr == msg
    r = cli("inspect", "smallcnn", "-n", "3", "--weights", tmp_path / "whole.pth", "--trust-checkpoint", "--json")
    assert r.exit_code == 0, r.stderr
    r = cli("eval", tmp_path / "whole.pth")
    assert r.exit_code == 1 and r.stderr == msg
    r = cli("train", "--model", "smallcnn", "--weights", tmp_path / "whole.pth", "--data", data, "--out",
            tmp_path / "t", "--trust-checkpoint", "--freeze-layers", "seq.0", *FAST)
    assert r.exit_code == 0, r.stderr
    after = load_checkpoint(tmp_path / "t" / "last.pt")["model"]
    assert torch.equal(after["seq.0.weight"], whole.state_dict()["seq.0.weight"])  # loaded, then kept frozen


@pytest.mark.parametrize("fmt,suffix", [("safetensors", ".safetensors"), ("state-dict", ".pth")])
def test_export_round_trip(run, tmp_path, cli, fmt, suffix):
    from safetensors.torch import load_file

    shutil.copy(run / "last.pt", tmp_path / "last.pt")
    r = cli("export", tmp_path / "last.pt", "--format", fmt)
    dest = tmp_path / f"last{suffix}"
    assert r.exit_code == 0 and r.stdout == f"{dest}\n", r.stderr
    if fmt == "safetensors":
        sd = load_file(str(dest))
    else:
        sd = torch.load(dest, weights_only=True)
    ref = load_checkpoint(run / "last.pt")["model"]
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    bb = build_model("smallcnn", num_classes=3, weights=str(dest))  # what --weights PATH does
    assert all(torch.equal(bb.model.state_dict()[k], ref[k]) for k in ref)

    before = dest.read_bytes()
    r = cli("export", tmp_path / "last.pt", "--format", fmt)
    assert r.exit_code == 1 and r.stderr == (f"Error: '{dest}' already exists; pass --overwrite to replace it or "
                                             "choose another --out\n")
    assert dest.read_bytes() == before
    (tmp_path / "w").write_text("a file where --out wants a folder")  # (a missing folder is created)
    r = cli("export", tmp_path / "last.pt", "--format", fmt, "--overwrite", "--out", tmp_path / "w" / "x",
            "--quiet")
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: cannot write '{tmp_path / 'w' / 'x'}': ")
    dest.write_bytes(b"old")
    r = cli("export", tmp_path / "last.pt", "--format", fmt, "--overwrite", "--quiet")
    assert r.exit_code == 0 and r.stdout == ""
    again = load_file(str(dest)) if fmt == "safetensors" else torch.load(dest, weights_only=True)
    assert all(torch.equal(again[k], ref[k]) for k in ref)


def test_exported_weights_train_from_cli(run, data, tmp_path, cli):
    r = cli("export", run / "last.pt", "--out", tmp_path / "w.safetensors", "--quiet")
    assert r.exit_code == 0, r.stderr
    r = cli("train", "--model", "smallcnn", "--weights", tmp_path / "w.safetensors", "--data", data, "--out",
            tmp_path / "t", *FAST)
    assert r.exit_code == 0, r.stderr
    assert config.load_recipe(str(tmp_path / "t" / "config.yaml")).model.weights == str(tmp_path / "w.safetensors")


def test_nan_loss_stops_with_one_line_and_keeps_last_good_checkpoint(data, tmp_path, cli, monkeypatch):
    real = torch.nn.CrossEntropyLoss.forward
    calls = {"n": 0}

    def forward(self, logits, y):
        if self.reduction == "mean":  # the training loss (evaluation sums)
            calls["n"] += 1
            if calls["n"] == 8:  # epoch 2, step 3
                return torch.tensor(float("nan"))
        return real(self, logits, y)

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)
    out = tmp_path / "nan"
    r = cli("train", "--model", "smallcnn", "--weights", "none", "--data", data, "--out", out, "--epochs", "3",
            *FAST[2:])
    assert r.exit_code == 1
    assert r.stderr == (f"Error: training diverged: loss became nan at epoch 2, step 3; the last good checkpoint "
                        f"is in '{out}'; lower --lr or use --clip-grad\n")
    ck = load_checkpoint(out / "last.pt")
    assert ck["epoch"] == 1 and "partial" not in ck
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1]


def test_divergence_before_any_checkpoint_says_there_is_none(data, tmp_path, cli, monkeypatch):
    real = torch.nn.CrossEntropyLoss.forward

    def forward(self, logits, y):
        if self.reduction == "mean":  # the first training step
            return torch.tensor(float("inf"))
        return real(self, logits, y)

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)
    out = tmp_path / "inf"
    r = cli("train", "--model", "smallcnn", "--weights", "none", "--data", data, "--out", out, *FAST)
    assert r.exit_code == 1
    assert r.stderr == ("Error: training diverged: loss became inf at epoch 1, step 1, before the first checkpoint "
                        "(nothing was saved); lower --lr or use --clip-grad\n")
    assert not (out / "last.pt").exists()


def test_best_is_chosen_among_finite_val_losses_and_metrics_json_is_strict(data, tmp_path, monkeypatch):
    """Epoch 2's val loss is NaN (its accuracy the highest): it is not the best, and metrics.json says null, not
    the bare NaN that JSON parsers reject."""
    import finetune.run.runner as R

    real = R.evaluate
    calls = {"n": 0}

    def evaluate(*a, **k):
        res = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            res = {**res, "loss": float("nan"), "accuracy": 1.0}
        return res

    monkeypatch.setattr(R, "evaluate", evaluate)
    out = tmp_path / "r"
    train(recipe(data, epochs=3), out=out)

    def strict(c):
        raise ValueError(f"bare {c} in metrics.json")

    m = json.loads((out / "metrics.json").read_text(), parse_constant=strict)
    assert m["epochs"][1]["val_loss"] is None and m["epochs"][1]["val_acc"] == 1.0
    assert m["best"]["epoch"] != 2
    assert load_checkpoint(out / "best.pt")["epoch"] == m["best"]["epoch"]


def test_json_output_of_a_nan_model_is_strict_json(run, data, tmp_path, cli):
    """A checkpoint whose weights are NaN: predict --json and eval --json print null, not bare NaN."""
    ck = load_checkpoint(run / "best.pt")
    ck["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ck["model"].items()}
    torch.save(ck, tmp_path / "nan.pt")

    def strict(c):
        raise ValueError(f"bare {c}")

    r = cli("predict", tmp_path / "nan.pt", data / "a", "--json", "--top-k", "1")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout, parse_constant=strict)
    assert rows[0]["top"][0]["prob"] is None
    r = cli("eval", tmp_path / "nan.pt", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout, parse_constant=strict)["loss"] is None


def test_a_class_without_val_images_says_no_samples(tmp_path, cli):
    """Class c has train images but no val images: its accuracy is not 0.0% but "no samples" (null in --json)."""
    for sub, classes in (("train", ("a", "b", "c")), ("val", ("a", "b"))):
        tiny_tree(tmp_path / "d" / sub, classes=classes, per_class=4)
    out = tmp_path / "r"
    r = cli("train", "--model", "smallcnn", "--weights", "none", "--data", tmp_path / "d", "--out", out, *FAST)
    assert r.exit_code == 0, r.stderr
    r = cli("eval", out / "best.pt", "--json", "--device", "cpu")
    per_class = json.loads(r.stdout)["per_class"]
    assert per_class["c"] is None and per_class["a"] is not None
    r = cli("eval", out / "best.pt", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    row_c = [line for line in r.stdout.splitlines() if line.strip("│┃ ").startswith("c ")]
    assert len(row_c) == 1 and "no samples" in row_c[0] and "%" not in row_c[0], r.stdout


def test_two_runs_without_out_in_the_same_second_get_their_own_directories(data, tmp_path, monkeypatch, cli):
    """The default name (runs/<date>-<time>-<model>) has one-second resolution: the second run of that second takes
    `-2` (claimed with mkdir, atomic), and neither run touches the other's files."""
    import time

    import finetune.run.checkpoint as ck

    monkeypatch.chdir(tmp_path)
    real = time.strftime
    monkeypatch.setattr(ck.time, "strftime", lambda fmt, *a: "20260101-120000" if fmt == "%Y%m%d-%H%M%S"
                        else real(fmt, *a))
    args = ("train", "--model", "smallcnn", "--weights", "none", "--data", data, "--image-size", "32", *FAST)
    first = cli(*args)
    assert first.exit_code == 0, first.stderr
    a = tmp_path / "runs" / "20260101-120000-smallcnn"
    before = {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()}
    second = cli(*args, "--seed", "9")
    assert second.exit_code == 0, second.stderr
    b = tmp_path / "runs" / "20260101-120000-smallcnn-2"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [a.name, b.name]
    assert {p.name: p.read_bytes() for p in a.iterdir() if p.is_file()} == before  # the first run is untouched
    assert load_checkpoint(a / "last.pt")["recipe"]["train"]["seed"] == 0
    assert load_checkpoint(b / "last.pt")["recipe"]["train"]["seed"] == 9


def test_racing_claims_of_one_run_name_get_distinct_directories(tmp_path):
    """Eight threads claim the same name at once: eight different new directories (mkdir is the atomic claim)."""
    from concurrent.futures import ThreadPoolExecutor

    from finetune.run.checkpoint import claim_run_dir

    base = tmp_path / "runs" / "20260101-120000-smallcnn"
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: claim_run_dir(base), range(8)))
    assert sorted(p.name for p in got) == sorted([base.name] + [f"{base.name}-{n}" for n in range(2, 9)])
    assert all(p.is_dir() and not any(p.iterdir()) for p in got)


def test_resume_honours_trust_checkpoint(data, tmp_path, cli):
    """A last.pt holding a pickled object (written by other code) is refused by --resume with the usual line, and
    --resume --trust-checkpoint loads it (the flag used to be ignored there, so it could not be resumed at all)."""
    import fractions

    out = tmp_path / "run"
    assert cli("train", "--model", "smallcnn", "--weights", "none", "--data", data, "--out", out, *FAST).exit_code == 0
    state = torch.load(out / "last.pt", weights_only=True)
    torch.save({**state, "note": fractions.Fraction(1, 3)}, out / "last.pt")
    r = cli("train", "--resume", out, "--epochs", "2", "--quiet")
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: '{out / 'last.pt'}' holds pickled Python objects")
    assert "pass --trust-checkpoint if you trust where the file came from" in r.stderr
    r = cli("train", "--resume", out, "--epochs", "2", "--quiet", "--trust-checkpoint")
    assert r.exit_code == 0, r.stderr
    assert [e["epoch"] for e in load_checkpoint(out / "last.pt")["metrics"]] == [1, 2]
