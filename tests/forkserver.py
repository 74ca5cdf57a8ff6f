"""A pre-imported ``finetune`` that forks one real training process per request (tests/test_kill_resume.py).

Each kill-then-resume trial needs a new process, and a new ``python -m finetune`` spends ~3 s importing torch before
it trains; this server imports torch and finetune once (and runs no torch op, so no thread pool exists yet to be
broken by ``fork``), then forks a child per request that runs the CLI as ``python -m finetune`` would. A child is a
real process: SIGKILL ends it without any cleanup, and its lock on the run directory dies with it.

Protocol: stdin, one JSON object per line, ``{"args": [...], "kill": PLAN or null}``; stdout, ``pid N`` once the
child runs, then ``exit CODE`` (negative: the signal that ended it). Children's stdout goes to /dev/null (it would
corrupt the protocol), their stderr to this process's stderr.

A kill PLAN makes the child SIGKILL itself at an exact point of its file writes (every run file goes through
``finetune.run.checkpoint.atomic_write_bytes``): ``{"kind": "bytes", "n": N, "bytes": B}`` after B bytes of its N-th
write (mid-``torch.save``: a torn temp file; a shorter file: complete, not yet in place), ``{"kind": "replace",
"n": N}`` right after its N-th write is in
place (between ``last.pt``, ``best.pt`` and ``metrics.json``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import finetune.files as F
import finetune.cli.app  # noqa: F401 - with what a run imports, below: paid once, not per child
import finetune.run.runner  # noqa: F401
import finetune.cli.train_cmd  # noqa: F401
import finetune.data  # noqa: F401
import finetune.training.freeze  # noqa: F401
import finetune.models  # noqa: F401
import finetune.training.optim  # noqa: F401
import finetune.run.callbacks  # noqa: F401
import finetune.cli.progress  # noqa: F401
import finetune.speedups.feature_cache  # noqa: F401
import finetune.models.smallcnn  # noqa: F401
import PIL.Image  # noqa: F401
import PIL.PngImagePlugin  # noqa: F401
import torch._dynamo  # noqa: F401 - the first optimizer step imports it (sympy, ...): ~1 s
import torchvision.transforms  # noqa: F401 - the data transforms: ~2 s


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAfter:
    """A file object that SIGKILLs the process once ``limit`` bytes have been written through it."""

    def __init__(self, f, limit: int):
        self._f, self._left = f, limit

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) >= self._left:
            self._f.write(data[:self._left])
            self._f.flush()
            _die()
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _install(plan: dict) -> None:
    real, count = F.atomic_write_bytes, [0]

    def hooked(path, write):
        count[0] += 1
        if count[0] != plan["n"]:
            return real(path, write)
        if plan["kind"] == "bytes":  # (a shorter file: killed once it is written, before it is in place)
            real(path, lambda f: (write(_KillAfter(f, plan["bytes"])), _die()))
        real(path, write)
        _die()

    F.atomic_write_bytes = hooked


def _child(request: dict) -> int:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    if request.get("kill"):
        _install(request["kill"])
    from finetune.cli.app import main

    sys.argv = ["finetune", *request["args"]]
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report it, like the interpreter would
        traceback.print_exc()
        return 1
    return 0


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    serve()
