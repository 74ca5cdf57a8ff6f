"""One observer mechanism: a :class:`Callback` with run-, epoch- and batch-level hooks, called by name.

The loops announce what happens by hook name (Lightning Fabric's ``fabric.call``, fastai's events) through a
:class:`Callbacks` dispatcher; a listener overrides the hooks it needs. Run-level hooks get the run's state ``run``
(a :class:`finetune.run.runner.RunState`: model, optimizer, data, history, best):

- ``on_run_start(run)``: everything is built; nothing trained yet this session (also after a resume)
- ``on_epoch_start(run, epoch, phase)``: before the epoch's RNG is seeded (0-based ``epoch``; ``phase`` says what
  trains: the cached head or the full model)
- ``on_note(run, message)``: a line the user should read (an unfreeze, an early stop)
- ``on_epoch_end(run, row)``: the epoch's metrics row, after its checkpoint was committed
- ``on_run_end(run)``: the run finished (not called when it fails)
- ``on_close(run)``: always, last: flush what is buffered

Batch-level hooks come from :func:`finetune.training.engine.train_one_epoch` and ``evaluate`` (no ``run``: a listener
keeps what it needs from ``on_run_start``):

- ``on_train_batch_end(i, batches, loss, acc, images_per_sec)``: the running loss and accuracy, re-read from the
  device at most 4 times a second
- ``on_update(info)``: after each optimizer update: ``update`` (counted over the run), ``loss`` (a 0-dim tensor:
  ``float()`` reads it, a device sync on CUDA), ``lrs`` (per group), ``images_per_sec``
- ``on_save_point(progress)``: after each optimizer update but the epoch's last, where saving and resuming is
  exact: ``batches``, the exact running sums, the first update's LRs (reading the sums is a device sync: only
  mid-epoch saves implement it)
- ``on_eval_start(batches)``, ``on_eval_batch(i, batches)``: the validation pass

Speed: :meth:`Callbacks.hook` looks each hook's bound methods up once; a hook that no listener implements costs the
loop nothing (it skips the work that would feed it).

:class:`Reporter` is the older progress shape (``start``, ``epoch_start``, ``batch``, ``update``, ``epoch_end``,
``note``, ``end``, ``eval_start``, ``eval_batch``); it still works wherever a listener is taken
(``finetune.train(reporter=...)``): :class:`ReporterHooks` (and the run layer's
:class:`finetune.run.callbacks.ReporterCallback`) adapt it onto the hooks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

BATCH_HOOKS = {"on_train_batch_end": "batch", "on_update": "update", "on_eval_start": "eval_start",
               "on_eval_batch": "eval_batch"}  # hook -> the Reporter method with the same arguments


class Callback:
    """A listener of a training run; every hook is optional (see the module's docstring for when each is called)."""

    def on_run_start(self, run: Any) -> None: ...
    def on_epoch_start(self, run: Any, epoch: int, phase: Any) -> None: ...
    def on_note(self, run: Any, message: str) -> None: ...
    def on_epoch_end(self, run: Any, row: dict[str, Any]) -> None: ...
    def on_run_end(self, run: Any) -> None: ...
    def on_close(self, run: Any) -> None: ...
    def on_train_batch_end(self, i: int, batches: int, loss: float, acc: float, images_per_sec: float) -> None: ...
    def on_update(self, info: dict[str, Any]) -> None: ...
    def on_save_point(self, progress: dict[str, Any]) -> None: ...
    def on_eval_start(self, batches: int) -> None: ...
    def on_eval_batch(self, i: int, batches: int) -> None: ...


class Reporter:
    """The older progress shape (the CLI drew its bars with one); all methods are optional no-ops. Pass one as
    ``finetune.train(reporter=...)``: it is adapted onto the :class:`Callback` hooks (:class:`ReporterHooks`)."""

    def start(self, info: dict[str, Any]) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None: ...
    def batch(self, i: int, batches: int, loss: float, acc: float, images_per_sec: float) -> None: ...
    def eval_start(self, batches: int) -> None: ...
    def eval_batch(self, i: int, batches: int) -> None: ...
    # after each optimizer update: update, loss (a 0-dim tensor: float() reads it, a device sync on CUDA), lrs
    def update(self, info: dict[str, Any]) -> None: ...
    def epoch_end(self, row: dict[str, Any]) -> None: ...
    def note(self, message: str) -> None: ...
    def end(self, summary: dict[str, Any]) -> None: ...


_NOOPS = {f for cls in (Callback, Reporter) for f in vars(cls).values() if callable(f)}


def implemented(listener: Any, name: str) -> Callable | None:
    """``listener``'s bound ``name``, or None when it has none or keeps the base class's no-op."""
    fn = getattr(listener, name, None)
    if fn is None or getattr(fn, "__func__", fn) in _NOOPS:
        return None
    return fn


class ReporterHooks(Callback):
    """A :class:`Reporter`'s batch-level methods as the hooks (the reporter's own bound methods, so an adapted
    reporter costs what it did; a method it doesn't override is not dispatched at all)."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        for hook, method in BATCH_HOOKS.items():
            fn = implemented(reporter, method)
            if fn is not None:
                setattr(self, hook, fn)


class Callbacks:
    """Several listeners, called in order by hook name: ``call("on_epoch_end", run, row)``. ``hook(name)`` gives the
    bound methods of the listeners that implement ``name`` (looked up once, then cached): the loops fetch theirs
    once per epoch and skip what feeds a hook nobody implements."""

    def __init__(self, items: Iterable[Any] = ()):
        self.items = list(items)
        self._hooks: dict[str, tuple[Callable, ...]] = {}

    def hook(self, name: str) -> tuple[Callable, ...]:
        fns = self._hooks.get(name)
        if fns is None:
            fns = self._hooks[name] = tuple(f for f in (implemented(c, name) for c in self.items) if f is not None)
        return fns

    def call(self, name: str, *args: Any) -> None:
        for fn in self.hook(name):
            fn(*args)

    # the Reporter shape that ``evaluate(reporter=...)`` calls
    def eval_start(self, batches: int) -> None:
        self.call("on_eval_start", batches)

    def eval_batch(self, i: int, batches: int) -> None:
        self.call("on_eval_batch", i, batches)


def as_callbacks(callbacks: Callbacks | Iterable[Any] | None = None, reporter: Reporter | None = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> Callbacks:
    """The loop's listeners from what a caller passed: a dispatcher or a list of callbacks, a :class:`Reporter`
    (its batch-level methods), an ``on_step(progress)`` function (the save points)."""
    if isinstance(callbacks, Callbacks) and reporter is None and on_step is None:
        return callbacks
    items = list(callbacks.items if isinstance(callbacks, Callbacks) else callbacks or [])
    if reporter is not None:
        items.append(reporter if isinstance(reporter, Callback) else ReporterHooks(reporter))
    if on_step is not None:
        saves = Callback()
        saves.on_save_point = on_step  # type: ignore[method-assign]
        items.append(saves)
    return Callbacks(items)
