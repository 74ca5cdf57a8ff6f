"""Crash safety end to end: SIGKILL a training process at random moments, resume each time, and get bitwise the
weights of an uninterrupted run (CPU, fp32, fixed seed, mid-epoch checkpoints every 2 optimizer steps).

20 kills by default (``FINETUNE_KILL_TRIALS`` changes it). Each trial is a real process forked from a server that
imported torch once (tests/forkserver.py: a fresh ``python -m finetune`` spends ~3 s on imports alone), and the
kill points come from a seeded RNG, in turns of three kinds: inside a file write after a random number of bytes
(a torn temp file of last.pt, best.pt, metrics.json or config.yaml), right after a random write is in place (between
the end-of-epoch writes), and a SIGKILL from outside a random time after a new save (mid-batch, mid-evaluation).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.run.checkpoint import load_checkpoint
from helpers import ROOT, cli_env, tiny_tree

KILLS = int(os.environ.get("FINETUNE_KILL_TRIALS", "20"))
EPOCHS = KILLS // 2 + 8  # a trial advances 1-4 optimizer steps (5 an epoch): the run outlasts the kills
ARGS = ("--model", "smallcnn", "--weights", "none", "--image-size", "32", "--epochs", str(EPOCHS),
        "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--seed", "3", "--save-every-steps", "2",
        "--no-tensorboard", "--no-report", "--quiet")


class ForkServer:
    """tests/forkserver.py in a subprocess: ``start`` forks a training process, ``wait`` returns its exit code."""

    def __init__(self, err: Path):
        self._err = open(err, "w")  # noqa: SIM115 - closed in close()
        # one thread: the same arithmetic in every process, and no OpenMP spinning on a loaded shared machine
        env = {**cli_env(), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True)

    def start(self, args: list[str], kill: dict | None = None) -> int:
        self.proc.stdin.write(json.dumps({"args": [str(a) for a in args], "kill": kill}) + "\n")
        self.proc.stdin.flush()
        return int(self._read("pid"))

    def wait(self) -> int:
        return int(self._read("exit"))

    def _read(self, word: str) -> str:
        line = self.proc.stdout.readline()
        assert line.startswith(word + " "), f"fork server: {line!r}"
        return line.split()[1]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._err.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_for_new_save(pid: int, last: Path, after: float, timeout: float = 60) -> bool:
    """Wait until ``last`` was replaced after ``after`` (mtime, ns); False when the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if last.is_file() and last.stat().st_mtime_ns > after:
            return True
        if not _alive(pid):
            return False
        time.sleep(0.005)
    raise AssertionError(f"no new {last.name} within {timeout} s")


def _plan(trial: int, rng: random.Random) -> dict | None:
    """The kill point of a trial: its N-th file write (N >= 3: a new run's 1st is config.yaml, its 2nd the first
    last.pt, so something is always left to resume), torn after B bytes or just in place; or a timed SIGKILL."""
    kind = ("bytes", "replace", "time")[trial % 3]
    if kind == "time":
        return None
    plan = {"kind": kind, "n": rng.randint(3, 5)}
    if kind == "bytes":
        plan["bytes"] = rng.randint(0, 600_000)  # last.pt is ~0.5 MB (weights + momentum); smaller files end sooner
    return plan


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path):
    data = tiny_tree(tmp_path / "data", per_class=16)
    server = ForkServer(tmp_path / "server.err")
    try:
        server.start(["train", "--data", data, "--out", tmp_path / "ref", *ARGS])  # the uninterrupted run
        assert server.wait() == 0, (tmp_path / "server.err").read_text()[-3000:]
        run = tmp_path / "run"
        last = run / "last.pt"
        rng = random.Random(1234)
        kills, seen_partial, kinds = 0, 0, []
        args = ["train", "--data", data, "--out", run, *ARGS]
        while kills < KILLS:
            plan = _plan(kills, rng)
            before = last.stat().st_mtime_ns if last.is_file() else -1
            pid = server.start(args, plan)
            if plan is None and _wait_for_new_save(pid, last, before):  # progress is made before every kill
                time.sleep(rng.uniform(0.0, 0.03))  # then any moment: mid-batch, mid-save, mid-evaluation
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            code = server.wait()
            assert code in (0, -signal.SIGKILL), (tmp_path / "server.err").read_text()[-3000:]
            if code == 0:
                pytest.fail(f"the run finished after only {kills} kills; make it longer")
            kills += 1
            kinds.append(plan["kind"] if plan else "time")
            ck = load_checkpoint(last)  # always loads: the previous or the new complete checkpoint
            seen_partial += "partial" in ck
            if ck["epoch"] == EPOCHS and "partial" not in ck:
                break  # the kill landed after the final save (while exiting): nothing left to resume
            args = ["train", "--resume", run, "--quiet"]
        ck = load_checkpoint(last)
        if ck["epoch"] < EPOCHS or "partial" in ck:  # (the last kill may land after the final save)
            server.start(args)
            assert server.wait() == 0, (tmp_path / "server.err").read_text()[-3000:]
    finally:
        server.close()
    assert kills == KILLS and seen_partial >= 1  # every kill landed before the end; some mid-epoch (skip-ahead)
    assert {k: kinds.count(k) for k in set(kinds)} == {k: (KILLS + 2 - i) // 3 for i, k in
                                                       enumerate(("bytes", "replace", "time"))}

    a = load_checkpoint(tmp_path / "ref" / "last.pt")
    b = load_checkpoint(last)
    assert b["epoch"] == a["epoch"] == EPOCHS and "partial" not in b
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [e["train_loss"] for e in a["metrics"]] == [e["train_loss"] for e in b["metrics"]]
    assert [e["val_acc"] for e in a["metrics"]] == [e["val_acc"] for e in b["metrics"]]
    assert json.loads((run / "metrics.json").read_text())["epochs"][-1]["epoch"] == EPOCHS  # repaired, whole
    assert (run / "best.pt").is_file() and load_checkpoint(run / "best.pt")["epoch"] == a["best"]["epoch"]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind
