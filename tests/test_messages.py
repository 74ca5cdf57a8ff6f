"""The messages a new user reads (issue #30, items 5, 6 and 9): exact texts."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from finetune.cli.progress import RichReporter, duration
from finetune.errors import flag_names, how_to_set, option, stopped_line, suggest

# ------------------------------------------------------------------- progress lines without a terminal (item 6)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _reporter(clock: Clock, every: float = 30) -> RichReporter:
    return RichReporter(console=Console(file=io.StringIO()), every=every, clock=clock)  # not a terminal


def _run(epochs: int, until: int | None = None):
    feats = None if until is None else SimpleNamespace(until=until)
    return SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(epochs=epochs)), feats=feats)


def _epoch(rep, run, clock, epoch, phase="full model", batches=10, per_batch=10.0, val=10.0, first=0,
           val_batches=2):
    rep.on_epoch_start(run, epoch, SimpleNamespace(name=phase, train_loader=range(batches)))
    for i in range(first, batches):
        clock.t += per_batch
        rep.on_train_batch_end(i, batches, 0.5 + i / 100, 0.25 + i / 100, 3.14)
    rep.on_eval_start(val_batches)
    for i in range(val_batches):
        clock.t += val / val_batches
        rep.on_eval_batch(i, val_batches)
    rep.on_epoch_end(run, {"epoch": epoch + 1, "train_loss": 0.5, "train_acc": 0.5, "val_loss": 0.4, "val_acc": 0.6,
                           "lr": 0.01, "seconds": per_batch * batches, "images_per_sec": 3.2})


def test_without_a_terminal_a_progress_line_with_the_eta_comes_every_30_seconds(capsys):
    clock = Clock()
    rep, run = _reporter(clock), _run(3)
    _epoch(rep, run, clock, 0)
    _epoch(rep, run, clock, 1, per_batch=5.0)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        # 30 s into epoch 1: 3 of 10 batches in 30 s -> 70 s left; each later epoch like this one (100 s)
        "epoch 1/3  batch 3/10 (30%)  loss 0.5200  acc 27.0%  3.1 img/s  ETA epoch 1m10s, run 4m30s",
        "epoch 1/3  batch 6/10 (60%)  loss 0.5500  acc 30.0%  3.1 img/s  ETA epoch 40s, run 4m00s",
        "epoch 1/3  batch 9/10 (90%)  loss 0.5800  acc 33.0%  3.1 img/s  ETA epoch 10s, run 3m30s",
        "epoch 1/3  train loss 0.5000 acc 50.0%  val loss 0.4000 acc 60.0%  lr 0.01  100.0s 3 img/s",
        # epoch 2 at 5 s a batch; the last epoch is counted at epoch 1's measured 110 s (validation included)
        "epoch 2/3  batch 6/10 (60%)  loss 0.5500  acc 30.0%  3.1 img/s  ETA epoch 20s, run 2m10s",
        "epoch 2/3  train loss 0.5000 acc 50.0%  val loss 0.4000 acc 60.0%  lr 0.01  50.0s 3 img/s",
    ]


def test_a_long_validation_gets_progress_lines_too_and_short_epochs_print_only_their_row(capsys):
    clock = Clock()
    rep, run = _reporter(clock), _run(1)
    _epoch(rep, run, clock, 0, batches=2, per_batch=1.0, val=80.0, val_batches=4)
    assert capsys.readouterr().err.splitlines() == [
        "epoch 1/1  validating: batch 2/4 (50%)",  # 20 s a batch: at 42 s and 82 s, not at the last batch
        "epoch 1/1  train loss 0.5000 acc 50.0%  val loss 0.4000 acc 60.0%  lr 0.01  2.0s 3 img/s"]
    _epoch(rep, run, clock, 0, batches=2, per_batch=1.0, val=2.0)
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_the_run_eta_is_left_out_while_the_cached_head_trains_and_a_resumed_epoch_counts_its_own_batches(capsys):
    clock = Clock()
    rep = _reporter(clock, every=20)
    _epoch(rep, _run(3, until=1), clock, 0, phase="cached head", batches=4)  # the full model's epochs: unknown yet
    _epoch(rep, _run(3, until=1), clock, 1, batches=10, first=6)  # resumed at batch 7 of 10
    lines = capsys.readouterr().err.splitlines()
    assert [ln for ln in lines if "train loss" not in ln] == [
        "epoch 1/3  batch 2/4 (50%)  loss 0.5100  acc 26.0%  3.1 img/s  ETA epoch 20s",
        "epoch 1/3  validating: batch 1/2 (50%)",
        # 2 batches in 20 s since the resume: 20 s left, and the last epoch's 10 batches at that pace
        "epoch 2/3  batch 8/10 (80%)  loss 0.5700  acc 32.0%  3.1 img/s  ETA epoch 20s, run 2m00s",
        "epoch 2/3  validating: batch 1/2 (50%)"]


def test_quiet_prints_nothing_and_the_interval_comes_from_the_environment(capsys, monkeypatch):
    from finetune.errors import ConfigError

    clock = Clock()
    rep = RichReporter(quiet=True, console=Console(file=io.StringIO()), every=1, clock=clock)
    _epoch(rep, _run(1), clock, 0)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("FINETUNE_PROGRESS_SECONDS", "2.5")
    assert RichReporter(console=Console(file=io.StringIO())).every == 2.5
    monkeypatch.setenv("FINETUNE_PROGRESS_SECONDS", "soon")
    with pytest.raises(ConfigError) as e:
        RichReporter(console=Console(file=io.StringIO()))
    assert str(e.value) == "FINETUNE_PROGRESS_SECONDS must be a positive number of seconds, got 'soon'"


def test_durations():
    assert [duration(s) for s in (0, 44.6, 60, 250, 3599, 3600, 3900, 90000)] == \
        ["0s", "45s", "1m00s", "4m10s", "59m59s", "1h00m", "1h05m", "25h00m"]



def test_the_closing_line_of_train_gives_the_best_accuracy_with_its_interval(capsys):
    """Item 3: the end of `finetune train` names best.pt's val accuracy ± the noise of the run's val images (240
    images at 96.7%: ± 2.4 points), as runs/eval/report do; a run without a val count shows the accuracy alone."""
    rep = RichReporter(console=Console(file=io.StringIO()))
    rep.start({"run_dir": "runs/x", "model": "m", "weights": "default", "trainable": 1, "total": 2, "source": "d",
               "train_images": 720, "val_images": 240, "classes": ["a", "b"], "device": "cpu", "precision": "fp32",
               "channels_last": False, "start_epoch": 0})
    rows = [{"epoch": e, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.4, "val_acc": 232 / 240, "lr": 0.001,
             "seconds": 0.1, "images_per_sec": 7000.0} for e in (1, 2)]
    rep.on_run_end(SimpleNamespace(run_dir="runs/x", best={"epoch": 2, "val_acc": 232 / 240}, history=rows))
    assert capsys.readouterr().out.splitlines()[-1] == (
        "best: epoch 2, val acc 96.7% ± 2.4 (95%, 240 val images); checkpoints and TensorBoard logs in runs/x")
    rep.table({"run_dir": "runs/x", "best": {"epoch": 2, "val_acc": 232 / 240}, "epochs": rows})
    assert capsys.readouterr().out.splitlines()[-1] == (
        "best: epoch 2, val acc 96.7%; checkpoints and TensorBoard logs in runs/x")

# ------------------------------------------------------------------------------------------ suggestions (item 9f)


def test_names_that_complete_the_typed_prefix_come_first():
    lite = [f"tf_efficientnet_lite{i}" for i in (4, 3, 2, 1, 0)] + ["tf_efficientnet_b0", "efficientnet_lite0"]
    assert suggest("tf_efficientnet_lite", lite) == (" (did you mean 'tf_efficientnet_lite0', "
                                                     "'tf_efficientnet_lite1', 'tf_efficientnet_lite2'?)")
    assert suggest("resnet", ["resnet101", "resnet50", "resnet18", "seresnet50"], n=2) == \
        " (did you mean 'resnet18', 'resnet50'?)"
    assert suggest("epoch", ["epochs", "seed"]) == " (did you mean 'epochs'?)"
    # no prefix match: difflib's ranking, as before
    assert suggest("layr1", ["layer1", "layer2", "conv1"], n=1) == " (did you mean 'layer1'?)"


def test_timm_lite_prefix_suggests_lite0_first():
    timm = pytest.importorskip("timm")
    assert suggest("tf_efficientnet_lite", timm.list_models()) == (
        " (did you mean 'tf_efficientnet_lite0', 'tf_efficientnet_lite1', 'tf_efficientnet_lite2'?)")


# ------------------------------------------------------------------------------------ a stop is no error (item 9c)


def test_a_stop_reads_as_one_stopped_line():
    assert stopped_line("interrupted; nothing was written") == "Stopped; nothing was written"
    assert stopped_line("interrupted before the first checkpoint; nothing to resume in 'r'") == \
        "Stopped before the first checkpoint; nothing to resume in 'r'"
    assert stopped_line("the job ended") == "Stopped: the job ended"


def test_ctrl_c_in_train_prints_stopped_and_exits_130(cli, monkeypatch, tmp_path):
    from finetune import api
    from finetune.errors import Interrupted

    def stop(*a, **k):
        raise Interrupted(f"interrupted; the last checkpoint is in '{tmp_path}': continue with finetune train "
                          f"--resume {tmp_path}")

    monkeypatch.setattr(api, "train", stop)
    r = cli("train", "--quiet", "--out", tmp_path / "o")
    assert r.exit_code == 130
    assert r.stderr == (f"Stopped; the last checkpoint is in '{tmp_path}': continue with finetune train --resume "
                        f"{tmp_path}\n")


def test_a_stopped_nproc_worker_reads_as_stopped_too(cli, monkeypatch):
    from finetune.parallel.launcher import WorkerError

    def stopped(*a, **k):
        raise WorkerError("interrupted; nothing was written", 130)

    monkeypatch.setattr("finetune.api.train", stopped)
    r = cli("train", "--quiet")
    assert r.exit_code == 130 and r.stderr == "Stopped; nothing was written\n"



@pytest.mark.parametrize("command", [("eval", "run/best.pt"), ("runs",)])
def test_ctrl_c_outside_a_run_reads_as_stopped_too(cli, monkeypatch, command):
    """A Ctrl-C in eval (or any command without a run's stop handling) is a stop, not click's 'Aborted.'."""
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("finetune.api.evaluate_checkpoint", ctrl_c)
    monkeypatch.setattr("finetune.api.list_runs", ctrl_c)
    r = cli(*command)
    assert r.exit_code == 130 and r.stderr == "Stopped.\n" and r.stdout == ""

# ------------------------------------------------------------ settings named for the caller: flag or key (item 9h)


def test_messages_name_a_key_in_library_use_and_its_flag_under_the_cli():
    assert option("model.weights") == "model.weights" and option("model.weights", "none") == "model.weights='none'"
    assert how_to_set("model.weights") == "set model.weights"
    with flag_names(lambda: {"model.weights": "--weights"}):
        assert option("model.weights") == "--weights" and option("model.weights", "none") == "--weights none"
        assert how_to_set("model.weights") == "pass --weights"
        assert option("train.nothing") == "train.nothing"
    assert option("model.weights") == "model.weights"


# ------------------------------------------------------ the recipe's description after --model (item 9g)


@pytest.fixture
def ran(monkeypatch):
    """The recipe `finetune train` would run (api.train replaced: nothing trains)."""
    seen = []
    monkeypatch.setattr("finetune.api.train", lambda r, **kw: seen.append(r))
    return seen


@pytest.mark.parametrize("args, name, description", [
    (["--recipe", "full-finetune", "--model", "timm:tf_efficientnet_lite0"], "full-finetune (model overridden)",
     "timm:tf_efficientnet_lite0 (ImageNet weights), all trainable, backbone at 0.1x the head's LR -- model "
     "overridden: timm:tf_efficientnet_lite0 instead of resnet18"),
    (["--recipe", "linear-probe", "--model", "resnet18d"], "linear-probe (model overridden)",
     "pretrained backbone frozen, only the new head trained (AdamW, on cached features) -- model overridden: "
     "resnet18d instead of resnet18"),
    (["--model", "timm:tf_efficientnet_lite0"], "lp-ft",
     "pretrained backbone; head first on cached features (1 epoch), then all layers at 0.1x LR (LP-FT)"),
    (["--model", "resnet18", "--freeze-backbone"], "resnet18-cli",
     "resnet18 from its pretrained weights, configured from the command line"),
    (["--model", "resnet18", "--weights", "none"], "resnet18-cli",
     "resnet18 from random init, configured from the command line"),
    (["--model", "resnet18", "--weights", "w.pth", "--freeze-first", "3"], "resnet18-cli",
     "resnet18 from weights 'w.pth', configured from the command line"),
])
def test_the_description_names_the_model_that_runs(cli, ran, args, name, description):
    r = cli("train", "--quiet", *args)
    assert r.exit_code == 0, r.stderr
    assert (ran[0].model.name, ran[0].name, ran[0].description) == (args[args.index("--model") + 1], name,
                                                                    description)


def _warnings(fn) -> list[str]:
    import logging

    records: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("finetune")
    h = H(level=logging.WARNING)
    log.addHandler(h)
    try:
        fn()
    finally:
        log.removeHandler(h)
    return records


def test_the_random_init_warning_says_weights_to_a_python_user_and_the_flag_under_the_cli():
    from finetune.run.assemble import warn_plan

    cfg = SimpleNamespace(freeze=SimpleNamespace(schedule=[]), train=SimpleNamespace(epochs=1))
    warn = lambda: warn_plan(cfg, SimpleNamespace(weights="none"), SimpleNamespace(frozen=["a", "b"]), False)  # noqa
    text = "2 parameter tensors are frozen at random init (weights: none): they will stay random; {} (pretrained " \
           "or a file) or drop the freeze plan"
    assert _warnings(warn) == [text.format("set model.weights")]
    with flag_names({"model.weights": "--weights"}):
        assert _warnings(warn) == [text.format("pass --weights")]


def test_the_cache_note_names_the_setting_not_a_flag_the_user_never_typed():
    """lp-ft sets cache_features: on; the note says so and what changes it, under the CLI by its flag."""
    from finetune.cli.options import flag_map
    from finetune.speedups.feature_cache import forced_note

    forced = ["augment light is random; the cache uses the eval transform", "mixup/cutmix mixes the images"]
    tail = "; ".join(forced)
    assert forced_note([]) == ""
    with flag_names(flag_map):
        assert forced_note(forced) == (f"; {tail} (cache_features: on; with --cache-features auto this run would "
                                       "train without the cache)")
    assert forced_note(forced) == (f"; {tail} (cache_features: on; with train.cache_features='auto' this run would "
                                   "train without the cache)")


# ------------------------------------------------------------------- a file that is no checkpoint (item 9d)


@pytest.mark.parametrize("content", [b"hello\n", b"PK\x03\x04 not really a zip", bytes(range(256)) * 4])
def test_a_file_that_is_no_checkpoint_gets_one_clean_line(cli, tmp_path, content):
    p = tmp_path / "model.pt"
    p.write_bytes(content)
    r = cli("eval", p)
    assert r.exit_code == 1
    assert r.stderr == f"Error: cannot read checkpoint '{p}': not a PyTorch file or truncated\n"


# ------------------------------------------------------------- every error of a recipe at once (item 9e)


def test_a_bad_recipe_reports_all_its_errors_in_one_line_in_file_order(cli, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name: resnet18\n  weigths: default\ndata:\n  augment: heavy\noptimizer:\n  lr: -1\n"
                 "train:\n  epochs: 0\n  batch_size: 32\n", encoding="utf-8")
    r = cli("train", "--recipe", p)
    assert r.exit_code == 1
    assert r.stderr == (
        f"Error: recipe '{p}' has 4 errors: (1) line 3: unknown key 'model.weigths' (did you mean 'weights'?); "
        "valid keys in model: name, weights, num_classes, drop_rate, drop_path_rate; (2) line 5: data.augment must "
        "be one of none, light, strong, got 'heavy'; (3) line 7: optimizer.lr must be greater than 0, got -1.0; "
        "(4) line 9: train.epochs must be greater than 0, got 0\n")


def test_one_error_reads_as_before_and_several_flags_are_each_named(cli, tmp_path):
    r = cli("train", "--lr", "-1", "--out", tmp_path / "o")
    assert r.stderr == "Error: --lr: optimizer.lr must be greater than 0, got -1.0\n"
    r = cli("train", "--lr", "-1", "--epochs", "0", "--out", tmp_path / "o")
    assert r.exit_code == 1 and r.stderr == ("Error: the command has 2 errors: (1) --lr: optimizer.lr must be greater "
                                             "than 0, got -1.0; (2) --epochs: train.epochs must be greater than 0, "
                                             "got 0\n")


def test_library_errors_in_lists_sections_and_cross_checks_are_all_reported():
    from finetune import config
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config.from_dict({"freeze": {"schedule": [{"epoch": 0, "layers": ["a"]}, {"epoch": 2, "layers": 5}]},
                          "optimizer": {"momentum": "x"}})
    assert str(e.value) == ("the recipe has 3 errors: (1) freeze.schedule[0].epoch must be at least 1 (epochs count "
                            "from 1, as the logs do), got 0; (2) freeze.schedule[1].layers must be a list of strings, "
                            "got 5; (3) optimizer.momentum must be a number, got 'x'")
    assert [x.key for x in e.value.errors] == ["freeze.schedule[0].epoch", "freeze.schedule[1].layers",
                                               "optimizer.momentum"]
    with pytest.raises(ConfigError) as e:
        config.from_dict({"optimizer": {"lr": 0.01}, "scheduler": {"min_lr": 0.1, "warmup_epochs": 9},
                          "train": {"epochs": 2}})
    assert str(e.value) == ("the recipe has 2 errors: (1) scheduler.min_lr (0.1) must not be above optimizer.lr "
                            "(0.01): the schedule would raise the LR; (2) scheduler.warmup_epochs (9) must not be "
                            "more than train.epochs (2): the LR would never reach optimizer.lr")
    with pytest.raises(ConfigError) as e:
        config.from_dict({"train": {f"k{i}": 1 for i in range(12)}})
    assert str(e.value).startswith("the recipe has 12 errors: (1) unknown key 'train.k0'; valid keys in train: ")
    assert str(e.value).endswith("; and 2 more") and "(10) unknown key 'train.k9'" in str(e.value)


# ---------------------------------------------------------------------- predict: low confidence (item 5)


ROWS = [{"path": "p/bee.jpg", "name": "bee.jpg", "top": [{"label": "lined", "prob": 0.41}, {"label": "dotted",
                                                                                             "prob": 0.30}]},
        {"path": "p/zebra.jpg", "name": "zebra.jpg", "top": [{"label": "striped", "prob": 0.93},
                                                             {"label": "lined", "prob": 0.05}]},
        {"path": "p/nan.jpg", "name": "nan.jpg", "top": [{"label": "lined", "prob": float("nan")},
                                                         {"label": "dotted", "prob": float("nan")}]}]


@pytest.fixture
def predicted(monkeypatch):
    def fake(*a, min_confidence=None, **k):  # api.predict's marking; "auto" as for a checkpoint without val samples
        floor = 0.5 if min_confidence == "auto" else float(min_confidence or 0)
        marks = min_confidence not in (None, 0)
        return [{**r, **({"low_confidence": not r["top"][0]["prob"] >= floor, "min_confidence": floor}
                         if marks else {})} for r in ROWS]

    monkeypatch.setattr("finetune.api.predict", fake)


def test_predict_marks_low_confidence_in_the_table_with_a_closing_line(cli, predicted):
    r = cli("predict", "run/best.pt", "p", "-k", "2")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [
        "3 images",
        "image      #1             #2",
        "bee.jpg    lined 41.0%    dotted 30.0%  low confidence",
        "zebra.jpg  striped 93.0%  lined 5.0%",
        "nan.jpg    lined nan%     dotted nan%   low confidence",
        "2 of 3 predictions marked low confidence: top-1 probability below 50.0% (what 95% of the correctly "
        "classified val images reached): the image may belong to none of the model's classes, or look like several "
        "(--min-confidence P sets the threshold, 0 = off)"]
    r = cli("predict", "run/best.pt", "p", "-k", "2", "--min-confidence", "0.95")
    assert r.stdout.splitlines()[-1].startswith("3 of 3 predictions marked low confidence: top-1 probability below "
                                                "95.0% (--min-confidence):")
    r = cli("predict", "run/best.pt", "p", "-k", "2", "--min-confidence", "0")
    assert "low confidence" not in r.stdout and len(r.stdout.splitlines()) == 5


def test_predict_csv_and_json_say_low_confidence(cli, predicted):
    import json

    r = cli("predict", "run/best.pt", "p", "--csv", "--min-confidence", "0.4")
    assert r.stdout.splitlines() == ["image,label_1,prob_1,label_2,prob_2,low_confidence",
                                     "p/bee.jpg,lined,0.410000,dotted,0.300000,false",
                                     "p/zebra.jpg,striped,0.930000,lined,0.050000,false",
                                     "p/nan.jpg,lined,nan,dotted,nan,true"]
    r = cli("predict", "run/best.pt", "p", "--json")
    assert [(x["name"], x["low_confidence"]) for x in json.loads(r.stdout)] == [
        ("bee.jpg", True), ("zebra.jpg", False), ("nan.jpg", True)]


def test_min_confidence_is_a_probability(cli, predicted):
    r = cli("predict", "run/best.pt", "p", "--min-confidence", "50")
    assert r.exit_code == 1
    assert r.stderr == "Error: --min-confidence is auto or a probability from 0 to 1 (0 = off), got '50'\n"


def test_auto_confidence_floor_is_the_val_images_own():
    """auto: the 5% quantile of the top-1 probability over the correctly classified val images (a briefly trained
    linear probe is right at 25-40%: a fixed 50% marked every prediction of a 96.7% model)."""
    from finetune.api import FALLBACK_CONFIDENCE, confidence_floor

    conf = torch.tensor([0.2 + 0.01 * i for i in range(40)] + [0.99, 0.98])
    target = torch.tensor([0] * 42)
    pred = torch.tensor([0] * 40 + [1, 1])  # the two wrong ones are the most confident: not counted
    ckpt = {"val": {"samples": {"conf": conf, "target": target, "pred": pred}}}
    assert confidence_floor(ckpt) == pytest.approx(0.2 + 0.01 * int(0.05 * 39))
    assert confidence_floor({"val": {"samples": {"conf": conf[:10], "target": target[:10], "pred": pred[:10]}}}) \
        == FALLBACK_CONFIDENCE  # fewer than 20 right: too few to take a quantile of
    assert confidence_floor({"val": {"accuracy": 0.9}}) == confidence_floor({}) == FALLBACK_CONFIDENCE
