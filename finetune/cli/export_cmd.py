from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from finetune.cli import options as O

HELP = ("Write just the weights of a checkpoint (its model state_dict, no optimizer, recipe or pickled objects) "
        "as .safetensors or a PyTorch state_dict .pth, atomically; load it back with 'finetune train --weights "
        "PATH'.")

def export(
    checkpoint: str = typer.Argument(..., help="A checkpoint (runs/<run>/best.pt) or a run directory."),
    fmt: str = typer.Option("safetensors", "--format", "-f", help="safetensors | state-dict."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: next to the checkpoint, "
                                       "best.safetensors or best.pth)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    trust_checkpoint: bool = O.TRUST,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    from finetune.api import EXPORT_SUFFIX, ConfigError, export_weights, trusted

    if fmt not in EXPORT_SUFFIX:
        raise ConfigError(f"--format must be safetensors or state-dict, got '{fmt}'")
    with trusted(trust_checkpoint):
        path = export_weights(checkpoint, fmt, out, overwrite=overwrite)
    if not quiet:
        typer.echo(str(path))
