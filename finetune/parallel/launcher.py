"""``--nproc N``: errors from the torchrun workers reach the user once, as one line (no torch import at module level).

Without this, a mistake found inside the workers (a corrupt image under ``--strict``, a bad recipe value) printed
one ``Error:`` line per rank, then torchrun's log lines and its ``ChildFailedError`` traceback. Now:

- a worker that stops on a user error (a :class:`FinetuneError`) writes it to ``$FINETUNE_ERROR_DIR/rank-R.json``
  instead of printing it (:func:`report_worker_error`, called by the CLI);
- torchrun runs as ``python -m finetune.parallel.launcher`` (:func:`agent`): torchrun itself with its log lines off and
  its failure summary written to that folder instead of a traceback;
- the launcher then raises one error (:func:`run`): the first real error by time (a rank that torchrun stopped
  because another failed only reports "interrupted"), else rank 0's "interrupted" line (Ctrl-C, SIGTERM), else
  which process failed and how (a crash: its own output is above).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from finetune.errors import FinetuneError

ERROR_DIR = "FINETUNE_ERROR_DIR"
INTERRUPTED = 130


class WorkerError(FinetuneError):
    """A user error raised inside a ``--nproc`` worker, raised again in the launcher with the worker's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def report_worker_error(message: str, exit_code: int) -> bool:
    """In a worker of :func:`run` (``FINETUNE_ERROR_DIR`` and ``RANK`` set): record the error line for the launcher
    and return True (the caller prints nothing). Elsewhere False: the caller prints it as usual."""
    folder, rank = os.environ.get(ERROR_DIR), os.environ.get("RANK")
    if not folder or rank is None or not Path(folder).is_dir():
        return False
    record = {"rank": int(rank), "message": message, "exit_code": exit_code, "time": time.time()}
    tmp = Path(folder) / f".rank-{rank}.tmp"
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, Path(folder) / f"rank-{rank}.json")  # the launcher never reads half a record
    return True


def run(cmd: list[str], env: dict[str, str]) -> int:
    """Run the torchrun command ``cmd`` (see :func:`agent`) with a fresh error folder; returns its exit code, or
    raises the workers' error as one :class:`WorkerError`."""
    from finetune.parallel.signals import run_launcher

    with tempfile.TemporaryDirectory(prefix="finetune-errors-") as folder:
        rc = run_launcher(cmd, {**env, ERROR_DIR: folder})
        error = pick_error(Path(folder))
    if error is not None and rc != 0:
        raise WorkerError(error["message"], int(error.get("exit_code") or rc))
    return rc


def pick_error(folder: Path) -> dict | None:
    """The error to show: the earliest real one, else rank 0's (or the lowest rank's) "interrupted", else the
    agent's summary of a process that failed without a user error."""
    records = []
    for f in sorted(folder.glob("rank-*.json")):
        try:
            records.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):  # pragma: no cover - written with os.replace: whole or absent
            continue
    real = sorted((r for r in records if r["exit_code"] != INTERRUPTED), key=lambda r: (r["time"], r["rank"]))
    stopped = sorted((r for r in records if r["exit_code"] == INTERRUPTED), key=lambda r: r["rank"])
    if real or stopped:
        return (real or stopped)[0]
    agent_file = folder / "agent.json"
    return json.loads(agent_file.read_text(encoding="utf-8")) if agent_file.is_file() else None


def agent(argv: list[str]) -> int:
    """torchrun (``torch.distributed.run``) with ``argv``, minus its noise: its log lines (``Sending process ...
    closing signal``, ``failed (exitcode: 1)``) are off, and a failed worker ends it with exit code 1 and a one-line
    summary in the error folder rather than a ``ChildFailedError`` traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    for name in ["torch.distributed", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        main(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = (f"was killed by signal {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        _write_agent_error(f"training process {rank} of the --nproc job {how} (its output, if any, is above)")
        return 1
    except SignalException as e:  # SIGINT/SIGTERM forwarded by the launcher: the workers report "interrupted"
        return 128 + int(e.sigval)
    return 0


def _write_agent_error(message: str) -> None:
    folder = os.environ.get(ERROR_DIR)
    if folder and Path(folder).is_dir():
        (Path(folder) / "agent.json").write_text(json.dumps({"message": message, "exit_code": 1}), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(agent(sys.argv[1:]))
