"""Reliability round 3 (issue 27, rows 4, 10, 11, 12, 13): hostile file/class/run names reach neither a
spreadsheet as formulas nor the terminal as escape sequences or rich markup; '$' in names never breaks matplotlib;
one malformed metrics.json never breaks runs/compare; probe --json is strict JSON; api.predict takes one path."""

from __future__ import annotations

import csv
import html
import io
import json
import shutil
from pathlib import Path

import pytest

from finetune import config
from finetune.errors import shown
from finetune.run.runner import train
from helpers import tiny_tree

# class folder names: a spreadsheet formula, rich markup, an OSC 8 hyperlink escape, and mathtext
FORMULA, MARKUP, OSC = "=HYPERLINK(1)", "[bold]b", "e\x1b]8;;h\x07"
CLASSES = (FORMULA, MARKUP, OSC, "a$b", "$x^2$", "x$_$y")
OSC_SHOWN = "e\\x1b]8;;h\\x07"  # errors.shown(OSC): visible, harmless


def strict(c):
    raise ValueError(f"bare {c}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_tree(tmp_path_factory.mktemp("r3") / "data", classes=CLASSES, per_class=5)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("r3") / "run"
    over = {"data.path": str(data), "model.weights": "none", "train.batch_size": 8, "train.precision": "fp32",
            "train.device": "cpu", "train.tensorboard": False, "train.seed": 5, "train.epochs": 1}
    train(config.apply_overrides(config.load_recipe("default"), over), out=out)
    return out


@pytest.fixture
def wide(monkeypatch):
    """The CLI's rich console 400 columns wide: no cell folds across lines, so names can be found whole."""
    from finetune.cli import render

    monkeypatch.setattr(render.console, "_width", 400)


def _no_controls(*texts: str) -> None:
    for t in texts:
        assert "\x1b" not in t and "\x07" not in t and "\x9b" not in t, repr(t)


# ------------------------------------------------------------------------------------------------ row 4


@pytest.fixture
def pics(tmp_path, data):
    """A folder of images whose names start with = + - @ and one holding an OSC 8 escape."""
    d = tmp_path / "pics"
    (d / "\x1b]8;;http:").mkdir(parents=True)
    src = next((data / "a$b").iterdir())
    for name in ("=cmd.png", "+y.png", "-z.png", "@x.png", "\x1b]8;;http:/evil\x07.png"):
        shutil.copy(src, d / name)
    return d


def test_predict_csv_cells_cannot_be_formulas_and_json_stays_exact(run, pics, cli, monkeypatch):
    monkeypatch.chdir(pics)
    r = cli("predict", run / "best.pt", ".", "--csv", "--top-k", 6, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    _no_controls(r.stdout)
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["image"] + [f"{c}_{i}" for i in range(1, 7) for c in ("label", "prob")] + ["low_confidence"]
    assert sorted(row[0] for row in rows[1:]) == sorted(["'=cmd.png", "'+y.png", "'-z.png", "'@x.png",
                                                         "\\x1b]8;;http:/evil\\x07.png"])
    for row in rows[1:]:
        assert sorted(row[1:13:2]) == sorted(["'" + FORMULA, MARKUP, OSC_SHOWN, "a$b", "$x^2$", "x$_$y"])
        assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in row)
    r = cli("predict", run / "best.pt", ".", "--json", "--top-k", 6, "--device", "cpu")
    doc = json.loads(r.stdout)  # JSON is data: exact names (json.dumps escapes the controls itself)
    _no_controls(r.stdout)
    assert sorted(x["path"] for x in doc) == sorted(["=cmd.png", "+y.png", "-z.png", "@x.png",
                                                     "\x1b]8;;http:/evil\x07.png"])
    assert {p["label"] for p in doc[0]["top"]} == set(CLASSES)


def test_predict_text_escapes_control_characters_in_file_and_class_names(run, pics, cli):
    given = str(pics) + "/\x1b]8;;http://evil\x07.png"  # as a user would paste it: the name shows as given
    r = cli("predict", run / "best.pt", given, "--top-k", 6, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    _no_controls(r.stdout, r.stderr)
    assert "\\x1b]8;;http://evil\\x07.png" in r.stdout and OSC_SHOWN in r.stdout and FORMULA in r.stdout


def test_eval_runs_compare_print_names_literally(run, tmp_path, cli, wide):
    r = cli("eval", run / "best.pt", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    _no_controls(r.stdout)
    assert MARKUP in r.stdout and OSC_SHOWN in r.stdout  # rich markup printed as written, ESC visible
    runs = tmp_path / "runs"
    a, b = runs / "r[bold]x", runs / "s\x1b]8;;h\x07"
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    cfg = (a / "config.yaml").read_text()
    (a / "config.yaml").write_text(cfg.replace("name: default", "name: '[link=evil]rec'", 1))
    r = cli("runs", runs)
    assert r.exit_code == 0, r.stderr
    _no_controls(r.stdout)
    assert "r[bold]x" in r.stdout and "s\\x1b]8;;h\\x07" in r.stdout and "[link=evil]rec" in r.stdout
    r = cli("compare", a, b)
    assert r.exit_code == 0, r.stderr
    _no_controls(r.stdout)
    assert "r[bold]x" in r.stdout and "s\\x1b]8;;h\\x07" in r.stdout and "[link=evil]rec" in r.stdout


def test_probe_and_inspect_print_names_literally(data, tmp_path, cli, wide):
    out = tmp_path / "o[bold]p\x1b]8;;h\x07"
    r = cli("probe", "--model", "smallcnn", "--weights", "none", "--data", data, "--image-size", 32, "--epochs", 1,
            "--precision", "fp32", "--device", "cpu", "--lrs", "1e-2", "--wds", "0", "--knn", "0", "--out", out)
    assert r.exit_code == 0, r.stderr
    _no_controls(r.stdout, r.stderr)
    assert "o[bold]p\\x1b]8;;h\\x07/best.pt" in r.stdout
    import torch

    from finetune.models import build_model

    w = tmp_path / "w[bold]x\x1b.pth"
    torch.save(build_model("smallcnn", num_classes=3, weights="none").model.state_dict(), w)
    r = cli("inspect", "smallcnn", "--weights", w, "--num-classes", 3)
    assert r.exit_code == 0, r.stderr
    _no_controls(r.stdout)
    assert "w[bold]x\\x1b.pth" in "".join(r.stdout.split())  # the title wraps at the table's width


def test_cache_list_prints_model_and_data_names_literally(tmp_path, cli, wide):
    """The feature store records the data path it was computed for: ``cache list`` prints it literally."""
    import shutil

    hostile = tmp_path / "d[bold]x\x1b]8;;h\x07"
    shutil.copytree(tiny_tree(tmp_path / "plain", per_class=4), hostile)
    r = cli("probe", "--model", "smallcnn", "--weights", "none", "--data", hostile, "--image-size", 32, "--epochs", 1,
            "--precision", "fp32", "--device", "cpu", "--lrs", "1e-2", "--wds", "0", "--knn", "0", "--out",
            tmp_path / "p")
    assert r.exit_code == 0, r.stderr
    r = cli("cache", "list")
    assert r.exit_code == 0, r.stderr
    _no_controls(r.stdout)
    assert "d[bold]x\\x1b]8;;h\\x07" in "".join(r.stdout.split())


# ------------------------------------------------------------------------------------------------ row 10


def _literal(text) -> tuple[str, bool]:
    """What matplotlib draws for a Text: (the string shown, whether it is parsed as mathtext)."""
    return text._preprocess_math(text.get_text())


@pytest.mark.report
def test_dollar_class_names_report_is_written_with_literal_labels(run):
    from finetune.reporting.report import confusion_svg, write_run_report

    out = write_run_report(run)
    page = out.read_text()
    assert out == run / "report.html" and 'id="fig-confusion"' in page and 'id="fig-curves"' in page
    assert "x$_$y" in page and "$x^2$" in page
    names = list(CLASSES)
    doc = confusion_svg([[1 if i == j else 0 for j in range(6)] for i in range(6)], names)
    # the figure is SVG text (no mathtext anywhere): each name drawn literally as a row and a column label
    for n in names:
        label = html.escape(shown(n[:14]), quote=True)
        assert doc.count(f">{label}</text>") == 4, n  # 2 maps x (row, column)


def test_compare_html_with_dollar_run_names(run, tmp_path, cli):
    from finetune.reporting.html import pyplot
    from finetune.reporting.runs import compare_figure, compare_runs

    a, b = tmp_path / "run$_$1", tmp_path / "$x^2$"
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    r = cli("compare", a, b, "--html", tmp_path / "c.html")
    assert r.exit_code == 0, r.stderr
    assert 'id="fig-compare"' in (tmp_path / "c.html").read_text()
    fig = compare_figure(compare_runs([a, b])["runs"])
    labels = [_literal(t) for t in fig.axes[1].get_legend().get_texts()]
    assert labels == [("run$_$1", False), ("$x^2$", False)]
    pyplot().close(fig)


# ------------------------------------------------------------------------------------------------ row 11

CONFIG = "name: default\nmodel:\n  name: smallcnn\ntrain:\n  epochs: 2\n"
GOOD = {"best": {"epoch": 1, "val_acc": 0.5}, "epochs": [
    {"epoch": 1, "train_loss": 1.25, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "lr": 0.1, "seconds": 1.0,
     "images_per_sec": 10.0, "lrs": {"head": 0.1}}]}
BAD_METRICS = {
    "not-json": b"{not json",
    "not-utf8": b"\xff\xfe{",
    "list": b"[1, 2]",
    "string": b'"a string"',
    "epochs-str": b'{"best": {"epoch": 1, "val_acc": 0.5}, "epochs": "abc"}',
    "best-list": b'{"best": [1], "epochs": []}',
    "best-acc-str": b'{"best": {"epoch": 1, "val_acc": "high"}, "epochs": []}',
    "row-types": b'{"best": {}, "epochs": [{"epoch": "one", "train_loss": "x"}]}',
    "row-nested": b'{"best": {}, "epochs": [[["nested"]]]}',
    "lrs-nested": b'{"best": {}, "epochs": [{"epoch": 1, "lrs": {"head": {"a": [1]}}}]}',
    "deep": b"[" * 200_000 + b"]" * 200_000,
}


def _fake_run(d: Path, metrics: bytes, cfg: str = CONFIG) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(cfg)
    (d / "metrics.json").write_bytes(metrics)
    return d


@pytest.mark.parametrize("bad", list(BAD_METRICS))
def test_runs_and_compare_skip_a_malformed_metrics_json_with_one_warning(bad, tmp_path, cli):
    root = tmp_path / "runs"
    good = json.dumps(GOOD).encode()
    _fake_run(root / "good1", good)
    broken = _fake_run(root / "broken", BAD_METRICS[bad])
    _fake_run(root / "good2", good)
    for args in (("runs", root), ("runs", root, "--json"), ("compare", root / "good1", broken, root / "good2")):
        r = cli(*args)
        assert r.exit_code == 0, (args, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("warning: skipping run ") and \
            f"'{broken / 'metrics.json'}'" in lines[0], r.stderr
        assert "good1" in r.stdout and "good2" in r.stdout and "broken" not in r.stdout
    doc = json.loads(cli("runs", root, "--json").stdout)
    assert sorted(Path(x["path"]).name for x in doc) == ["good1", "good2"]
    r = cli("compare", root / "good1", broken)  # one readable run left: nothing to compare, one error line
    assert r.exit_code == 1 and r.stderr.splitlines()[-1] == (
        "Error: finetune compare needs at least two readable run directories; 1 of 2 could be read (see the "
        "warnings above)")


@pytest.mark.parametrize("cfg", ["- a\n- list\n", "model: 5\n", "train:\n  epochs: many\n", "a: [b\n"])
def test_runs_skip_a_malformed_config_yaml_with_one_warning(cfg, tmp_path, cli):
    root = tmp_path / "runs"
    _fake_run(root / "good", json.dumps(GOOD).encode())
    _fake_run(root / "broken", json.dumps(GOOD).encode(), cfg)
    r = cli("runs", root)
    assert r.exit_code == 0, r.stderr
    assert len(r.stderr.splitlines()) == 1 and f"'{root / 'broken' / 'config.yaml'}'" in r.stderr
    assert "good" in r.stdout and "broken" not in r.stdout


def test_compare_final_train_loss_of_null_is_a_dash(tmp_path, cli, wide):
    doc = json.loads(json.dumps(GOOD))
    doc["epochs"][0]["train_loss"] = None
    a = _fake_run(tmp_path / "a", json.dumps(doc).encode())
    b = _fake_run(tmp_path / "b", json.dumps(GOOD).encode())
    r = cli("compare", a, b)
    assert r.exit_code == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "final train loss" in x)
    assert line.split() == ["│", "final", "train", "loss", "│", "-", "│", "1.2500", "│"]


# ------------------------------------------------------------------------------------------------ row 12


def test_probe_json_of_a_diverging_head_is_strict(data, tmp_path, cli):
    out = tmp_path / "p"
    r = cli("probe", "--model", "smallcnn", "--weights", "none", "--data", data, "--image-size", 32, "--epochs", 2,
            "--precision", "fp32", "--device", "cpu", "--lrs", "1e-2,3e38", "--wds", "0", "--knn", "0", "--out", out,
            "--json", "--quiet")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout, parse_constant=strict)  # a bare NaN/Infinity raises here
    heads = doc[0]["heads"]
    assert isinstance(heads[0]["val_loss"], float)
    assert heads[1]["lr"] == 3e38 and heads[1]["train_loss"] is None and heads[1]["val_loss"] is None  # NaN: null
    saved = json.loads((out / "probe.json").read_text(), parse_constant=strict)
    assert saved["heads"] == heads


def test_probe_result_to_dict_is_finite():
    from finetune.tools.probe import HeadResult, ProbeResult

    r = ProbeResult("m", "none", [HeadResult(0.1, 0.0, float("nan"), float("inf"), float("-inf"), [float("nan")])],
                    {10: float("nan")}, 0, ["a"], 8, 1, 1, 0.0, 0.0, 0.0, False)
    text = json.dumps(r.to_dict(), allow_nan=False)
    d = json.loads(text, parse_constant=strict)
    assert d["heads"][0] == {"lr": 0.1, "weight_decay": 0.0, "val_acc": None, "val_loss": None, "train_loss": None,
                             "val_accs": [None], "val_acc_ci": None, "within_noise": False}
    assert d["knn"] == {"10": None}


# ------------------------------------------------------------------------------------------------ row 13


def test_api_predict_takes_one_path_as_one_input(run, pics, monkeypatch):
    import finetune

    monkeypatch.chdir(pics.parent)
    one = finetune.predict(run / "best.pt", "pics/=cmd.png", top_k=2, device="cpu")
    assert isinstance(one, dict) and one["path"] == "pics/=cmd.png" and one["name"] == "pics/=cmd.png"
    assert len(one["top"]) == 2
    assert finetune.predict(run / "best.pt", Path("pics/=cmd.png"), top_k=2, device="cpu") == one
    many = finetune.predict(run / "best.pt", "pics", top_k=2, device="cpu")  # a folder: a row per image
    assert isinstance(many, list) and len(many) == 5
    assert [[p["label"] for p in m["top"]] for m in many if m["name"] == "=cmd.png"] == [
        [p["label"] for p in one["top"]]]
    assert finetune.predict(run / "best.pt", ["pics/=cmd.png"], top_k=2, device="cpu") == [one]
    assert finetune.predict(run / "best.pt", (p for p in ["pics/=cmd.png"]), top_k=2, device="cpu") == [one]


@pytest.mark.parametrize("bad,what", [(b"pics", "bytes; decode it: os.fsdecode(path)"), (5, "int"),
                                      (None, "NoneType"), (["pics", 5], "a list holding int 5"),
                                      ([b"pics"], "a list holding bytes b'pics'")])
def test_api_predict_rejects_what_is_not_a_path(run, bad, what):
    import finetune

    with pytest.raises(TypeError) as e:
        finetune.predict(run / "best.pt", bad)
    assert str(e.value) == ("predict() takes a path (str or os.PathLike: an image file or a folder) or a list of "
                            f"paths, got {what}")


def test_a_warning_naming_a_hostile_file_escapes_it(run, pics, cli):
    (pics / "\x1b]8;;http:" / "bad\x1b[2J.png").write_bytes(b"not an image")
    r = cli("predict", run / "best.pt", pics, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    _no_controls(r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: skipping unreadable image ") and \
        "\\x1b]8;;http:/bad\\x1b[2J.png" in lines[0], r.stderr
