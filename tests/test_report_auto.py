"""The run report's "How this model was chosen" (finetune/reporting/decision.py): a run directory with the auto.json
that ``finetune auto`` writes gets the candidates, the estimates with their intervals, the reasons, the budget and
the rerun command, every text escaped; a damaged or foreign auto.json costs one note, never the report."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

import finetune
from finetune.reporting import decision as D

from browser import chromium, open_page, required
from helpers import tiny_tree

pytestmark = pytest.mark.report

AUTO = {
    "version": 1, "budget_seconds": 900.0, "seconds": 812.3,
    "stages": {"probe": 310.2, "decide": 12.0, "train": 480.1},
    "data": {"train": 540, "val": 180, "test": 240, "classes": 12},
    "estimate": "5-fold cross-validation over the 720 train+val images",
    "candidates": [
        {"model": "timm:tf_efficientnet_lite0", "weights": "/w/tf_efficientnet_lite0.safetensors", "status": "ok",
         "reason": None, "acc": 0.951, "ci": [0.933, 0.964], "n": 720, "knn": {"20": 0.91, "10": 0.90},
         "lr": 0.003, "weight_decay": 0.0001, "images_per_sec": 7.1, "train_images_per_sec": 2.3,
         "parameters": 4652008, "seconds": 150.2, "from_store": False, "tied": True, "winner": True},
        {"model": "timm:tf_efficientnet_lite1", "weights": "/w/it's <b>lite1.safetensors", "status": "ok",
         "reason": None, "acc": 0.954, "ci": [0.936, 0.967], "n": 720, "knn": {"10": 0.91}, "lr": 0.01,
         "weight_decay": 0.001, "images_per_sec": 4.0, "train_images_per_sec": None, "parameters": 5416680,
         "seconds": 160.0, "from_store": True, "tied": True, "winner": False},
        {"model": "timm:vit<script>alert(1)</script>", "weights": "/w/vit.safetensors", "status": "skipped",
         "reason": "no weights at /w/vit.safetensors & no network", "acc": None, "ci": None, "n": None},
    ],
    "winner": 0, "strategy": "lp-ft", "epochs": 4,
    "reasons": ["lite0 and lite1 are within noise (95.1% ± 1.6 vs 95.4% ± 1.5 on 720 images); lite0 is cheaper",
                "LP-FT: 4 epochs fit the 588 s left (`--epochs 4`)"],
    "recipe": "recipe.yaml",
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 1-epoch smallcnn run on 18 tiny images, no report of its own (the tests write theirs): ~5 s."""
    root = tmp_path_factory.mktemp("auto")
    data = tiny_tree(root / "data", per_class=6, size=16)
    r = finetune.load_recipe("default")
    r.data.path, r.train.epochs, r.train.seed = str(data), 1, 0
    r.train.tensorboard, r.train.report, r.train.graph = False, False, False
    return finetune.train(r, out=root / "run").run_dir


@pytest.fixture
def run(made, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(made, d)
    return d


def page(run, auto: object | bytes | None) -> str:
    """The report of ``run`` with ``auto`` as its auto.json (bytes as written; None: no auto.json), written as
    ``finetune report RUN`` writes it."""
    if auto is not None:
        (run / "auto.json").write_bytes(auto if isinstance(auto, bytes) else json.dumps(auto).encode())
    return finetune.write_report(run).read_text()


def test_the_decision_is_shown_with_its_numbers_and_reasons(run, cli):
    (run / "recipe.yaml").write_text("name: auto\n")
    (run / "auto.json").write_text(json.dumps(AUTO))
    r = cli("report", run)  # as finetune auto regenerates it after training
    assert r.exit_code == 0 and r.stdout == f"{run / 'report.html'}\n"
    html = (run / "report.html").read_text()
    assert ("<tr style='font-weight:bold'><td style='text-align:left' title='/w/tf_efficientnet_lite0.safetensors'>"
            "★\u00a0timm:tf_efficientnet_lite0<br><span class='muted'>tf_efficientnet_lite0.safetensors</span></td>"
            "<td style='white-space:pre'>95.1% ± 1.6\n[93.3, 96.4]\non 720 images</td>"
            "<td style='white-space:pre'>k=10  90.0%\nk=20  91.0%</td><td style='white-space:pre'>0.003\n0.0001</td>"
            "<td>7.1</td><td>2.3</td><td style='white-space:pre'>4.65 M</td><td style='white-space:pre'>150.2 s</td>"
            "</tr>") in html
    assert ("<tr><td style='text-align:left' title='/w/it&#x27;s &lt;b&gt;lite1.safetensors'>"
            "≈\u00a0timm:tf_efficientnet_lite1<br><span class='muted'>it&#x27;s &lt;b&gt;lite1.safetensors</span></td>"
            "<td style='white-space:pre'>95.4% ± 1.5\n[93.6, 96.7]\non 720 images</td>"
            "<td style='white-space:pre'>k=10  91.0%</td><td style='white-space:pre'>0.01\n0.001</td>"
            "<td>4.0</td><td>-</td><td style='white-space:pre'>5.42 M</td>"
            "<td style='white-space:pre'>160.0 s (cached)</td></tr>") in html
    assert ("<tr class='muted'><td style='text-align:left' title='/w/vit.safetensors'>"
            "timm:vit&lt;script&gt;alert(1)&lt;/script&gt;<br><span class='muted'>vit.safetensors</span></td>"
            "<td colspan='7' style='text-align:left'>skipped: no weights at /w/vit.safetensors &amp; no network</td>"
            "</tr>") in html
    assert "<script" not in html and "<b>lite1" not in html
    assert ("<p><code>finetune auto</code> compared 3 candidate backbones and chose "
            "<b>timm:tf_efficientnet_lite0</b>, trained with LP-FT (4 epochs).</p>") in html
    assert "<p>Data: 540 train · 180 val · 240 test images, 12 classes.</p>" in html
    assert ("<p>Estimates: 5-fold cross-validation over the 720 train+val images (accuracy ± half its 95% Wilson "
            "interval, in points).</p>") in html
    assert ("<ul id='auto-reasons'><li>lite0 and lite1 are within noise (95.1% ± 1.6 vs 95.4% ± 1.5 on 720 images); "
            "lite0 is cheaper</li><li>LP-FT: 4 epochs fit the 588 s left (<code>--epochs 4</code>)</li></ul>") in html
    assert ("<p id='auto-budget'>Time: probe 310.2 s · decide 12.0 s · train 480.1 s; total 812.3 s of a 900.0 s "
            "budget: within budget (90% used).</p>") in html
    assert (f"<p>Rerun it without the search: <code>finetune train --recipe {run}/recipe.yaml</code></p>") in html
    # in the findings, first; the section after them and before the curves
    assert ("<ul id='findings'><li><code>finetune auto</code> chose timm:tf_efficientnet_lite0 with LP-FT (4 epochs) "
            "among 3 candidates (1 skipped); its probe estimate was 95.1% ± 1.6 on 720 images.</li>") in html
    assert html.index("id='findings'") < html.index("<h2 id='auto'>How this model was chosen</h2>") \
        < html.index("<h2>Learning curves</h2>")
    numbers = json.loads((run / "report.json").read_text())
    assert numbers["auto"]["winner"] == 0 and numbers["auto_note"] is None
    assert [c["winner"] for c in numbers["auto"]["candidates"]] == [True, False, False]


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_section_in_chromium(run, tmp_path):
    """In a real browser: no script runs (the <script> in a model name is text), nothing external is loaded, and the
    section's parts are there."""
    if chromium() is None:
        if required():
            pytest.fail("chromium is not installed; CI must run the browser test (.ci/run installs it with apt)")
        pytest.skip("chromium not installed (apt-get install chromium); CI=true makes this a failure")
    page(run, AUTO)
    shown = open_page(run / "report.html", tmp_path / "report.png")
    assert shown["errors"] == [] and shown["console"] == [] and shown["external"] == []
    assert ["auto", "auto-candidates", "auto-reasons", "auto-budget"] == [
        i for i in shown["ids"] if i.startswith("auto")]


def test_a_run_without_auto_json_has_no_section(run):
    html = page(run, None)
    assert "How this model was chosen" not in html and "auto-note" not in html and "finetune auto" not in html
    assert json.loads((run / "report.json").read_text())["auto"] is None


def test_a_missing_recipe_file_and_an_unrecorded_one_are_said(run):
    html = page(run, AUTO)
    assert (f"<p class='warn'>Rerun it without the search: <code>finetune train --recipe {run}/recipe.yaml</code> "
            "(that file is missing from the run directory).</p>") in html
    html = page(run, {**AUTO, "recipe": None})
    assert "<p class='muted'>The recipe that reruns this model was not recorded.</p>" in html


@pytest.mark.parametrize("content, why", [
    (b"not json {", "not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    (b"[1, 2]", "a JSON list, not the object finetune auto writes"),
    (b'"auto"', "a JSON str, not the object finetune auto writes"),
    (b"null", "a JSON NoneType, not the object finetune auto writes"),
    (b"\xff\xfe\x00{", None),  # not UTF-8: json's own message
    (b"[" * 100_000 + b"]" * 100_000, None),  # nested past the recursion limit
])
def test_an_auto_json_that_is_not_an_object_is_a_note(run, content, why):
    html = page(run, content)
    note = json.loads((run / "report.json").read_text())["auto_note"]
    assert note.startswith("auto.json is left out of this report (") and note.endswith(").")
    if why is not None:
        assert note == f"auto.json is left out of this report ({why})."
    assert f"<p class='muted' id='auto-note'>{note}</p>" in html
    assert "How this model was chosen" not in html and "<h2>Learning curves</h2>" in html


def test_an_auto_json_that_cannot_be_read_is_a_note(run):
    (run / "auto.json").mkdir()
    html = page(run, None)
    assert ("<p class='muted' id='auto-note'>auto.json is left out of this report (unreadable: Is a directory)."
            "</p>") in html


BROKEN = [
    {},
    {"candidates": {"a": 1}, "winner": True, "stages": [1, 2], "reasons": "one text", "data": "all"},
    {"candidates": [{}, None, 3, {"model": ["x"], "acc": "high", "ci": [0.1], "n": -3, "knn": [1],
                                   "parameters": 1e400, "seconds": float("nan"), "winner": "yes"}],
     "winner": 7, "budget_seconds": -5, "seconds": 10 ** 400, "epochs": 2.5, "strategy": {"a": 1}},
    {"candidates": [{"model": "m", "acc": 2.0, "n": 10 ** 30, "ci": ["a", "b"], "knn": {"x": 0.5, "3": "y"},
                     "status": 5, "images_per_sec": -1, "winner": True}], "budget_seconds": 0,
     "stages": {"probe": None, "train": 1e400}},
    {"candidates": [{"model": "\udc80<i>", "weights": "a\u0000b", "winner": True}], "reasons": ["\ud800", 5, None],
     "recipe": "r\u0000.yaml", "estimate": "`", "strategy": "\n"},
]


@pytest.mark.parametrize("auto", BROKEN)
def test_keys_missing_or_of_the_wrong_type_still_give_the_section(run, auto):
    html = page(run, auto)
    assert "<h2 id='auto'>How this model was chosen</h2>" in html and "auto-note" not in html
    assert "<h2>Learning curves</h2>" in html


def test_a_section_that_cannot_be_written_is_a_note_and_the_report_goes_on(run, monkeypatch):
    """The last guard: normalise checks every type, but should one slip through, the report still comes."""
    def boom(c):
        raise KeyError("acc")

    monkeypatch.setattr(D, "_cells", boom)
    monkeypatch.setattr(D, "estimate_text", boom)
    html = page(run, AUTO)
    assert ("<p class='muted' id='auto-note'>auto.json is left out of this report (it could not be shown: KeyError)."
            "</p>") in html
    assert "<ul id='findings'><li>Val accuracy" in html and "<h2>Learning curves</h2>" in html


def test_lone_surrogates_and_nul_characters_are_shown_escaped():
    a = D.normalise(BROKEN[4])
    assert a["candidates"][0]["model"] == "\\udc80<i>" and a["reasons"] == ["\\ud800", "5"]
    html = D.auto_html(a, None, "RUN")
    html.encode("utf-8")  # writable
    assert "<b>\\udc80&lt;i&gt;</b>" in html and "<li>\\ud800</li><li>5</li>" in html
    assert "<p class='warn'>Rerun it without the search: <code>finetune train --recipe " in html


def test_broken_candidates_are_shown_as_what_is_known():
    a = D.normalise(BROKEN[2])
    assert [c["model"] for c in a["candidates"]] == [None, None]  # the list and the number are not candidates
    assert a["winner"] is None and a["seconds"] is None and a["epochs"] is None and a["strategy"] is None
    assert D._cells(a["candidates"][1]) == ["?", "-", "-", "-", "-", "-", "-", "-", "-"]
    assert D.auto_fact(a) is None  # no winner: no findings line
    assert D.budget_text(a) == "total time not recorded."
    b = D.normalise(BROKEN[3])
    assert b["winner"] == 0 and b["stages"] == {} and b["budget_seconds"] == 0.0
    c = b["candidates"][0]
    assert c["status"] == "5" and c["knn"] == {"x": 0.5} and c["ci"] is None and c["n"] is None
    assert D.estimate_text(c) == "200.0%"  # shown as written: no interval without n or ci
    assert D._note(c) == "5 (its estimate: 200.0%)"  # a status other than ok: said across the row
    assert D.auto_fact(b) == "`finetune auto` chose m with an unrecorded strategy among 1 candidate; its probe " \
                             "estimate was 200.0%."


def test_the_winner_is_the_flagged_candidate_when_auto_json_has_no_index():
    a = copy.deepcopy(AUTO)
    a["winner"] = None
    a["candidates"][0]["winner"], a["candidates"][1]["winner"] = False, True
    assert D.normalise(a)["winner"] == 1
    a["candidates"][1]["winner"] = False
    n = D.normalise(a)
    assert n["winner"] is None and "recorded no winner.</p>" in D.auto_html(n, None, "RUN")


@pytest.mark.parametrize("seconds, budget, text", [
    (812.3, 900.0, "total 812.3 s of a 900.0 s budget: within budget (90% used)."),
    (900.0, 900.0, "total 900.0 s of a 900.0 s budget: within budget (100% used)."),
    (913.5, 900.0, "total 913.5 s of a 900.0 s budget: over by 1.5% (13.5 s more)."),
    (1200.0, 900.0, "total 1,200 s of a 900.0 s budget: over by 33% (300.0 s more)."),
    (812.3, None, "total 812.3 s (no time budget)."),
    (None, 900.0, "total 802.3 s (the stages' sum) of a 900.0 s budget: within budget (89% used)."),
])
def test_the_budget_line(seconds, budget, text):
    a = D.normalise({"seconds": seconds, "budget_seconds": budget, "stages": {"probe": 310.2, "decide": 12.0,
                                                                            "train": 480.1}})
    assert D.budget_text(a) == "probe 310.2 s · decide 12.0 s · train 480.1 s; " + text


def test_estimates_and_strategies_in_words():
    c = D.normalise(AUTO)["candidates"][0]
    assert D.estimate_text(c) == "95.1% ± 1.6"  # the Wilson half width on n, as pm_text everywhere
    assert D.estimate_text({**c, "n": None, "ci": [0.931, 0.965]}) == "95.1% ± 1.7"  # half the recorded interval
    assert D.estimate_text({**c, "acc": None}) == "-"
    for strategy, epochs, text in (("lp-ft", 4, "LP-FT (4 epochs)"), ("linear-probe", 1, "a linear probe (1 epoch)"),
                                   ("Linear-Probe", None, "a linear probe"), ("full", 3, "full (3 epochs)"),
                                   (None, 3, "an unrecorded strategy")):
        assert D.strategy_text({"strategy": strategy, "epochs": epochs}) == text


def test_an_auto_json_too_large_to_be_finetunes_is_left_unread(run, monkeypatch):
    monkeypatch.setattr(D, "MAX_BYTES", 100)
    html = page(run, AUTO)
    size = (run / "auto.json").stat().st_size
    assert (f"<p class='muted' id='auto-note'>auto.json is left out of this report ({size:,} bytes, more than "
            "finetune auto writes).</p>") in html
