"""Issue 30, items 2, 3 and 7: the noise of an accuracy is shown beside it (probe, runs, compare, eval), probe's best
head is the best calibrated of those within noise of the top (not the one a single image ahead), and ``finetune
runs`` keeps every cell readable at 80 columns and in a pipe."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from finetune.cli import render
from finetune.training.stats import wilson
from helpers import cli_env, finetune_cmd

N = 240  # flowers12's val set


def _heads():
    from finetune.tools.probe import HeadResult

    # the case: lr 0.3 one image ahead with a val loss of 7.55; lr 1e-4 has the lowest loss but is far
    # below the top; lr 0.1 diverged (NaN loss) within noise of the top
    return [HeadResult(0.3, 1e-4, 209 / N, 7.55, 0.01), HeadResult(3e-3, 1e-4, 208 / N, 0.45, 0.3),
            HeadResult(1e-4, 1e-4, 150 / N, 0.30, 1.2), HeadResult(0.1, 1e-4, 207 / N, float("nan"), 0.02)]


def test_best_head_is_the_lowest_val_loss_within_noise_of_the_top():
    from finetune.tools.probe import choose_best, top_head

    heads = _heads()
    assert choose_best(heads, N) == 1 and top_head(heads) == 0
    assert [h.within_noise for h in heads] == [True, True, False, True]
    assert heads[0].val_acc_ci == list(wilson(209 / N, N)) == [pytest.approx(0.82249, abs=1e-5),
                                                               pytest.approx(0.90749, abs=1e-5)]


def test_best_head_without_near_ties_is_the_top_accuracy():
    from finetune.tools.probe import HeadResult, choose_best

    heads = [HeadResult(1e-2, 0.0, 0.95, 0.9, 0.1), HeadResult(1e-3, 0.0, 0.60, 0.2, 0.5)]
    assert choose_best(heads, 1000) == 0 and [h.within_noise for h in heads] == [True, False]
    nan = float("nan")  # every candidate diverged: the higher accuracy, then the first
    heads = [HeadResult(1.0, 0.0, 0.50, nan, nan), HeadResult(3.0, 0.0, 0.52, nan, nan)]
    assert choose_best(heads, 50) == 1


def _probe_result():
    from finetune.tools.probe import ProbeResult, choose_best, top_head

    heads = _heads()
    best, top = choose_best(heads, N), top_head(heads)
    return ProbeResult("timm:tf_efficientnet_lite0", "default", heads, {10: 0.9}, best, ["a", "b"], 1280, 720, N,
                       1.0, 0.2, 0.1, True, top=top, val_acc_pm=(wilson(209 / N, N)[1] - wilson(209 / N, N)[0]) / 2)


@pytest.fixture
def out(monkeypatch):
    """The CLI's rich console writing to a buffer, 120 columns wide."""
    buf = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=buf, width=120, soft_wrap=False, emoji=False))
    return buf


def test_probe_table_shows_intervals_ties_and_the_noise(out):
    from finetune.cli.probe_cmd import render as show

    show([_probe_result()])
    text = out.getvalue()
    rows = {line.split("│")[2].strip(): [c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines()
            if line.startswith("│")}
    assert rows["0.3"] == ["1", "0.3", "0.0001", "87.08% ± 4.2", "≈", "7.5500", "0.0100"]
    assert rows["0.003"] == ["2", "0.003", "0.0001", "86.67% ± 4.3", "≈ best", "0.4500", "0.3000"]
    assert rows["0.1"][3:5] == ["86.25% ± 4.4", "≈"] and rows["0.0001"][3:5] == ["62.50% ± 6.1", ""]
    assert ("val: 240 images, ± 4.2 points (95%) at the top; ≈: within noise of the top (3 of 4 heads)\n"
            "best: the lowest val loss of them (0.4500; the top accuracy's head has 7.5500)\n") in text
    assert "k-NN (cosine): k=10: 90.00% ± 3.8" in text


def test_probe_json_has_the_interval_fields():
    d = _probe_result().to_dict()
    assert (d["best"], d["top"], d["val_images"]) == (1, 0, 240)
    assert d["val_acc_pm"] == pytest.approx(0.04249, abs=1e-5)
    assert [h["within_noise"] for h in d["heads"]] == [True, True, False, True]
    assert d["heads"][1]["val_acc_ci"] == list(wilson(208 / N, N)) and d["heads"][3]["val_loss"] is None


def test_interval_texts():
    from finetune.cli.eval_cmd import accuracy_text

    assert render.pct_pm(208 / N, N) == "86.67% ± 4.3"
    assert render.pct_pm(0.5, None) == "50.00%" and render.pct_pm(None, N) == "-"
    assert accuracy_text(208 / N, N) == "86.67% ± 4.3 (95%, 240 images)"
    assert accuracy_text(0.9, 300) == "90.00% ± 3.4 (95%, 300 images)"


# ------------------------------------------------------------------------------------------------ runs, compare

CONFIG = "name: {recipe}\nmodel:\n  name: {model}\ntrain:\n  epochs: 10\n"
LONG = [("20250101-120000-timm-tf_efficientnet_lite0", "timm:tf_efficientnet_lite0", "linear-probe", 209),
        ("20250101-130000-resnet18", "resnet18", "default", 208),
        ("20250102-090000-timm-tf_efficientnet_lite1", "timm:tf_efficientnet_lite1", "fine-tune-gradual", 168)]


def _run(d: Path, model: str, recipe: str, correct: int | None, n: int | None = N, report: bool = True) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(CONFIG.format(model=model, recipe=recipe))
    metrics = {"best": {"epoch": 7, "val_acc": None if correct is None else correct / (n or N)},
               "epochs": [{"epoch": e, "train_loss": 1.0, "val_acc": 0.5, "seconds": 123.4} for e in range(1, 11)]}
    if n:
        metrics["val_images"] = n
    (d / "metrics.json").write_text(json.dumps(metrics))
    if report:
        (d / "report.html").write_text("<html></html>")
    return d


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for name, model, recipe, correct in LONG:
        _run(root / name, model, recipe, correct)
    return root


def _cells(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_runs_at_80_columns_keeps_every_name_whole(runs, cli, monkeypatch):
    monkeypatch.setattr(render.console, "_width", 80)
    r = cli("runs", runs)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80
    for _, model, recipe, _ in LONG:  # each model and recipe name whole on a line of its own cell
        assert any(model in x for x in lines) and any(recipe in x for x in lines)
    cells = _cells(r.stdout)
    firsts = [c for c in cells if c[2]]  # the first line of each row: accuracy and epochs
    assert [c[2:] for c in firsts] == [["87.08% ± 4.2 @7", "10/10"], ["86.67% ± 4.3 @7", "10/10"],
                                       ["70.00% ± 5.8 @7", "10/10"]]
    assert all(all(c) for c in firsts)  # no blank cell; the run name folds, the recipe under the model
    assert [c[:2] for c in cells[:3]] == [["20250101-120000-timm", "timm:tf_efficientnet_lite0"],
                                          ["-tf_efficientnet_lit", "linear-probe"], ["e0", ""]]
    assert "┃ run" in r.stdout and "model / recipe" in r.stdout and "best val acc" in r.stdout
    assert lines[-1] == "columns left out to fit 80: report, date, train time; --json has them"
    assert lines[-2] == "best val acc: ± the 95% interval (Wilson) on the run's val images; @N: its epoch"


def test_runs_wide_shows_every_column(runs, cli, monkeypatch):
    monkeypatch.setattr(render.console, "_width", 200)
    r = cli("runs", runs)
    header = next(x for x in r.stdout.splitlines() if x.startswith("┃"))
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["run", "model", "recipe", "best val acc", "epochs",
                                                            "train time", "date", "report"]
    first = _cells(r.stdout)[0]
    assert first[:5] == [LONG[0][0], LONG[0][1], LONG[0][2], "87.08% ± 4.2 @7", "10/10"]
    assert first[5] == "20.6 min" and first[7] == "yes" and "left out" not in r.stdout


def test_runs_without_a_recorded_val_count_show_the_accuracy_alone(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(render.console, "_width", 200)
    _run(tmp_path / "old", "resnet18", "default", 120, n=None, report=False)
    r = cli("runs", tmp_path)
    assert _cells(r.stdout)[0][3:] == ["50.00% @7", "10/10", "20.6 min", _cells(r.stdout)[0][6], "-"]
    assert "Wilson" not in r.stdout
    row = json.loads(cli("runs", tmp_path, "--json").stdout)[0]
    assert row["val_images"] is None and row["best_val_acc_ci"] is None


def test_train_time_of_a_run_of_seconds_is_not_zero(tmp_path, cli, monkeypatch):
    """A cached linear probe trains its epochs in 0.43 s: runs and compare said "0 s"; a probe run records no epoch
    time: "-", not "0 s"."""
    from finetune.cli.runs_cmd import _secs

    assert [_secs(v) for v in (None, 0.04, 0.43, 9.94, 10.4, 599, 1234.0)] == \
        ["-", "0.04 s", "0.43 s", "9.9 s", "10 s", "599 s", "20.6 min"]
    monkeypatch.setattr(render.console, "_width", 200)
    d = _run(tmp_path / "probe", "resnet18", "linear-probe", 200)
    m = json.loads((d / "metrics.json").read_text())
    m["epochs"] = [{**r, "seconds": 0.086} for r in m["epochs"][:5]]
    (d / "metrics.json").write_text(json.dumps(m))
    assert _cells(cli("runs", tmp_path).stdout)[0][5] == "0.43 s"
    m["epochs"] = [{k: v for k, v in r.items() if k != "seconds"} for r in m["epochs"]]  # a probe run's rows
    (d / "metrics.json").write_text(json.dumps(m))
    assert _cells(cli("runs", tmp_path).stdout)[0][5] == "-"
    assert json.loads(cli("runs", tmp_path, "--json").stdout)[0]["train_seconds"] is None
    other = _run(tmp_path / "other", "resnet18", "default", 200)
    r = cli("compare", d, other, "--html", tmp_path / "c.html")
    assert r.exit_code == 0, r.stderr
    assert {x[0]: x[1:] for x in _cells(r.stdout)}["train time"] == ["-", "20.6 min"]


@pytest.mark.subprocess
def test_runs_piped_is_readable(runs):
    """Not a terminal, no COLUMNS: rich's 80 columns; every model and recipe name still whole."""
    env = {k: v for k, v in cli_env().items() if k not in ("COLUMNS", "LINES")}
    r = subprocess.run(finetune_cmd("runs", runs), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert max(len(x) for x in r.stdout.splitlines()) <= 80
    for _, model, recipe, _ in LONG:
        assert model in r.stdout and recipe in r.stdout
    assert "columns left out to fit 80: report, date, train time; --json has them" in r.stdout


def test_runs_json_has_the_interval(runs, cli):
    rows = json.loads(cli("runs", runs, "--json").stdout)
    assert [r["val_images"] for r in rows] == [N, N, N]
    assert rows[0]["best_val_acc_ci"] == list(wilson(209 / N, N))


def test_compare_marks_differences_within_noise_as_ties(runs, cli, monkeypatch, tmp_path):
    monkeypatch.setattr(render.console, "_width", 300)
    a, b, c = (runs / name for name, *_ in LONG)
    r = cli("compare", a, b, c, "--html", tmp_path / "c.html")
    assert r.exit_code == 0, r.stderr
    rows = {x[0]: x[1:] for x in _cells(r.stdout)}
    assert rows["best val acc (95%)"] == ["87.08% ± 4.2", "86.67% ± 4.3", "70.00% ± 5.8"]
    assert rows["val images"] == ["240", "240", "240"]
    assert rows["vs the top"] == ["top", "≈ tie (-0.42, within noise)", "-17.08 points"]
    assert "≈: within noise of the top run" in r.stdout
    doc = json.loads(cli("compare", a, b, c, "--json").stdout)
    assert [x["tie_with_top"] for x in doc["runs"]] == [True, True, False]
    html = (tmp_path / "c.html").read_text()
    assert "87.08% ± 4.2 (top)" in html and "86.67% ± 4.3 (≈ top: within noise)" in html


def test_compare_on_different_val_counts_combines_the_noise(tmp_path, cli, monkeypatch):
    """9 images at 100% (± 15.0) against 240 at 96.67% (± 2.4): a tie; 9 at 100% against 240 at 80%: not."""
    from finetune.reporting.runs import compare_runs

    monkeypatch.setattr(render.console, "_width", 300)
    a = _run(tmp_path / "a", "smallcnn", "linear-probe", 9, n=9)
    b = _run(tmp_path / "b", "timm:tf_efficientnet_lite0", "linear-probe", 232)
    c = _run(tmp_path / "c", "resnet18", "default", 192)
    assert [r["tie_with_top"] for r in compare_runs([a, b, c])["runs"]] == [True, True, False]
    r = cli("compare", a, b, c)
    rows = {x[0]: x[1:] for x in _cells(r.stdout)}
    assert rows["vs the top"] == ["top", "≈ tie (-3.33, within noise)", "-20.00 points"]
    assert "the runs' val sets differ (9, 240, 240 images): their accuracies measure different things" in r.stdout


def test_compare_without_val_counts_says_the_noise_is_unknown(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(render.console, "_width", 300)
    a = _run(tmp_path / "a", "resnet18", "default", 120, n=None)
    b = _run(tmp_path / "b", "resnet18", "default", 110, n=None)
    rows = {x[0]: x[1:] for x in _cells(cli("compare", a, b).stdout)}
    assert rows["best val acc (95%)"] == ["50.00%", "45.83%"]
    assert rows["vs the top"] == ["top", "-4.17 (noise unknown)"]


# ------------------------------------------------------------------------------------------------ recorded n


def test_metrics_json_records_the_val_count_and_a_repair_keeps_it():
    from finetune.run import checkpoint as ck

    text = ck.metrics_text({"epoch": 1, "val_acc": 0.5}, [], val_images=240)
    assert json.loads(text)["val_images"] == 240
    assert "val_images" not in json.loads(ck.metrics_text({"epoch": 1, "val_acc": 0.5}, []))
    assert ck._kept_val_images(text) == 240 and ck._kept_val_images(None) is None
    assert ck._kept_val_images('{"val_images": true}') is None and ck._kept_val_images("{bad") is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from finetune import config
    from finetune.run.runner import train
    from helpers import tiny_tree

    data = tiny_tree(tmp_path_factory.mktemp("noise") / "data", per_class=10)
    out = tmp_path_factory.mktemp("noise") / "run"
    over = {"data.path": str(data), "model.weights": "none", "train.batch_size": 8, "train.precision": "fp32",
            "train.device": "cpu", "train.tensorboard": False, "train.seed": 3, "train.epochs": 1}
    train(config.apply_overrides(config.load_recipe("default"), over), out=out)
    return out


def test_eval_prints_and_returns_the_interval(tiny_run, cli, monkeypatch):
    from finetune.cli.eval_cmd import accuracy_text

    n_val = json.loads((tiny_run / "metrics.json").read_text())["val_images"]
    ev = json.loads(cli("eval", tiny_run / "best.pt", "--json", "--device", "cpu").stdout)
    assert ev["n"] == n_val and ev["accuracy_ci"] == list(wilson(ev["accuracy"], ev["n"]))
    monkeypatch.setattr(render.console, "_width", 200)
    r = cli("eval", tiny_run / "best.pt", "--device", "cpu")
    line = next(x for x in r.stdout.splitlines() if x.startswith("accuracy "))
    assert line.startswith(f"accuracy {accuracy_text(ev['accuracy'], ev['n'])}   balanced accuracy")
    assert f"(95%, {n_val} images)" in line


@pytest.mark.subprocess
def test_runs_and_compare_with_intervals_import_no_torch(runs):
    a, b = (runs / name for name, *_ in LONG[:2])
    code = ("import sys\nfrom finetune.cli.app import app\n"
            f"for args in (['runs', {str(runs)!r}], ['compare', {str(a)!r}, {str(b)!r}]):\n"
            "    try:\n        app(args)\n    except SystemExit as e:\n        assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert r.returncode == 0, r.stderr
    assert "≈ tie" in r.stdout and "86.67% ± 4.3" in r.stdout
