from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from finetune.cli import options as O

HELP = ("Export a checkpoint: just its weights (model state_dict, no optimizer, recipe or pickled objects) as "
        ".safetensors or a PyTorch state_dict .pth (load them back with 'finetune train --weights PATH'), or a "
        "graph that runs without finetune: ONNX (dynamic batch axis; needs the [onnx] extra) or TorchScript, with "
        "the eval transform, class names and opset in FILE.json beside it. Writes are atomic.")

def export(
    checkpoint: str = typer.Argument(..., help="A checkpoint (runs/<run>/best.pt) or a run directory."),
    fmt: str = typer.Option("safetensors", "--format", "-f", help="safetensors | state-dict | onnx | torchscript."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: next to the checkpoint, "
                                       "best.safetensors, best.pth, best.onnx or best.torchscript.pt)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 18)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    trust_checkpoint: bool = O.TRUST,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    from finetune.api import EXPORT_FORMATS, ConfigError, export_model, trusted

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got '{fmt}'")
    from finetune.api import interrupted_as

    with trusted(trust_checkpoint), interrupted_as("interrupted; nothing was written"):  # SIGTERM as Ctrl-C
        paths = export_model(checkpoint, fmt, out, overwrite=overwrite, opset=opset)
    if not quiet:
        for path in paths:
            typer.echo(str(path))
