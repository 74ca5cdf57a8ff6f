import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune.config import SchedulerCfg
from finetune.training.events import Callback
from finetune.training.engine import (Step, evaluate, lr_factor, resolve_device, resolve_precision, set_lr,
                                      train_one_epoch)
from finetune.errors import ConfigError


class Fixed(nn.Module):
    """Returns preset logits per sample index (carried in x)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits[x[:, 0].long()] + self.p * 0


def test_evaluate_hand_checked():
    # 5 samples, 3 classes; predictions (argmax): 0, 1, 2, 2, 0 ; targets: 0, 1, 1, 2, 2
    logits = torch.tensor([[3., 1, 0], [0, 2, 1], [0, 1, 5], [1, 0, 2], [2, 1, 1.5]])
    y = torch.tensor([0, 1, 1, 2, 2])
    ds = TensorDataset(torch.arange(5).float()[:, None], y)
    model = Fixed(logits)
    model.train()
    res = evaluate(model, DataLoader(ds, batch_size=2), 3)
    assert res["correct"] == 3 and res["n"] == 5 and res["accuracy"] == 3 / 5
    assert res["confusion"] == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert res["per_class"] == [1.0, 0.5, 0.5]
    assert res["top5"] is None
    assert math.isclose(res["loss"], nn.functional.cross_entropy(logits, y).item(), rel_tol=1e-6)
    assert model.training  # mode restored


def test_evaluate_runs_in_eval_mode_and_inference_mode():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 5)

        def forward(self, x):
            seen["training"] = self.training
            seen["inference"] = torch.is_inference_mode_enabled()
            return self.lin(x)

    ds = TensorDataset(torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 4, 0]))
    res = evaluate(Probe(), DataLoader(ds, batch_size=3), 5)
    assert seen == {"training": False, "inference": True}
    assert 0 <= res["top5"] <= 1 and res["top5"] >= res["accuracy"]


def test_train_one_epoch_updates_only_trainable_and_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    head = model[2].weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ds = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    out = train_one_epoch(model, DataLoader(ds, batch_size=4), Step(opt, nn.CrossEntropyLoss(), torch.device("cpu")), 0)
    assert out["n"] == 10 and 0 <= out["acc"] <= 1
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, head)


def test_gradient_accumulation_equals_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    for model, bs, acc in ((a, 8, 1), (b, 4, 2)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train_one_epoch(model, DataLoader(TensorDataset(x, y), batch_size=bs),
                        Step(opt, nn.CrossEntropyLoss(), torch.device("cpu"), accumulate=acc), 0)
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


@pytest.mark.parametrize("name", ["constant", "step", "cosine", "onecycle"])
def test_schedules(name):
    cfg = SchedulerCfg(name=name, step_size=2, gamma=0.5)
    f = [lr_factor(cfg, t, 10) for t in range(11)]
    if name == "constant":
        assert f == [1.0] * 11
    elif name == "step":
        assert f[:5] == [1.0, 1.0, 0.5, 0.5, 0.25]
    elif name == "cosine":
        assert f[0] == 1.0 and math.isclose(f[5], 0.5) and math.isclose(f[10], 0.0, abs_tol=1e-12)
    else:
        assert f[0] == 1e-3 and math.isclose(f[3], 1.0) and f[10] < 1e-3  # 30% warmup, then down
        assert lr_factor(cfg, 0, 10, dt=0.5) == 0.5 / 3  # warm-up update k: (k + 1) / W


def _applied_lrs(opt):
    """Wrap ``opt.step`` to record each update's LR per group, as applied."""
    seen, step = [], opt.step

    def recording(*a, **k):
        seen.append([g["lr"] for g in opt.param_groups])
        return step(*a, **k)

    opt.step = recording
    return seen


def test_lr_sequence_per_update_warmup_cosine_accumulation():
    """3 epochs x 4 batches, accumulation 2 -> 2 updates per epoch, K = 6; warm-up 1 epoch (W = 2 updates) then
    cosine over epochs 1..3. Update k trains at position k / 2 (epochs): warm-up (k + 1) / W, then the cosine."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = SchedulerCfg(name="cosine", warmup_epochs=1)
    seen = _applied_lrs(opt)
    step = Step(opt, nn.CrossEntropyLoss(), torch.device("cpu"), accumulate=2,
                schedule=lambda t, dt: set_lr(opt, cfg, t, 3, dt))
    rows = [train_one_epoch(model, DataLoader(TensorDataset(x, y), batch_size=4), step, e) for e in range(3)]
    c = math.cos(math.pi / 4)
    expected = [0.05, 0.1, 0.1, 0.05 * (1 + c), 0.05, 0.05 * (1 - c)]
    assert len(seen) == 6
    assert all(math.isclose(a[0], b, rel_tol=1e-12) for a, b in zip(seen, expected)), seen
    assert [r["lr"] for r in rows] == [seen[0][0], seen[2][0], seen[4][0]]  # the epoch's first update, as applied
    assert seen[-1][0] > 0


def test_one_batch_one_epoch_cosine_run_trains():
    """A 1-epoch run of one batch: its only update uses the base LR (it used the end-of-run LR, 0, before)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = SchedulerCfg(name="cosine")
    out = train_one_epoch(model, DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))),
                                            batch_size=32),
                          Step(opt, nn.CrossEntropyLoss(), torch.device("cpu"),
                               schedule=lambda t, dt: set_lr(opt, cfg, t, 1, dt)), 0)
    assert out["lr"] == 0.1 and out["lrs"] == {"0": 0.1}
    assert not torch.equal(model.weight, before)


def test_warmup_and_groups_follow_base_lr():
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1, "base_lr": 0.1},
                           {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.01, "base_lr": 0.01}])
    cfg = SchedulerCfg(name="cosine", warmup_epochs=2)
    assert math.isclose(set_lr(opt, cfg, 1.0, 10), 0.05)
    assert math.isclose(opt.param_groups[1]["lr"], 0.005)


def test_device_and_precision_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device cuda was requested but CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match=r"^--precision fp16 needs a GPU; on the CPU use bf16 or fp32$"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    from finetune.training import engine

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", torch.device("cpu")) == expected


def test_the_step_reads_nothing_back_from_the_device_and_the_epoch_sums_are_those_of_per_step_items(monkeypatch):
    """The running loss/accuracy sums stay on the device (on CUDA every .item() waits for the GPU): over 16 batches,
    values are read back only at the first and last batch and at the epoch end (3 x 2 reads), not 2-3 per step; the
    epoch's loss is bitwise the per-step ``loss.item() * n`` Python sum the loop used to compute."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr("finetune.training.engine.PROGRESS_EVERY", 1e9)  # not a slow machine's extra refreshes
    reads = []
    for name in ("item", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _o=orig, _n=name: (_read_by_engine(reads, _n),
                                                                                 _o(self))[1])

    class Bar(Callback):  # a progress bar: the running values are what it reads
        def on_train_batch_end(self, i, batches, loss, acc, images_per_sec):
            pass

    out = train_one_epoch(model, DataLoader(TensorDataset(x, y), batch_size=4),
                          Step(opt, nn.CrossEntropyLoss(), torch.device("cpu")), 0, callbacks=[Bar()])
    assert len(reads) == 6, reads  # (the DataLoader's own seed .item() is not the loop's)
    reads.clear()  # with no listener of the batches, only the epoch end reads
    other = nn.Sequential(nn.Linear(4, 3))
    train_one_epoch(other, DataLoader(TensorDataset(x, y), batch_size=4),
                    Step(torch.optim.SGD(other.parameters(), lr=0.1), nn.CrossEntropyLoss(), torch.device("cpu")), 0)
    monkeypatch.undo()
    assert len(reads) == 2, reads
    torch.manual_seed(0)
    model2 = nn.Sequential(nn.Linear(4, 3))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    loss_sum = 0.0
    for xb, yb in DataLoader(TensorDataset(x, y), batch_size=4):
        loss = nn.CrossEntropyLoss()(model2(xb).float(), yb)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        loss_sum = loss_sum + loss.item() * yb.numel()
    assert out["loss"] == loss_sum / 64 and out["n"] == 64


def _read_by_engine(reads: list, name: str) -> None:
    import traceback

    frames = traceback.extract_stack()[:-2]
    if frames and frames[-1].filename.replace("\\", "/").endswith("finetune/training/engine.py"):
        reads.append((name, frames[-1].lineno))


def test_the_running_loss_and_accuracy_shown_are_means_over_the_same_images(monkeypatch):
    """Between two device reads the bar repeats the latest read: loss and accuracy are both the means over the images
    of that read (they were the read's sums over the current image count: both shrunk, "loss 0.0467 acc 32.3%")."""
    monkeypatch.setattr("finetune.training.engine.PROGRESS_EVERY", 1e9)  # read at the first and the last batch only
    logits = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [4.0, 0, 0],
                           [0, 4.0, 0], [4.0, 0, 0], [0, 0, 4.0], [0, 4.0, 0]])
    y = torch.tensor([0, 0, 2, 0, 1, 2, 2, 1])  # batches of 2: correct 1, 2, 1, 2
    model = Fixed(logits)
    shown = []

    class Bar(Callback):
        def on_train_batch_end(self, i, batches, loss, acc, images_per_sec):
            shown.append((loss, acc))

    x = torch.arange(8.0)[:, None]
    out = train_one_epoch(model, DataLoader(TensorDataset(x, y), batch_size=2),
                          Step(torch.optim.SGD(model.parameters(), lr=0.0), nn.CrossEntropyLoss(),
                               torch.device("cpu")), 0, callbacks=[Bar()])
    first = (nn.functional.cross_entropy(logits[:2], y[:2]).item(), 0.5)
    assert shown[:3] == [first] * 3
    assert shown[3] == (out["loss"], out["acc"]) and out["acc"] == 6 / 8
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item())
