"""Stopping a run from outside: SIGTERM takes Ctrl-C's path (the last checkpoint is kept, one line says how to
resume), and a ``--nproc`` launcher that is stopped (SIGTERM) or killed (SIGKILL) takes torchrun and every worker
with it: nothing keeps training into the run directory. (A --nproc launch from a folder holding its own
``finetune/``: tests/test_distributed.py, on the launch its ddp_run fixture makes anyway.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from finetune.run.checkpoint import load_checkpoint
from helpers import ROOT, cli_env, finetune_cmd, tiny_tree

ARGS = ("--model", "smallcnn", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--precision", "fp32",
        "--device", "cpu", "--no-tensorboard", "--quiet")


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped running; only its parent's wait() is missing


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_saves_and_exits_like_ctrl_c(tmp_path):
    data = tiny_tree(tmp_path / "data", per_class=16)
    run = tmp_path / "run"
    proc = subprocess.Popen(finetune_cmd("train", "--data", data, "--out", run, "--epochs", "200",
                                         "--save-every-steps", "1", *ARGS),
                            cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (run / "last.pt").is_file() or proc.poll() is not None, 120, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err  # Ctrl-C's code, not death by signal (-15)
    assert err.splitlines() == [f"Stopped; the last checkpoint is in '{run}': continue with finetune "
                                f"train --resume {run}"]
    ck = load_checkpoint(run / "last.pt")
    assert ck["epoch"] < 200


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_the_nproc_launcher_stops_every_worker(tmp_path, sig):
    data = tiny_tree(tmp_path / "data", per_class=16)
    run = tmp_path / "run"
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(finetune_cmd("train", "--nproc", "2", "--data", data, "--out", run, "--epochs", "500",
                                         *ARGS), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set[int] = set()
    try:
        _wait(lambda: (run / "config.yaml").is_file() or proc.poll() is not None, 180, "the workers to start")
        assert proc.poll() is None
        seen = _descendants(proc.pid)
        assert len(seen) >= 3  # torchrun and its two workers
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=60)
        _wait(lambda: not any(_alive(p) for p in seen), 45, "torchrun and the workers to exit")
        assert time.monotonic() - t0 < 25  # they stopped by themselves, before torchrun's 30 s SIGKILL grace
        size = (run / "last.pt").stat().st_mtime_ns if (run / "last.pt").exists() else None
        time.sleep(1.0)
        assert ((run / "last.pt").stat().st_mtime_ns if (run / "last.pt").exists() else None) == size
    finally:
        for p in seen:  # only the processes this test started
            if _alive(p):
                os.kill(p, signal.SIGKILL)
