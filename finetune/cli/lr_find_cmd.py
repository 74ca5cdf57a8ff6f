"""``finetune lr-find [train flags]``: the LR range test on exactly what ``finetune train`` with the same flags
would train (data, model, freeze plan, optimizer, batch size, precision). It takes train's generated options
(:func:`finetune.cli.options.command`) and calls the library's ``lr_find`` on the recipe they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from finetune.cli import options as O
from finetune.cli import train_cmd

HELP = ("Run the LR range test (fastai's lr_find): ~100 steps with the LR growing exponentially from 1e-7 to 10 "
        "over the parameters that train would train (on cached features when only the head trains); print the "
        "suggested LR (the 'valley' rule: a bit past the middle of the loss's descent) with fastai's alternatives "
        "(steep, minimum/10), and save the curve with all three marked as lr_find.png (lr_find.json: the numbers) "
        "in --out. Takes train's flags; 'finetune train --lr auto' runs it first and trains with the suggestion.")


def _lr_find(v: dict[str, Any]) -> None:
    """The command's body over its parameter values ``v`` (train's)."""
    from finetune import api

    if v["resume"] is not None or v["nproc"] != 1 or v["nnodes"] != 1:
        raise api.ConfigError("lr-find takes the flags of a new run; drop --resume and --nproc"
                              + ("" if v["nnodes"] == 1 else " (and --nnodes: it runs in one process)"))
    r = train_cmd.recipe_of(v, train_cmd.typed_keys(v))
    with api.interrupted_as("interrupted; nothing was written"):  # SIGTERM as Ctrl-C; the curve is written last
        with api.trusted(v["trust_checkpoint"]):
            _range_test(r, v["out"], v["overwrite"], v["quiet"])


lr_find = O.command(_lr_find, train_cmd.run_options)


def _range_test(r, out: Optional[Path], overwrite: bool, quiet: bool) -> None:
    """Run the LR range test for recipe ``r``; write lr_find.png/json into ``out`` (default runs/<time>-lr-find);
    print the suggestion on stdout."""
    import time

    from finetune import api
    from finetune.api import CheckpointError

    if r.optimizer.lr == "auto":
        r.optimizer.lr = 0.01  # the range test replaces it anyway
    dest = Path(out) if out is not None else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-lr-find"
    taken = [n for n in api.LR_FIND_FILES if (dest / n).exists()]
    if taken and not overwrite:
        raise CheckpointError(f"'{dest / taken[0]}' already exists; pass --overwrite to replace it or choose "
                              "another --out")
    found = api.lr_find(r)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        paths = found.save(dest)
    except OSError as e:
        raise CheckpointError(f"cannot write to '{dest}': {e.strerror or e}; choose another --out") from None
    if not quiet:
        where = "on cached features" if found.info.get("on_cached_features") else "on the full model"
        stop = f"; stopped early: {found.stopped}" if found.stopped else ""
        typer.echo(f"suggested lr: {found.suggestion:.3g} ({found.rule} rule; {found.alternatives()}; "
                   f"{len(found.lrs)} steps {where}, lr {found.lrs[0]:.1e} -> {found.lrs[-1]:.1e}{stop})")
        typer.echo(f"curve: {paths[0]}")
    if found.flat:
        from logging import getLogger

        getLogger("finetune").warning(f"the loss never fell by 2% during the test (from {found.losses[0]:.4f}, "
                                      f"lowest {min(found.losses):.4f}): the suggestion is noise; from random "
                                      "init ~100 steps teach too little, pick the LR by a short sweep")
