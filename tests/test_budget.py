"""train --budget (finetune/run/budget.py): parsing, sizing, the measurement leaving the model untouched, a sized
run equal to a run of that many epochs, the guard, the errors."""

from __future__ import annotations

import pytest
import torch

from finetune import api, config
from finetune.config.preflight import budget_text, parse_budget
from finetune.errors import ConfigError
from finetune.run import budget as B

from helpers import tiny_tree


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("20m", 1200), ("1h30m", 5400), ("1.5h", 5400), ("600", 600),
                                          (" 10m ", 600), (45, 45), (None, None)])
def test_budget_durations(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text,error", [
    ("20x", "--budget '20x' is not a duration; use e.g. 90s, 20m, 1h30m or seconds"),
    ("1h1h", "--budget '1h1h' is not a duration; use e.g. 90s, 20m, 1h30m or seconds"),
    ("-5m", "--budget '-5m' is not a duration; use e.g. 90s, 20m, 1h30m or seconds"),
    ("0", "--budget '0' is too short; give at least 1s (e.g. 20m)"),
])
def test_budget_mistakes(text, error):
    with pytest.raises(ConfigError) as e:
        parse_budget(text)
    assert str(e.value) == error


def test_budget_text():
    assert [budget_text(s) for s in (45, 90, 1200, 750, 3900, 5400)] == ["45s", "1m30s", "20m", "12m30s", "1h05m",
                                                                          "1h30m"]


def test_plan_keeps_the_most_epochs_that_end_inside_the_budget():
    tp = B.Throughput(forward=50.0, train=10.0, batch=16, seconds=1.0)
    # one cached epoch (1 + 2 s), then full epochs of 100/10 + 50/50 + 2 = 13 s; the end: 3 s + 25/50
    s = B.plan_epochs(40.0, 5.0, 5, n_train=100, n_val=50, n_test=25, throughput=tp, cached_epochs=1)
    assert s.epoch_seconds == [3.0, 13.0, 13.0, 13.0, 13.0]
    assert s.end_seconds == 3.5
    assert s.epochs == 3 and s.estimate == 5.0 + 3.0 + 26.0 + 3.5
    assert s.note() == ("budget 40s: 3 of the recipe's 5 epochs fit (the LR schedule spans 3) (a full-model epoch ~13s "
                        "at 10 img/s training, 50 img/s inference, measured); expected to end after ~38s")
    assert B.plan_epochs(1000.0, 0.0, 5, n_train=100, n_val=50, n_test=0, throughput=tp, cached_epochs=1).epochs == 5
    err = B.too_short(B.plan_epochs(9.0, 5.0, 5, n_train=100, n_val=50, n_test=0, throughput=tp, cached_epochs=0))
    assert str(err) == ("--budget 9s is too short for one epoch: 5s went to setting up and one epoch takes ~13s here; "
                        "give --budget 24s or more, or fewer images")


def test_measuring_changes_nothing_about_the_model_or_the_generators():
    from finetune.models import build_model

    bb = build_model("smallcnn", num_classes=3, weights="none")
    m = bb.model
    for p in list(m.parameters())[:2]:
        p.requires_grad_(False)
    m.train()
    m.conv1.eval() if hasattr(m, "conv1") else None
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [p.requires_grad for p in m.parameters()]
    modes = [x.training for x in m.modules()]
    rng = torch.get_rng_state()
    tp = B.measure(m, (3, 32, 32), device=torch.device("cpu"), precision="fp32", channels_last=False, batch=4,
                   train_names={n for n, _ in m.named_parameters()}, min_seconds=0.01)
    assert tp.forward > 0 and tp.train > 0 and tp.batch == 4
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert [p.requires_grad for p in m.parameters()] == flags
    assert [x.training for x in m.modules()] == modes
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def _fixed_speed(monkeypatch, train_ips: float):
    monkeypatch.setattr(B, "measure", lambda *a, **k: B.Throughput(1e6, train_ips, 8, 0.0))
    monkeypatch.setattr(B, "load_rate", lambda *a, **k: None)
    monkeypatch.setattr(B, "EPOCH_OVERHEAD_SECONDS", 0.0)


def _recipe(data, epochs):
    return config.apply_overrides(config.load_recipe("default"), {"data.path": str(data), "train.epochs": epochs,
                                                                  "train.batch_size": 16, "data.augment": "none"})


@pytest.mark.slow
def test_a_sized_run_is_the_run_of_that_many_epochs(tmp_path, monkeypatch):
    """36 train images at 36/6 img/s: 6 s an epoch; a 20 s budget holds 2 of 6 (END_SECONDS 3 s): the run equals
    --epochs 2 bitwise, its config.yaml says 2, and a budget that holds none is one error."""
    data = tmp_path / "d"
    tiny_tree(data / "train", per_class=12)
    tiny_tree(data / "val", per_class=4)
    _fixed_speed(monkeypatch, train_ips=6.0)
    monkeypatch.setattr(B.time, "monotonic", lambda: 1000.0)  # nothing spent, however long the set-up takes
    sized = api.train(_recipe(data, 6), out=tmp_path / "sized", budget="20s", started=1000.0)
    plain = api.train(_recipe(data, 2), out=tmp_path / "plain")
    assert len(sized.epochs) == len(plain.epochs) == 2
    a = torch.load(tmp_path / "sized" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "plain" / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    text = (tmp_path / "sized" / "config.yaml").read_text()
    assert "#   budget: 20s -> 2 of 6 epochs\n" in text and "\n  epochs: 2\n" in text
    with pytest.raises(B.BudgetTooShort) as e:
        api.train(_recipe(data, 6), out=tmp_path / "none", budget="5s", started=1000.0)
    assert str(e.value) == ("--budget 5s is too short for one epoch: 0s went to setting up and one epoch takes ~6s "
                            "here; give --budget 11s or more, or fewer images")
    assert not (tmp_path / "none").exists()  # a run that never started leaves nothing


class _Run:
    def __init__(self, epochs):
        self.cfg = config.apply_overrides(config.load_recipe("default"), {"train.epochs": epochs})
        self.run_dir = "runs/x"
        self.stop_note = None


def test_the_guard_stops_when_the_next_epoch_would_end_past_the_budget(monkeypatch):
    s = B.Sizing(100.0, 0.0, 4, 4, [20.0] * 4, 3.0, None)
    clock = iter([0.0, 30.0, 30.0, 65.0])  # epoch 1 took 30 s (estimate 20), epoch 2 took 35 s
    monkeypatch.setattr(B.time, "monotonic", lambda: next(clock))
    g, run = B.Guard(s, started=0.0), _Run(4)
    g.on_epoch_start(run, 0, None)
    g.on_epoch_end(run, {"epoch": 1})  # at 30 s: 30 + 30 + 3 <= 100, go on
    assert run.stop_note is None
    g.on_epoch_start(run, 1, None)
    g.on_epoch_end(run, {"epoch": 2})  # at 65 s: 65 + 35 + 3 > 100
    assert run.stop_note == ("budget: stopped after epoch 2 of 4: the next epoch (~35s) would end past the 1m40s "
                             "budget; best.pt is the best epoch so far (continue with finetune train --resume "
                             "runs/x)")


def test_budget_flag_mistakes(cli, tmp_path):
    r = cli("train", "--budget", "5x")
    assert r.exit_code == 1
    assert r.stderr == "Error: --budget '5x' is not a duration; use e.g. 90s, 20m, 1h30m or seconds\n"
    r = cli("train", "--budget", "10m", "--resume", tmp_path)
    assert r.exit_code == 1 and r.stderr == ("Error: --budget sizes a new run; drop it with --resume (pass --epochs to "
                                             "extend the run)\n")
    r = cli("train", "--budget", "10m", "--nproc", "2")
    assert r.exit_code == 1 and r.stderr == ("Error: --budget sizes a run in one process; drop --nproc/--nnodes, or "
                                             "drop --budget and pass --epochs\n")
