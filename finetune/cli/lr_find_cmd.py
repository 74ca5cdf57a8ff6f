"""``finetune lr-find [train flags]``: the LR range test on exactly what ``finetune train`` with the same flags
would train (data, model, freeze plan, optimizer, batch size, precision)."""

from __future__ import annotations

import functools

from finetune.cli import train_cmd

HELP = ("Run the LR range test (fastai's lr_find): ~100 steps with the LR growing exponentially from 1e-7 to 10 "
        "over the parameters that train would train (on cached features when only the head trains); print the "
        "suggested LR (fastai's 'valley' rule) and save the curve as lr_find.png in --out. Takes train's flags; "
        "'finetune train --lr auto' runs it first and trains with the suggestion.")


@functools.wraps(train_cmd.train)
def lr_find(*args, **kwargs) -> None:
    from finetune.api import interrupted_as

    train_cmd.LR_FIND["on"] = True
    try:
        with interrupted_as("interrupted; nothing was written"):  # SIGTERM as Ctrl-C; the curve is written last
            train_cmd.train(*args, **kwargs)
    finally:
        train_cmd.LR_FIND["on"] = False
