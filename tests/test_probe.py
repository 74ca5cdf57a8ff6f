"""finetune probe: the batched sweep equals heads trained one at a time and train --recipe linear-probe; k-NN;
the best head as a run directory that eval/resume/--weights use; several backbones in one table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from finetune import config
from finetune.tools import probe as P
from finetune.run.runner import train
from helpers import tiny_tree

KW = dict(weights="none", image_size=32, epochs=3, precision="fp32", device="cpu", seed=0)


@pytest.fixture
def data(tmp_path):
    return tiny_tree(tmp_path / "data", per_class=16)


def test_one_config_probe_equals_train_linear_probe(data, tmp_path):
    """Same features (train reads the ones probe stored), same seed -> the same head and the same val accuracies."""
    r = P.probe(["smallcnn"], data=str(data), lrs=[3e-2], wds=[1e-2], out=tmp_path / "probe", **KW)[0]
    cfg = config.apply_overrides(P.probe_recipe("smallcnn", data=str(data), **KW),
                                 {"optimizer.lr": 3e-2, "optimizer.weight_decay": 1e-2, "train.tensorboard": False})

    class Notes:
        notes: list[str] = []

        def __getattr__(self, name):
            return lambda *a, **k: None

        def note(self, m):
            self.notes.append(m)

    rep = Notes()
    res = train(cfg, out=tmp_path / "train", reporter=rep)
    assert any("read from the feature cache" in n for n in rep.notes), rep.notes
    assert [e["val_acc"] for e in res.epochs] == r.heads[0].val_accs
    assert res.epochs[-1]["train_loss"] == pytest.approx(r.heads[0].train_loss, rel=1e-5)
    a = torch.load(tmp_path / "probe" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "train" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert {**a["recipe"], "train": {**a["recipe"]["train"], "tensorboard": False}} == b["recipe"]
    for k in a["model"]:
        if k.startswith("seq.8."):  # the head: AdamW's per-head arithmetic equals torch's to float rounding
            assert torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-6), k
            assert a["model"][k].abs().max() > 1e-3
        else:
            assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # probe builds no AdamW: same groups
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys() == {0, 1}
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert float(sa["step"]) == float(sb["step"]) == 3 * 2  # 3 epochs x 2 batches of 32 (38 train images)
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-4, atol=1e-10)


def test_adamw_state_dict_equals_torchs_own():
    """The probe writes AdamW's state without building one (that imports torch._dynamo): on the installed torch, the
    dict equals ``torch.optim.AdamW(groups, fused=True).state_dict()`` (decay and no-decay groups, names, state),
    and a real AdamW loads it and steps."""
    from finetune.training import optim as O

    lin = nn.Linear(4, 3)
    groups = [{"params": [lin.weight], "lr": 0.02, "base_lr": 0.1, "weight_decay": 0.05, "name": "all",
               "param_names": ["weight"]},
              {"params": [lin.bias], "lr": 0.02, "base_lr": 0.1, "weight_decay": 0.0, "name": "all (no_decay)",
               "param_names": ["bias"]}]
    state = {i: {"step": torch.tensor(6.0), "exp_avg": torch.full_like(p, 0.5 + i),
                 "exp_avg_sq": torch.full_like(p, 0.25)} for i, p in enumerate([lin.weight, lin.bias])}
    real = torch.optim.AdamW([dict(g) for g in groups], lr=1e-3, fused=True)
    for i, p in enumerate([lin.weight, lin.bias]):
        real.state[p] = {k: v.clone() for k, v in state[i].items()}
    want, got = real.state_dict(), O.adamw_state_dict(groups, state)
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys() == {0, 1}
    for i in (0, 1):
        assert got["state"][i].keys() == want["state"][i].keys()
        assert all(torch.equal(got["state"][i][k], want["state"][i][k]) for k in got["state"][i])
    fresh = torch.optim.AdamW([dict(g) for g in groups], lr=1e-3, fused=True)
    fresh.load_state_dict(got)
    lin(torch.ones(2, 4)).sum().backward()
    fresh.step()
    assert float(fresh.state[lin.bias]["step"]) == 7.0


def test_sweep_heads_equal_heads_trained_one_at_a_time(data):
    prep = P.prepare(P.probe_recipe("smallcnn", data=str(data), **KW))
    lrs, wds = [1e-3, 1e-2, 1e-1], [0.0, 1e-2]
    grid = [(lr, wd) for wd in wds for lr in lrs]
    sched = config.SchedulerCfg(name="cosine")
    kw = dict(epochs=3, batch_size=8, seed=0, scheduler=sched)
    heads, st = P.sweep(prep.train, prep.val, 3, [g[0] for g in grid], [g[1] for g in grid], **kw)
    for h, (lr, wd) in enumerate(grid):
        one, st1 = P.sweep(prep.train, prep.val, 3, [lr], [wd], **kw)
        assert one[0].val_accs == heads[h].val_accs and one[0].val_loss == pytest.approx(heads[h].val_loss, rel=1e-5)
        assert torch.allclose(st1.weight[0], st.weight[h], rtol=0, atol=1e-6)
        assert torch.allclose(st1.bias[0], st.bias[h], rtol=0, atol=1e-6)
    assert len({st.weight[h].numpy().tobytes() for h in range(len(grid))}) == len(grid)  # all heads differ


def test_sweep_head_equals_torch_adamw_on_a_linear(data):
    """One head of the sweep against nn.Linear + torch.optim.AdamW (decay on the weight only) + the same schedule."""
    from finetune.data.loader import EpochSampler
    from finetune.training.engine import lr_factor

    x = torch.randn(50, 7)
    y = torch.arange(50) % 3
    sched = config.SchedulerCfg(name="cosine")
    heads, st = P.sweep((x, y), (x, y), 3, [0.05], [0.1], epochs=2, batch_size=16, seed=3, scheduler=sched)
    lin = nn.Linear(7, 3)
    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
    opt = torch.optim.AdamW([{"params": [lin.weight], "weight_decay": 0.1},
                             {"params": [lin.bias], "weight_decay": 0.0}], lr=0.05)
    s = EpochSampler(50, shuffle=True, seed=3)
    for epoch in range(2):
        s.set_epoch(epoch)
        order = list(iter(s))
        for k in range(4):
            for g in opt.param_groups:
                g["lr"] = 0.05 * lr_factor(sched, epoch + k / 4, 2, base_lr=0.05, dt=0.25)
            idx = order[k * 16:(k + 1) * 16]
            opt.zero_grad()
            nn.functional.cross_entropy(lin(x[idx]), y[idx]).backward()
            opt.step()
    assert torch.allclose(st.weight[0], lin.weight.detach(), rtol=0, atol=1e-6)
    assert torch.allclose(st.bias[0], lin.bias.detach(), rtol=0, atol=1e-6)


def test_knn_votes_by_cosine_similarity():
    train = (torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]]), torch.tensor([0, 0, 1, 1]))
    val = (torch.tensor([[5.0, 0.2], [0.2, 5.0], [1.0, 0.9]]), torch.tensor([0, 1, 1]))
    # the third query (1, 0.9): its nearest by cosine is (2, 0.1) (0.77), then (1, 0) (0.74), both class 0, so
    # k=1 and the exp(sim / 0.07)-weighted vote of all 4 say 0 (wrong); the other two queries are right
    assert P.knn_accuracy(train, val, 2, [1, 4]) == {1: 2 / 3, 4: 2 / 3}
    assert P.knn_accuracy(train, val, 2, []) == {}
    # blocks of train features (the running top-k for features larger than RAM) give the same votes
    g = torch.Generator().manual_seed(0)
    big = (torch.randn(300, 8, generator=g), torch.randint(0, 5, (300,), generator=g))
    q = (torch.randn(70, 8, generator=g), torch.randint(0, 5, (70,), generator=g))
    whole = P.knn_accuracy(big, q, 5, [1, 7, 20])
    assert P.knn_accuracy(big, q, 5, [1, 7, 20], chunk=16, train_chunk=13) == whole and len(set(whole.values())) > 1


def test_probe_cli_json_run_dir_eval_and_resume(data, tmp_path, cli):
    out = tmp_path / "p"
    r = cli("probe", "--model", "smallcnn", "--weights", "none", "--data", data, "--image-size", 32, "--epochs", 2,
            "--precision", "fp32", "--device", "cpu", "--lrs", "1e-3,1e-1", "--wds", "0", "--knn", "3", "--out", out,
            "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc) == 1 and [(h["lr"], h["weight_decay"]) for h in doc[0]["heads"]] == [(1e-3, 0.0), (0.1, 0.0)]
    assert list(doc[0]["knn"]) == ["3"] and doc[0]["run_dir"] == str(out)
    best = doc[0]["heads"][doc[0]["best"]]
    assert best["val_acc"] == max(h["val_acc"] for h in doc[0]["heads"])
    ev = json.loads(cli("eval", out / "best.pt", "--json", "--device", "cpu").stdout)
    assert ev["accuracy"] == best["val_acc"]  # the checkpoint reproduces the table's number
    assert json.loads((out / "metrics.json").read_text())["best"] == {"epoch": 2, "val_acc": best["val_acc"]}
    r = cli("train", "--resume", out, "--epochs", 3, "--quiet")  # a linear probe that continues from the head
    assert r.exit_code == 0, r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3
    r = cli("train", "--model", "smallcnn", "--weights", out / "best.pt", "--data", data, "--image-size", 32,
            "--epochs", 1, "--precision", "fp32", "--device", "cpu", "--out", tmp_path / "ft", "--quiet",
            "--no-tensorboard")
    assert r.exit_code == 0, r.stderr  # a fine-tune starts from the probed head (kept: same classes)
    ck = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert ck["recipe"]["name"] == "lp-ft"


def test_probe_several_backbones_one_table(data, tmp_path, cli):
    out = tmp_path / "cmp"
    args = ["probe", "--model", "smallcnn,timm:test_resnet", "--weights", "none", "--data", data, "--image-size", 32,
            "--epochs", 1, "--precision", "fp32", "--device", "cpu", "--lrs", "1e-2", "--wds", "0", "--out", out]
    r = cli(*args, "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "backbones on this data (best head each)" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["smallcnn", "timm-test_resnet"]
    for sub in ("smallcnn", "timm-test_resnet"):
        assert (out / sub / "best.pt").is_file() and (out / sub / "probe.json").is_file()
    r2 = cli(*args[:-1], tmp_path / "cmp2", "--json", "--quiet")  # again: both backbones' features from the cache
    assert [d["from_store"] for d in json.loads(r2.stdout)] == [True, True]


def test_lp_ft_head_phase_reads_the_features_a_probe_stored(data, tmp_path):
    """LP-FT's linear-probe epoch uses the eval transform, so it shares the probe's stored features."""
    P.probe(["smallcnn"], data=str(data), lrs=[1e-2], wds=[0.0], write=False, **KW)
    cfg = config.apply_overrides(config.load_recipe("lp-ft"), {
        "model.name": "smallcnn", "model.weights": "none", "data.path": str(data), "data.image_size": 32,
        "train.epochs": 2, "train.precision": "fp32", "train.device": "cpu", "train.tensorboard": False})
    notes = []

    class Rep:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def note(self, m):
            notes.append(m)

    train(cfg, out=tmp_path / "lpft", reporter=Rep())
    assert [n.split(": the input of")[0] for n in notes if n.startswith("frozen-feature cache")] == \
        ["frozen-feature cache"]
    assert "read from the feature cache" in next(n for n in notes if n.startswith("frozen-feature cache"))


def test_the_probe_run_records_a_full_val_evaluation_for_report_and_predict(data, tmp_path):
    """best.pt's val record is a run's (confusion, per-class, n, samples): `finetune report` of a probe run showed
    'accuracy 0.00% on 0 images', and `predict --min-confidence auto` had no calibration to read."""
    import json

    from finetune.api import confidence_floor, write_report

    r = P.probe(["smallcnn"], data=str(data), lrs=[3e-2], wds=[1e-2], out=tmp_path / "p", **KW)[0]
    ck = torch.load(tmp_path / "p" / "best.pt", weights_only=True)
    val = ck["val"]
    assert val["n"] == r.val_images == sum(map(sum, val["confusion"]))
    assert val["accuracy"] == r.heads[0].val_acc == val["correct"] / val["n"]
    assert len(val["samples"]["conf"]) == r.val_images and 0 < confidence_floor(ck) <= 1
    write_report(tmp_path / "p")
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["n_val"] == r.val_images and rep["eval"]["confusion"] == val["confusion"]
    assert sum(c["support"] for c in rep["eval"]["per_class"]) == r.val_images


def _two_weights_files(tmp_path):
    """Two smallcnn weights files with different values (a .pt state_dict and a .safetensors file)."""
    from safetensors.torch import save_file

    from finetune.models import build_model

    torch.manual_seed(1)
    a = tmp_path / "a.pt"
    torch.save(build_model("smallcnn", weights="none").model.state_dict(), a)
    torch.manual_seed(2)
    b = tmp_path / "b.safetensors"
    save_file(build_model("smallcnn", weights="none").model.state_dict(), b)
    return a, b


def test_probe_each_model_with_its_own_weights(data, tmp_path):
    """Issue #31: ``models`` as (name, weights) pairs: each result carries its own weights and equals a probe of
    that model alone with those weights; one model with two files gets two run directories."""
    a, b = _two_weights_files(tmp_path)
    kw = {k: v for k, v in KW.items() if k != "weights"}
    res = P.probe([("smallcnn", str(a)), ("smallcnn", str(b))], data=str(data), lrs=[3e-2], wds=[1e-2],
                  out=tmp_path / "two", **kw)
    assert [r.weights for r in res] == [str(a), str(b)]
    assert [r.run_dir for r in res] == [tmp_path / "two" / "smallcnn-a", tmp_path / "two" / "smallcnn-b"]
    for r, w in zip(res, (a, b)):
        alone = P.probe(["smallcnn"], weights=str(w), data=str(data), lrs=[3e-2], wds=[1e-2], write=False, **kw)[0]
        assert (alone.weights, alone.from_store, alone.heads) == (r.weights, True, r.heads)
        assert json.loads((r.run_dir / "probe.json").read_text())["weights"] == str(w)
    fa, fb = (P.prepare(P.probe_recipe("smallcnn", weights=str(w), data=str(data), **kw)).train[0] for w in (a, b))
    assert fa.shape == fb.shape and not torch.allclose(fa, fb)  # different weights, different features
    assert res[0].heads[0].train_loss != res[1].heads[0].train_loss


def test_probe_cli_per_model_weights_json_and_table(data, tmp_path, cli, monkeypatch):
    from finetune.cli import render

    monkeypatch.setattr(render.console, "_width", 300)  # the tables' lines unwrapped
    a, b = _two_weights_files(tmp_path)
    args = ["probe", "--model", f"smallcnn={a}, smallcnn={b},smallcnn", "--weights", "none", "--data", data,
            "--image-size", 32, "--epochs", 1, "--precision", "fp32", "--device", "cpu", "--lrs", "1e-2", "--wds", "0",
            "--knn", "0"]
    r = cli(*args, "--out", tmp_path / "j", "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [(d["model"], d["weights"]) for d in doc] == [("smallcnn", str(a)), ("smallcnn", str(b)),
                                                        ("smallcnn", "none")]
    assert [d["run_dir"] for d in doc] == [str(tmp_path / "j" / s) for s in ("smallcnn-a", "smallcnn-b",
                                                                             "smallcnn-none")]
    assert len({d["heads"][0]["train_loss"] for d in doc}) == 3
    r = cli(*args, "--out", tmp_path / "t", "--quiet")  # the comparison table gains a weights column
    assert r.exit_code == 0, r.stderr
    table = r.stdout[r.stdout.index("backbones on this data"):].splitlines()
    assert [c.strip() for c in table[2].split("┃")[1:4]] == ["model", "weights", "val acc (95%)"]
    assert sorted(x.split("│")[2].strip() for x in table[4:7]) == ["a.pt", "b.safetensors", "none"]  # file names
    r = cli(*args[:2], "smallcnn,timm:test_resnet", *args[3:], "--out", tmp_path / "u", "--quiet")
    assert r.exit_code == 0, r.stderr  # one weights value for all: no weights column
    table = r.stdout[r.stdout.index("backbones on this data"):].splitlines()
    assert [c.strip() for c in table[2].split("┃")[1:3]] == ["model", "val acc (95%)"]
