"""The run report: the numbers that feed its pictures (against hand-computed values), the report of one tiny run
(shared by the tests here), eval --report, and the page in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import finetune
from finetune.reporting import report as R
from finetune.training import metrics as M

from browser import chromium, open_page, required
from helpers import tiny_tree

pytestmark = pytest.mark.report

# ------------------------------------------------------------------------------------------------ the numbers

T = [0, 0, 0, 1, 1, 2, 2, 2, 2]
P = [0, 1, 0, 1, 2, 2, 0, 2, 1]
C = [0.9, 0.8, 0.4, 0.6, 0.95, 0.7, 0.8, 0.5, 0.3]


def test_confusion_counts_and_row_normalised():
    m = M.confusion_counts(T, P, 3)
    assert m == [[2, 1, 0], [0, 1, 1], [1, 1, 2]]
    assert R.row_normalised(m) == [[2 / 3, 1 / 3, 0.0], [0.0, 0.5, 0.5], [0.25, 0.25, 0.5]]
    assert R.row_normalised([[0, 0], [1, 1]]) == [[0.0, 0.0], [0.5, 0.5]]  # a class without images


def test_per_class_precision_recall_f1_support():
    m = [[2, 1, 0], [0, 1, 1], [1, 1, 2]]
    got = M.per_class_metrics(m)
    # class 0: tp 2, predicted 3 (2+0+1), support 3 -> p 2/3, r 2/3; class 1: tp 1, predicted 3, support 2;
    # class 2: tp 2, predicted 3, support 4
    want = [(2 / 3, 2 / 3, 3), (1 / 3, 1 / 2, 2), (2 / 3, 1 / 2, 4)]
    for g, (p, r, s) in zip(got, want):
        assert g["precision"] == pytest.approx(p) and g["recall"] == pytest.approx(r) and g["support"] == s
        assert g["f1"] == pytest.approx(2 * p * r / (p + r))
    # never predicted and no images: zeros, not a division error (scikit-learn's zero_division=0)
    assert M.per_class_metrics([[1, 0], [1, 0]])[1] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_top_wrong_and_most_uncertain_correct():
    # wrong: 1 (0.8), 4 (0.95), 6 (0.8), 8 (0.3) -> by confidence, ties by index
    assert R.top_wrong(T, P, C, 10) == [4, 1, 6, 8]
    assert R.top_wrong(T, P, C, 2) == [4, 1]
    # correct: 0 (0.9), 2 (0.4), 3 (0.6), 5 (0.7), 7 (0.5) -> least confident first
    assert R.most_uncertain_correct(T, P, C, 3) == [2, 7, 3]
    assert R.top_wrong([0, 1], [0, 1], [0.5, 0.5], 5) == []


def test_confused_pairs_and_freeze_rows():
    m = [[5, 3, 0], [0, 4, 3], [1, 0, 2]]
    assert R.confused_pairs(m, ["a", "b", "c"], k=2) == [("a", "b", 3), ("b", "c", 3)]
    numel = {"stem.w": 10, "stem.b": 2, "blocks.0.w": 100, "blocks.1.w": 50, "head.w": 7}
    rows = R.freeze_rows(numel, frozen_at_start=["stem.w", "stem.b", "blocks.0.w", "blocks.1.w"],
                         trainable_at_end=["blocks.1.w", "head.w"])
    assert rows == [{"module": "stem", "trainable": 0, "unfrozen": 0, "frozen": 12},
                    {"module": "blocks", "trainable": 0, "unfrozen": 50, "frozen": 100},
                    {"module": "head", "trainable": 7, "unfrozen": 0, "frozen": 0}]


def test_evaluate_returns_each_images_prediction():
    from torch.utils.data import DataLoader, TensorDataset

    from finetune.training.engine import evaluate

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    ds = TensorDataset(torch.arange(4).float()[:, None], torch.tensor([0, 1, 1, 2]))

    class Lookup(torch.nn.Module):
        def forward(self, x):
            return logits[x[:, 0].long()]

    s = evaluate(Lookup(), DataLoader(ds, batch_size=3), 3)["samples"]
    prob = logits.softmax(dim=1)
    assert s["target"].tolist() == [0, 1, 1, 2] and s["pred"].tolist() == [0, 2, 0, 2]  # argmax; a tie -> first
    assert torch.equal(s["conf"], prob.max(dim=1).values)
    assert torch.equal(s["p_true"], prob[torch.arange(4), torch.tensor([0, 1, 1, 2])])


# ------------------------------------------------------------------------------------------------ one tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch smallcnn run on generated 4-class data (report written at the end, as `finetune train` does)."""
    root = tmp_path_factory.mktemp("report")
    data = tiny_tree(root / "data", classes=("ant", "bee", "cat", "dog"), per_class=15, size=32)
    r = finetune.load_recipe("default")
    r.data.path, r.train.epochs, r.train.graph, r.train.seed = str(data), 2, False, 0
    res = finetune.train(r, out=root / "run")
    return res.run_dir


def test_train_writes_report_from_the_best_epochs_predictions(run):
    html = (run / "report.html").read_text()
    numbers = json.loads((run / "report.json").read_text())
    best = torch.load(run / "best.pt", weights_only=True)
    ev = numbers["eval"]
    assert ev["confusion"] == best["val"]["confusion"]
    assert numbers["data"]["val"] == [3, 3, 3, 3] and numbers["data"]["train"] == [12, 12, 12, 12]
    assert numbers["data"]["recorded"] is True and numbers["data"]["skipped"] == []
    s = best["val"]["samples"]
    t, p, c = s["target"].tolist(), s["pred"].tolist(), s["conf"].tolist()
    assert [w["index"] for w in ev["wrong"]] == R.top_wrong(t, p, c, R.N_WRONG)
    assert ev["n_wrong_total"] == sum(a != b for a, b in zip(t, p))
    assert [w["index"] for w in ev["unsure"]] == R.most_uncertain_correct(t, p, c, R.N_UNSURE)
    assert all(w["true"] != w["pred"] for w in ev["wrong"]) and all(w["true"] == w["pred"] for w in ev["unsure"])
    # self-contained: every src is inline, nothing external, no script
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 3 + len(ev["wrong"]) + len(ev["unsure"]) and all(u.startswith("data:image/") for u in srcs)
    assert "<script" not in html and "http://" not in html and "https://" not in html
    for fig in ("fig-curves", "fig-confusion", "fig-freeze"):
        assert f'id="{fig}"' in html
    assert [r["epoch"] for r in numbers["epochs"]] == [1, 2]


def test_report_command_matches_the_end_of_run_report_and_an_older_checkpoint(run, cli, tmp_path):
    before = json.loads((run / "report.json").read_text())["eval"]
    r = cli("report", run, "--out", tmp_path / "again.html")
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "again.html")
    again = json.loads((run / "report.json").read_text())["eval"]
    assert again["wrong"] == before["wrong"] and again["confusion"] == before["confusion"]
    # a checkpoint without per-image predictions (older finetune, a probe): the report runs one val pass and
    # finds the same images
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.yaml", "metrics.json", ".finetune-run"):
        (old / name).write_bytes((run / name).read_bytes())
    ck = torch.load(run / "best.pt", weights_only=True)
    ck["val"] = {k: v for k, v in ck["val"].items() if k != "samples"}
    torch.save(ck, old / "best.pt")
    assert finetune.write_report(old) == old / "report.html"
    redone = json.loads((old / "report.json").read_text())["eval"]
    assert redone["confusion"] == before["confusion"]
    assert [(w["index"], w["pred"]) for w in redone["wrong"]] == [(w["index"], w["pred"]) for w in before["wrong"]]
    assert json.loads((old / "report.json").read_text())["data"]["recorded"] is False  # skipped files unknown


def test_eval_report_for_any_checkpoint_and_data(run, cli, tmp_path):
    out = tmp_path / "eval.html"
    r = cli("eval", run / "best.pt", "--report", out, "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    html = out.read_text()
    assert 'id="fig-confusion"' in html and 'id="fig-curves"' not in html
    assert f"accuracy {100 * res['accuracy']:.2f}%" in html
    r2 = cli("eval", run / "best.pt", "--report", out)  # over an earlier report: fine
    assert r2.exit_code == 0 and f"report: {out}" in r2.stdout


@pytest.mark.parametrize("name, setup, message", [
    ("best.pt", None, "report file '{p}' must end in .html (it is one HTML page); e.g. --report best.html"),
    ("notes.html", "<p>mine</p>", "'{p}' exists and is not a finetune report; pick another file name (reports "
                                  "are only written over earlier reports)"),
    ("missing/r.html", None, "cannot write the report to '{p}': folder '{d}' does not exist; create it first"),
])
def test_eval_report_refuses_bad_paths_before_evaluating(run, cli, tmp_path, name, setup, message):
    p = tmp_path / name
    if setup is not None:
        p.write_text(setup)
    r = cli("eval", run / "best.pt", "--report", p)
    assert r.exit_code == 1 and r.stderr == "Error: " + message.format(p=p, d=p.parent) + "\n"
    assert r.stdout == ""
    assert (p.read_text() == setup) if setup else not p.exists()


def test_report_failure_is_a_warning_and_no_report_skips_it(tmp_path, monkeypatch, caplog):
    data = tiny_tree(tmp_path / "data", per_class=6, size=16)
    r = finetune.load_recipe("default")
    r.data.path, r.train.epochs, r.train.tensorboard = str(data), 1, False

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(R, "write_run_report", boom)
    with caplog.at_level("WARNING", logger="finetune"):
        res = finetune.train(r, out=tmp_path / "a")
    assert res.best_epoch == 1 and (tmp_path / "a" / "best.pt").is_file()
    assert ("the run report could not be written (RuntimeError: disk on fire); the run is complete; retry with "
            f"finetune report {tmp_path / 'a'}") in caplog.text
    r.train.report = False
    monkeypatch.setattr(R, "write_run_report", lambda *a, **k: pytest.fail("report written"))
    finetune.train(r, out=tmp_path / "b")
    assert not (tmp_path / "b" / "report.html").exists()


def test_report_leads_with_test_accuracy_and_says_what_the_run_says(run, tmp_path):
    """Issue #30 items 4 and 10: with best.pt's test accuracy in metrics.json, the header and the evaluation lead
    with it (± its Wilson interval), val beside it as the set that selected best.pt; a stale test entry (another
    epoch's) is not shown; the findings block is there either way."""
    import shutil

    from finetune.training.stats import pm_text

    d = tmp_path / "run"
    shutil.copytree(run, d)
    m = json.loads((d / "metrics.json").read_text())
    best = m["best"]
    m["test"] = {"checkpoint": "best.pt", "epoch": best["epoch"], "accuracy": 0.75, "balanced_accuracy": 0.75,
                 "macro_f1": 0.7, "top5": 1.0, "loss": 0.8, "n": 40}
    (d / "metrics.json").write_text(json.dumps(m))
    page = R.write_run_report(d).read_text()
    n_val = json.loads((d / "report.json").read_text())["n_val"]
    assert n_val == 12
    assert (f"test accuracy <b>75.00% {pm_text(0.75, 40)}</b> (40 held-out images) &middot; val "
            f"{100 * best['val_acc']:.2f}% {pm_text(best['val_acc'], 12)} (the set that selected best.pt)") in page
    assert f"<h2>Evaluation of best.pt (epoch {best['epoch']}) on the test set</h2>" in page
    assert page.index("on the test set</h2>") < page.index("on the val set (which selected it)</h2>")
    assert f"test accuracy 75.00% {pm_text(0.75, 40)} on 40 images" in page
    assert "<h2>What this run says</h2><ul id='findings'>" in page and "Test accuracy 75.0%" in page
    m["test"]["epoch"] = best["epoch"] + 1  # stale: describes another best.pt
    (d / "metrics.json").write_text(json.dumps(m))
    page = R.write_run_report(d).read_text()
    assert "test accuracy" not in page and f"best val accuracy <b>{100 * best['val_acc']:.2f}% " in page
    assert "<h2>What this run says</h2>" in page and "Next step:" in page


def test_report_of_a_folder_that_is_not_a_run(cli, tmp_path):
    r = cli("report", tmp_path)
    assert r.exit_code == 1 and r.stderr == (f"Error: '{tmp_path}' has no best.pt; finetune report takes a run "
                                             "directory written by finetune train (or finetune probe)\n")
    r = cli("report", tmp_path / "nope")
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: run directory '{tmp_path / 'nope'}' not found")


# ------------------------------------------------------------------------------------------------ in a browser


@pytest.fixture(scope="module")
def browser():
    if chromium() is None:
        if required():
            pytest.fail("chromium is not installed; CI must run the browser test (.ci/run installs it with apt)")
        pytest.skip("chromium not installed (apt-get install chromium); CI=true makes this a failure")
    pytest.importorskip("websockets") if not required() else __import__("websockets")
    return open_page


@pytest.mark.slow
@pytest.mark.subprocess
def test_report_in_chromium(run, browser, tmp_path):
    shot = tmp_path / "report.png"
    page = browser(run / "report.html", shot)
    assert page["errors"] == [] and page["console"] == []
    assert page["external"] == []
    n_thumbs = len(json.loads((run / "report.json").read_text())["eval"]["wrong"]) + len(
        json.loads((run / "report.json").read_text())["eval"]["unsure"])
    assert len(page["images"]) == 3 + n_thumbs
    assert [i for i in page["images"] if not (i["complete"] and i["w"] > 0 and i["h"] > 0)] == []
    assert {"fig-curves", "fig-confusion", "fig-freeze"} <= set(page["ids"])
    assert page["title"] == f"finetune report: {run.name}"
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[20:24], "big") > 1000  # full page: tall


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_browser_check_sees_errors_and_broken_images(browser, tmp_path):
    """The driver is not blind: a console error, a script error and an undecodable image are all reported."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img id="x" src="data:image/png;base64,AAAA"><script>console.error("oops");'
                   "undefined_fn();</script></body></html>")
    page = browser(bad, tmp_path / "bad.png")
    assert page["images"] == [{"id": "x", "alt": "", "complete": True, "w": 0, "h": 0}]
    assert [c["args"][0]["value"] for c in page["console"]] == ["oops"]
    assert any("undefined_fn" in json.dumps(e) for e in page["errors"])


def test_tensorboard_gets_the_confusion_matrix_and_the_wrong_images_at_each_evaluation(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("val/confusion_matrix")] == [1, 2]
    last = torch.load(run / "last.pt", weights_only=True)["val"]["samples"]  # epoch 2's predictions
    t, p, c = last["target"].tolist(), last["pred"].tolist(), last["conf"].tolist()
    want = R.top_wrong(t, p, c, R.TB_WRONG)
    assert want and [e.step for e in acc.Images("val/most_confidently_wrong")][-1] == 2
    img = acc.Images("val/most_confidently_wrong")[-1]
    assert img.width > 0 and img.height > 0
    text = acc.Tensors("val/most_confidently_wrong/text_summary")[-1].tensor_proto.string_val[0].decode()
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| #")]
    names = ["ant", "bee", "cat", "dog"]
    assert [tuple(x.strip() for x in r.split("|")[2:4]) for r in rows] == [(names[t[i]], names[p[i]]) for i in want]
    assert acc.Scalars("accuracy/val")[-1].value == pytest.approx(sum(a == b for a, b in zip(t, p)) / len(t))


# ------------------------------------------------------------------------------------------------ runs / compare


def _copy_run(src, dst, lr: float, best_acc: float):
    import yaml

    dst.mkdir(parents=True)
    for name in ("config.yaml", "metrics.json", ".finetune-run"):
        (dst / name).write_bytes((src / name).read_bytes())
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["optimizer"]["lr"] = lr
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    m = json.loads((dst / "metrics.json").read_text())
    m["best"]["val_acc"] = best_acc
    (dst / "metrics.json").write_text(json.dumps(m))


def test_runs_lists_run_directories(run, cli, tmp_path):
    root = tmp_path / "runs"
    _copy_run(run, root / "x", 0.02, 0.5)
    _copy_run(run, root / "group" / "y", 0.05, 0.75)  # nested one level (a multi-model probe)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    r = cli("runs", root, "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert sorted((Path(x["path"]).relative_to(root).as_posix(), x["model"], x["recipe"], x["best_val_acc"],
                   x["epochs"], x["epochs_planned"], x["report"]) for x in rows) == [
        ("group/y", "smallcnn", "default", 0.75, 2, 2, False), ("x", "smallcnn", "default", 0.5, 2, 2, False)]
    hist = json.loads((run / "metrics.json").read_text())["epochs"]
    assert rows[0]["train_seconds"] == pytest.approx(sum(e["seconds"] for e in hist))
    table = cli("runs", root)
    assert table.exit_code == 0 and "group/y" in table.stdout and "50.00%" in table.stdout
    r = cli("runs", tmp_path / "nope")
    assert r.exit_code == 1 and r.stderr == (f"Error: folder '{tmp_path / 'nope'}' not found; finetune runs takes "
                                             "the folder your runs are in (default runs/, where finetune train "
                                             "writes them)\n")


@pytest.mark.slow
@pytest.mark.subprocess
def test_compare_shows_differences_and_writes_html(run, cli, tmp_path, browser):
    _copy_run(run, tmp_path / "b", 0.05, 0.75)
    r = cli("compare", run, tmp_path / "b", "--json", "--html", tmp_path / "cmp.html")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["differences"] == {"optimizer.lr": [0.02, 0.05]}
    assert [x["best_val_acc"] for x in res["runs"]] == [json.loads((run / "metrics.json").read_text())["best"][
        "val_acc"], 0.75]
    page = browser(tmp_path / "cmp.html", tmp_path / "cmp.png")
    assert page["errors"] == [] and "fig-compare" in page["ids"]
    assert [i for i in page["images"] if i["w"] == 0] == [] and len(page["images"]) == 1
    r = cli("compare", run)
    assert r.exit_code == 1 and r.stderr == ("Error: finetune compare takes at least two run directories (see "
                                             "finetune runs)\n")
    r = cli("compare", run, tmp_path)
    assert r.exit_code == 1 and r.stderr == (f"Error: '{tmp_path}' is not a finetune run directory (no config.yaml "
                                             "and metrics.json); see finetune runs\n")
