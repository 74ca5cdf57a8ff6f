"""Run directories (issue 13, critical 1-3): --overwrite empties only proven runs, the run state commits at
last.pt and best.pt/metrics.json are repaired from it, and one process writes a run directory at a time."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from finetune.run import checkpoint as ck
from finetune import config
from finetune.errors import CheckpointError
from finetune.run.runner import train


def recipe(data=None, **over):
    """``data``: a data folder (the ``mini_sample`` fixture: the runs here test files and rules, not learning)."""
    base = {"train.epochs": 2, "train.batch_size": 64, "train.precision": "fp32", "train.tensorboard": False,
            "data.augment": "none", "scheduler.name": "constant", **({"data.path": str(data)} if data else {})}
    return config.apply_overrides(config.load_recipe("default"), {**base, **over})


def test_overwrite_refuses_a_folder_with_config_yaml_and_other_files(tmp_path, cli):
    """A thesis folder that happens to hold a config.yaml is not a run: nothing in it is deleted."""
    out = tmp_path / "thesis"
    (out / "src").mkdir(parents=True)
    (out / "config.yaml").write_text("lr: 1\n")
    (out / "thesis.tex").write_text("\\documentclass{article}")
    (out / "src" / "main.py").write_text("print(1)")
    r = cli("train", "--epochs", "1", "--out", out, "--overwrite", "--quiet")
    assert r.exit_code == 1
    assert r.stderr == (f"Error: output directory '{out}' holds files a finetune run does not write ('src', "
                        "'thesis.tex'); refusing to delete it with --overwrite; choose another --out\n")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "src", "thesis.tex"]
    assert (out / "src" / "main.py").read_text() == "print(1)"


@pytest.mark.slow
def test_overwrite_empties_a_real_run_and_marks_new_ones(tmp_path, mini_sample):
    out = tmp_path / "run"
    train(recipe(mini_sample, **{"train.epochs": 1}), out=out)
    marker = (out / ck.MARKER).read_text()
    assert marker.startswith("finetune run directory; --overwrite may empty it\n")
    (out / "user-notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds files a finetune run does not write \\('user-notes.txt'\\)"):
        train(recipe(mini_sample, **{"train.epochs": 1}), out=out, overwrite=True)
    (out / "user-notes.txt").unlink()
    train(recipe(mini_sample, **{"train.epochs": 1}), out=out, overwrite=True)
    assert {"config.yaml", "metrics.json", "last.pt", "best.pt", ck.MARKER} <= {p.name for p in out.iterdir()}


def test_overwrite_refuses_a_symlinked_run(tmp_path, mini_sample):
    real = tmp_path / "real"
    train(recipe(mini_sample, **{"train.epochs": 1}), out=real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(CheckpointError, match="is a symbolic link; refusing to empty it"):
        train(recipe(mini_sample, **{"train.epochs": 1}), out=link, overwrite=True)
    assert (real / "last.pt").is_file()


@pytest.fixture
def killed_between_writes(tmp_path, monkeypatch, mini_sample):
    """A 1-epoch run 'killed' right after its last.pt (the commit point), before best.pt and metrics.json: the
    first epoch always improves, so best.pt must follow from last.pt. ``ref`` ran the same without a kill."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    train(recipe(mini_sample, **{"train.epochs": 1}), out=ref)
    real_save = ck.save_checkpoint

    def save(obj, path):
        real_save(obj, path)
        if path.name == "last.pt":
            raise SystemExit("killed")  # as a kill -9 right after the commit point

    monkeypatch.setattr(ck, "save_checkpoint", save)
    with pytest.raises(SystemExit):
        train(recipe(mini_sample, **{"train.epochs": 1}), out=out)
    monkeypatch.setattr(ck, "save_checkpoint", real_save)
    assert not (out / "best.pt").exists() and not (out / "metrics.json").exists()  # torn
    return out, ref


def _same_metrics(a, b):
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    return ja["best"] == jb["best"] and [[e[k] for k in keys] for e in ja["epochs"]] == \
        [[e[k] for k in keys] for e in jb["epochs"]]


@pytest.mark.slow
def test_resume_repairs_best_and_metrics_after_a_kill_between_writes(killed_between_writes):
    out, ref = killed_between_writes
    with pytest.raises(CheckpointError, match="nothing to resume: .* already finished 1 of 1 epochs"):
        train(None, resume=out)  # the final epoch: nothing to train, but the run is mended
    best, want = ck.load_checkpoint(out / "best.pt"), ck.load_checkpoint(ref / "best.pt")
    assert best["epoch"] == 1 and "optimizer" not in best and "scaler" not in best
    assert best["model"].keys() == want["model"].keys()
    assert all(torch.equal(best["model"][k], want["model"][k]) for k in want["model"])
    assert _same_metrics(out / "metrics.json", ref / "metrics.json")
    res = train(None, resume=out, epochs=2)  # and it continues as any run
    assert [e["epoch"] for e in res.epochs] == [1, 2]


@pytest.mark.slow
def test_eval_of_best_pt_repairs_it_too(killed_between_writes, cli):
    out, ref = killed_between_writes
    r = cli("eval", out / "best.pt", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == json.loads((ref / "metrics.json").read_text())["best"]["val_acc"]
    assert _same_metrics(out / "metrics.json", ref / "metrics.json")


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, mini_sample):
    """While a run trains, --overwrite (or --resume) of its directory from another process is an error."""
    out = tmp_path / "run"
    train(recipe(mini_sample, **{"train.epochs": 1}), out=out)
    code = ("import sys, time; from finetune.run import checkpoint as ck; l = ck.RunLock(); l.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ck.Path(ck.__file__).parents[2])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError) as e:
            train(recipe(mini_sample, **{"train.epochs": 1}), out=out, overwrite=True)
        assert str(e.value) == (f"run directory '{out}' is in use by another finetune process (pid {holder.pid}); "
                                "wait for it to finish or stop it, or choose another --out")
        assert (out / "last.pt").is_file()  # nothing was deleted
        with pytest.raises(CheckpointError, match=f"in use by another finetune process \\(pid {holder.pid}\\)"):
            train(None, resume=out, epochs=2)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    res = train(None, resume=out, epochs=2)  # the kernel dropped the dead holder's lock
    assert res.epochs[-1]["epoch"] == 2


def test_eval_and_resume_use_the_runs_data_from_any_folder(tmp_path, monkeypatch, caplog):
    """The run was started with the relative ``--data tiny``; eval and resume from another folder that holds another
    ``tiny/`` still use the run's images (the checkpoint stores the absolute path). When the run's val images
    change, resume refuses and eval warns."""
    import logging
    import shutil

    from finetune.api import evaluate_checkpoint
    from helpers import tiny_tree

    for sub in ("train", "val"):
        tiny_tree(tmp_path / "a" / "tiny" / sub, classes=("x", "y"), per_class=6 if sub == "train" else 3)
    other = tiny_tree(tmp_path / "b" / "tiny", classes=("x", "y"), per_class=5)  # another tiny/, no val folder
    shutil.rmtree(other / "y")
    tiny_tree(other, classes=("y", "x"), per_class=5)  # other images under the same class names
    monkeypatch.chdir(tmp_path / "a")
    r = recipe(**{"data.path": "tiny", "train.epochs": 1})
    train(r, out=tmp_path / "run")
    ckpt = ck.load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["data"]["root"] == str(tmp_path / "a" / "tiny") and ckpt["data"]["val_count"] == 6
    want = ckpt["val"]["accuracy"]

    monkeypatch.chdir(tmp_path / "b")
    res = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert (res["n"], res["accuracy"], res["data"]) == (6, want, str(tmp_path / "a" / "tiny"))
    out = train(None, resume=tmp_path / "run", epochs=2)
    assert [e["epoch"] for e in out.epochs] == [1, 2]

    (tmp_path / "a" / "tiny" / "val" / "x" / "x_000.png").unlink()
    with pytest.raises(CheckpointError) as e:
        train(None, resume=tmp_path / "run", epochs=3)
    assert str(e.value) == (f"cannot resume: the validation images in '{tmp_path / 'a' / 'tiny'}' are not the ones "
                            "this run validated on (6 images then, 5 now, or renamed); restore them, or start a new "
                            f"run from '{tmp_path / 'run' / 'config.yaml'}'")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")["n"] == 5
    assert f"the validation images in '{tmp_path / 'a' / 'tiny'}' differ from the ones the run validated on (6 " \
        "images then, 5 now, or renamed); the accuracy is not comparable with the one training recorded" in \
        [rec.getMessage() for rec in caplog.records]


@pytest.mark.slow
def test_resume_with_fewer_epochs_than_done_is_an_error(tmp_path, cli, mini_sample):
    """A run stopped mid-epoch 3 (2 epochs done, a partial third): ``--resume --epochs 2`` (or 1) would train
    nothing and exit 0; it is an error, and nothing in the run changes."""
    train(recipe(mini_sample, **{"train.epochs": 2}), out=tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    state = ck.load_checkpoint(last)
    state["recipe"]["train"]["epochs"] = 4
    ck.save_checkpoint({**state, "partial": {"batches": 2, "loss_sum": 1.0, "correct": 1, "seen": 2,
                                             "rng": torch.get_rng_state()}}, last)
    before = last.read_bytes()
    for n in (2, 1):
        r = cli("train", "--resume", tmp_path / "run", "--epochs", n, "--quiet")
        assert r.exit_code == 1
        assert r.stderr == (f"Error: cannot resume with --epochs {n}: '{tmp_path / 'run'}' has already trained 2 "
                            "epochs (and part of epoch 3); pass --epochs N with N > 2\n")
    assert last.read_bytes() == before


@pytest.mark.slow
def test_resuming_a_ddp_run_in_one_process_says_the_global_batch_changes(tmp_path, caplog, mini_sample):
    import logging

    train(recipe(mini_sample, **{"train.epochs": 1}), out=tmp_path / "run")
    last = tmp_path / "run" / "last.pt"
    ck.save_checkpoint({**ck.load_checkpoint(last), "world_size": 2}, last)  # as a --nproc 2 run writes it
    with caplog.at_level(logging.WARNING, logger="finetune"):
        train(None, resume=tmp_path / "run", epochs=2)
    assert "resuming a run trained with 2 processes in 1: the global batch changes from 128 to 64 (--batch-size is " \
        "per process), so the result differs from an uninterrupted run; resume with --nproc 2 to keep it" in \
        [r.getMessage() for r in caplog.records]


def _tiny_run(tmp_path, name, classes, epochs=1):
    from helpers import tiny_tree

    data = tiny_tree(tmp_path / f"data-{name}", classes=classes, per_class=6)
    train(recipe(**{"data.path": str(data), "train.epochs": epochs, "train.batch_size": 8}), out=tmp_path / name)
    return tmp_path / name


def test_a_best_pt_of_another_model_is_replaced_or_refused(tmp_path, cli):
    """last.pt copied in from another run (other classes): when last.pt's epoch is its best, best.pt is rewritten
    from it (before, the other model's best.pt stayed, and `eval best.pt` evaluated it); when its best is an older
    epoch, best.pt cannot be rebuilt: resume is one error line and nothing changes."""
    a = _tiny_run(tmp_path, "a", ("a", "b", "c"))  # best.pt: epoch 1
    b1 = _tiny_run(tmp_path, "b1", ("x", "y"))
    (a / "last.pt").write_bytes((b1 / "last.pt").read_bytes())  # epoch 1, the best: best.pt follows from it
    assert ck.repair_run(a) == ["best.pt", "metrics.json"]
    assert ck.load_checkpoint(a / "best.pt")["class_names"] == ["x", "y"]

    b = _tiny_run(tmp_path, "b", ("x", "y"), epochs=2)
    state = ck.load_checkpoint(b / "last.pt")
    a2 = _tiny_run(tmp_path, "a2", ("a", "b", "c"))
    state["best"] = {"epoch": 1, "val_acc": state["metrics"][0]["val_acc"]}
    ck.save_checkpoint(state, a2 / "last.pt")  # its best is epoch 1, whose weights it no longer has
    before = {p.name: p.read_bytes() for p in a2.iterdir() if p.is_file()}
    r = cli("train", "--resume", a2, "--epochs", 3, "--quiet")
    assert r.exit_code == 1
    assert r.stderr == (f"Error: '{a2 / 'best.pt'}' holds another model (smallcnn, classes ['a', 'b', 'c']) than "
                        "last.pt (smallcnn, classes ['x', 'y']), and its best epoch cannot be rebuilt from last.pt; "
                        "move best.pt away, then resume\n")
    assert {p.name: p.read_bytes() for p in a2.iterdir() if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_kill_during_the_very_first_write_leaves_a_run_that_overwrite_replaces(tmp_path, cli):
    """SIGKILL inside the first atomic write of a new run (config.yaml, after the marker): what is left is a run
    that saved no checkpoint: --out says to pass --overwrite, --resume says there is no last.pt, and --overwrite
    replaces it (before the marker, the folder held only a hidden temp file and all three refused)."""
    from helpers import ROOT, cli_env, tiny_tree

    data = tiny_tree(tmp_path / "data", per_class=6)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--model", "smallcnn", "--weights", "none", "--epochs",
            "1", "--batch-size", "8", "--no-tensorboard", "--no-report", "--quiet"]
    kill_in_first_write = (
        "import os, signal, sys\nimport finetune.files as F\nreal = F.atomic_write_bytes\n"
        "def hooked(path, write):\n"
        "    real(path, lambda f: (f.write(b'partial'), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))\n"
        "F.atomic_write_bytes = hooked\nfrom finetune.cli.app import main\nsys.argv = ['finetune', *sys.argv[1:]]\n"
        "main()\n")
    p = subprocess.run([sys.executable, "-c", kill_in_first_write, *args], cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    left = sorted(x.name for x in run.iterdir())
    assert ".finetune-run" in left and [n for n in left if n.startswith(".config.yaml.") and n.endswith(".tmp")], left
    r = cli(*args[:-1])
    assert r.exit_code == 1 and r.stderr == (f"Error: output directory '{run}' holds a run that saved no checkpoint; "
                                             "pass --overwrite to replace it or choose another --out\n")
    r = cli("train", "--resume", run)
    assert r.exit_code == 1 and r.stderr == (f"Error: cannot resume: '{run / 'last.pt'}' not found; --resume takes a "
                                             "run directory that holds last.pt\n")
    r = cli(*args, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert ck.load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not [n.name for n in run.iterdir() if n.name.endswith(".tmp")]
