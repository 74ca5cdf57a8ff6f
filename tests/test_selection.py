"""Issue 17, the loop-bound items: monitored checkpoint selection and top-k, model EMA, mixup/cutmix, per-step
TensorBoard scalars — with exact resume."""

import json
import math

import pytest
import torch

from finetune import config
from finetune.training.engine import Reporter
from finetune.training.metrics import confusion_metrics
from finetune.run.runner import Interrupted, train
from finetune.run.selection import Monitor, update_top_k


def recipe(data, **over):
    """The loop features on the bundled sample's shapes, 12 train / 6 val images a class (the ``mini_sample``
    fixture: 3 batches of 16 an epoch)."""
    base = {"data.path": str(data), "train.epochs": 3, "train.batch_size": 16, "train.precision": "fp32",
            "train.tensorboard": False, "data.augment": "light", "scheduler.name": "cosine", "optimizer.lr": 0.05}
    return config.apply_overrides(config.load_recipe("default"), {**base, **over})


def weights(path):
    return torch.load(path, weights_only=True)


def test_macro_f1_by_hand():
    c = torch.tensor([[2, 1, 0, 0], [0, 3, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    # class 0: P 2/3 R 2/3 -> 2/3; class 1: P 3/4 R 1 -> 6/7; class 2: no hit -> 0; class 3: never seen -> left out
    assert confusion_metrics(c)["macro_f1"] == pytest.approx((2 / 3 + 6 / 7 + 0) / 3, abs=1e-12)


def test_top_k_keeps_the_best_and_ties_keep_the_earlier_epoch():
    m, top, log = Monitor("val_acc"), [], []
    for epoch, value in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7), (5, float("nan"))]:
        top, kept, dropped = update_top_k(top, epoch, value, 2, m)
        log.append((kept, dropped))
    assert [(e["epoch"], e["file"]) for e in top] == [(2, "epoch002.pt"), (4, "epoch004.pt")]  # 2 ties 4: first
    assert log == [(True, []), (True, []), (True, ["epoch001.pt"]), (True, ["epoch003.pt"]), (False, [])]
    top, kept, dropped = update_top_k(top, 6, 0.7, 2, m)  # a third 0.7: the earlier two stay
    assert (kept, dropped, [e["epoch"] for e in top]) == (False, ["epoch006.pt"], [2, 4])
    top, _, _ = update_top_k([], 1, 0.9, 2, Monitor("val_loss"))
    top, kept, dropped = update_top_k(top, 2, 0.4, 2, Monitor("val_loss"))
    assert [e["epoch"] for e in top] == [2, 1] and kept
    assert Monitor("val_loss").better(0.3, 0.4) and not Monitor("val_loss").better(float("nan"), 0.4)
    assert Monitor("val_acc", "min").better(0.3, 0.4)


@pytest.mark.slow
def test_monitor_val_loss_with_top_k(tmp_path, mini_sample):
    out = tmp_path / "run"
    train(recipe(mini_sample, **{"train.monitor": "val_loss", "train.save_top_k": 2, "train.epochs": 4}), out=out)
    m = json.loads((out / "metrics.json").read_text())
    losses = {e["epoch"]: e["val_loss"] for e in m["epochs"]}
    ranked = sorted(losses, key=lambda e: (losses[e], e))
    assert m["best"] == {"epoch": ranked[0], "val_acc": m["epochs"][ranked[0] - 1]["val_acc"],
                         "monitor": "val_loss", "value": losses[ranked[0]]}
    assert [(e["epoch"], e["value"]) for e in m["top_k"]] == [(e, losses[e]) for e in ranked[:2]]
    assert sorted(p.name for p in out.glob("epoch*.pt")) == sorted(f"epoch{e:03d}.pt" for e in ranked[:2])
    assert weights(out / "best.pt")["epoch"] == ranked[0]
    for e in ranked[:2]:
        assert weights(out / f"epoch{e:03d}.pt")["epoch"] == e
    assert all(0.0 <= e["val_f1"] <= 1.0 for e in m["epochs"])


@pytest.mark.slow
def test_early_stop_follows_the_monitor(tmp_path, mini_sample):
    notes = []

    class R(Reporter):
        def note(self, message):
            notes.append(message)

    # min mode on accuracy: an epoch is "better" only with LOWER accuracy, so training soon stops
    r = train(recipe(mini_sample, **{"train.monitor_mode": "min", "train.early_stop": 1, "train.epochs": 6,
                                     "train.seed": 1}), out=tmp_path / "run", reporter=R())
    accs = [e["val_acc"] for e in r.epochs]
    assert any(n.startswith("early stop: no better val_acc for 1 epochs") for n in notes)
    assert len(accs) < 6 and accs[-1] >= min(accs[:-1])


class StopAt(Reporter):
    """Ctrl-C at batch ``i`` of epoch ``e`` (0-based): a mid-epoch stop after a mid-epoch save."""

    def __init__(self, epoch, batch):
        self.at, self.current = (epoch, batch), -1

    def epoch_start(self, epoch, epochs, batches):
        self.current = epoch

    def batch(self, i, batches, loss, acc, ips):
        if (self.current, i) == self.at:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_ema_is_evaluated_saved_and_resumes_exactly(tmp_path, mini_sample):
    over = {"train.ema": True, "train.ema_decay": 0.9}
    full = train(recipe(mini_sample, **over), out=tmp_path / "full")
    m = json.loads((tmp_path / "full" / "metrics.json").read_text())
    rows = m["epochs"]
    assert all(0.0 <= r["ema_val_acc"] <= 1.0 and math.isfinite(r["ema_val_loss"]) for r in rows)
    best_ema = max(rows, key=lambda r: (r["ema_val_acc"], -r["epoch"]))
    assert m["best_ema"] == {"epoch": best_ema["epoch"], "val_acc": best_ema["ema_val_acc"]}
    be = weights(tmp_path / "full" / "best_ema.pt")
    last = weights(tmp_path / "full" / "last.pt")
    assert be["ema_weights"] is True and "ema" not in be and "optimizer" not in be
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"]
               if last["model"][k].is_floating_point())
    from finetune import api

    ev = api.evaluate_checkpoint(tmp_path / "full" / "best_ema.pt", device="cpu")
    assert ev["accuracy"] == best_ema["ema_val_acc"]
    with pytest.raises(Interrupted):  # Ctrl-C at the start of epoch 2: resume from epoch 1's last.pt
        train(recipe(mini_sample, **over), out=tmp_path / "part", reporter=StopAt(1, 0))
    train(None, resume=tmp_path / "part")
    a, b = weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert full.best_val_acc == json.loads((tmp_path / "part" / "metrics.json").read_text())["best"]["val_acc"]


@pytest.mark.slow
def test_mixup_cutmix_change_training_and_resume_exactly_mid_epoch(tmp_path, mini_sample):
    over = {"train.mixup": 0.4, "train.cutmix": 1.0, "train.epochs": 2, "train.save_every_steps": 1}
    plain = train(recipe(mini_sample, **{"train.epochs": 2}), out=tmp_path / "plain")
    full = train(recipe(mini_sample, **over), out=tmp_path / "full")
    assert [e["train_loss"] for e in full.epochs] != [e["train_loss"] for e in plain.epochs]
    with pytest.raises(Interrupted):
        train(recipe(mini_sample, **over), out=tmp_path / "cut", reporter=StopAt(1, 2))
    assert weights(tmp_path / "cut" / "last.pt")["partial"]["np_rng"]["key"].dtype == torch.int64
    train(None, resume=tmp_path / "cut")
    a, b = weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [e["train_loss"] for e in a["metrics"]] == [e["train_loss"] for e in b["metrics"]]


@pytest.mark.slow
def test_log_every_writes_per_update_scalars(tmp_path, mini_sample):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = recipe(mini_sample, **{"train.tensorboard": True, "train.graph": False, "train.log_every": 2,
                               "train.epochs": 2})
    train(r, out=tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("step/loss")]
    per_epoch = len(acc.Scalars("loss/train"))
    assert per_epoch == 2 and steps == list(range(2, steps[-1] + 1, 2)) and len(steps) >= 2
    assert [e.step for e in acc.Scalars("step/lr_group/all")] == steps


def test_an_exact_accuracy_tie_at_a_lower_val_loss_becomes_the_best():
    """best.pt moves to a later epoch that gets the same images right more surely; a tie at a higher loss, a lower
    accuracy at a lower loss, and --monitor val_loss keep their old rules."""
    from types import SimpleNamespace

    from finetune.run.runner import RunState

    def judge(rows, key="val_acc"):
        st = SimpleNamespace(history=[], best={"epoch": None, "val_acc": None}, since_best=0, monitor=Monitor(key),
                             best_ema=None, ema=None, top_k=[], cfg=config.Recipe())
        st._tie_with_lower_loss = lambda row, value: RunState._tie_with_lower_loss(st, row, value)
        for e, (acc, loss) in enumerate(rows, 1):
            RunState.record(st, {"epoch": e, "val_acc": acc, "val_loss": loss})
        return st.best["epoch"]

    assert judge([(0.9, 1.2), (0.9, 0.8), (0.9, 0.9), (0.85, 0.5)]) == 2
    assert judge([(0.9, 0.8), (0.9, 1.2)]) == 1
    assert judge([(0.9, 1.2), (0.9, float("nan"))]) == 1
    assert judge([(0.9, 1.2), (0.9, 0.8), (0.95, 2.0)]) == 3
    assert judge([(0.9, 1.2), (0.8, 0.8)], key="val_loss") == 2
