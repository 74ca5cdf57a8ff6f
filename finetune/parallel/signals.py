"""Stopping a run from outside (no torch import; a leaf module).

- SIGTERM (``kill``, systemd, a batch scheduler's pre-emption) takes the same path as Ctrl-C: the run stops, the
  last checkpoint stays, one line says how to resume (:func:`sigterm_as_interrupt`). ``probe``, ``lr-find`` and
  ``export`` do the same: their temp files and partial output are removed, one line, exit 130
  (:func:`interrupted_as`).
- ``finetune train --nproc N`` runs torchrun in its own session and forwards SIGINT/SIGTERM/SIGHUP to it; torchrun
  passes them to its workers. If the launcher dies without a word (SIGKILL), the kernel sends torchrun SIGTERM
  (``PR_SET_PDEATHSIG``), and every worker gets SIGKILL when torchrun itself dies, so no process keeps training
  into the run directory (:func:`run_launcher`, :func:`die_with_parent`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from finetune.errors import Interrupted

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; a no-op elsewhere). If the parent
    is already gone (re-parented to init or a subreaper), exit at once."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return
    if os.getppid() != parent or parent == 1:  # died before the request took effect
        os._exit(1)


_stopping = threading.Event()


def requested() -> bool:
    """True once SIGTERM or Ctrl-C stopped this process's run: collectives that wait for every rank (the final
    barrier) are skipped then, since the other ranks may be stopping at another point of their loop."""
    return _stopping.is_set()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (Ctrl-C's path: keep the last checkpoint, exit 130), and
    both mark the stop as :func:`requested`.

    Only in the main thread, and only for signals that still have Python's default action (an application that set
    its own handler keeps it). The previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _stopping.set()
        raise KeyboardInterrupt

    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    old = {s: signal.getsignal(s) for s in defaults}
    mine = [s for s, d in defaults.items() if old[s] is d]
    for s in mine:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, old[s])


@contextlib.contextmanager
def interrupted_as(message: str) -> Iterator[None]:
    """For the commands that write their output at the end (``probe``, ``lr-find``, ``export``): SIGTERM takes
    Ctrl-C's path (:func:`sigterm_as_interrupt`; what the block wrote so far is cleaned up on the way out, as for
    any exception), and either one ends the command as ``train``'s does: one line ``Error: <message>``, exit 130.
    A more precise :class:`~finetune.errors.Interrupted` raised inside the block passes through."""
    try:
        with sigterm_as_interrupt():
            yield
    except KeyboardInterrupt:
        raise Interrupted(message) from None


def run_launcher(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` (torchrun) until it exits; returns its exit code (128 + N when a signal N ended it).

    The child runs in its own session, so a terminal's Ctrl-C reaches it once, through us: SIGINT, SIGTERM and SIGHUP
    sent to this process are forwarded to it (SIGHUP as SIGTERM), and torchrun stops its workers. If this process is
    killed outright, the kernel sends the child SIGTERM (``PR_SET_PDEATHSIG``)."""
    import subprocess

    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    forward = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}

    def handler(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(forward[signum])

    old = {s: signal.signal(s, handler) for s in forward} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - only if a handler was not installed
                handler(signal.SIGINT, None)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 - rc if rc < 0 else rc
