"""``finetune probe``: many linear heads at once on cached features, plus k-NN (see finetune/tools/probe.py)."""

from __future__ import annotations

import json
import os
from typing import Optional

import typer

from finetune.cli import options as O

HELP = ("Probe pretrained backbones on your data in seconds: a grid of linear heads (LR x weight decay, AdamW, the "
        "linear-probe recipe) trained simultaneously on frozen features computed once (and kept in the feature "
        "cache), plus k-NN accuracy; prints a table sorted by val accuracy, each with its 95% interval (heads within "
        "noise of the top marked ≈), and writes the best head (of those within noise, the lowest val loss) as a "
        "normal run directory (eval/predict/export it, or fine-tune from it with train --weights RUN/best.pt). "
        "--model a,b,c compares backbones; --model a=PATH,b=PATH gives each its own weights.")


def probe(
    model: str = typer.Option(..., "--model", "-m", help="Backbone(s), comma-separated: resnet18,timm:convnext_tiny; "
                              "each may have its own weights, NAME=PATH|tag: timm:x=/w/x.safetensors,resnet18 (paths "
                              "with commas are not supported here)."),
    weights: str = typer.Option("default", "--weights", "-w",
                                help="For the models without NAME=: default (each model's pretrained weights), a "
                                     "tag/enum, or a local file."),
    data: str = typer.Option("sample", "--data", "-d", help="Image folder (same layouts as train)."),
    labels: Optional[str] = O.option_of("data.labels"),  # train's flags where they mean the same
    val_split: Optional[float] = O.option_of("data.val_split"),
    image_size: Optional[int] = O.option_of("data.image_size"),
    lrs: Optional[str] = typer.Option(None, "--lrs", help="Learning rates, comma-separated (default: 8 from 1e-4 to "
                                                          "3e-1, half a decade apart)."),
    wds: Optional[str] = typer.Option(None, "--wds", help="Weight decays, comma-separated (default: 1e-4,1e-2)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", help="Epochs per head (default: the recipe's 5)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Batch size (default 32)."),
    knn: Optional[str] = typer.Option(None, "--knn", help="k values for k-NN accuracy (default 10,20; 0: none)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (batch order; the data split)."),
    device: Optional[str] = O.option_of("train.device"),
    precision: Optional[str] = typer.Option(None, "--precision", help="Precision of the backbone pass: auto | fp32 | "
                                                                      "bf16 | fp16."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory for the best head (several models: "
                                                                "one subfolder each). Default runs/<time>-probe."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous finetune run in --out."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Feature cache root (default $FINETUNE_CACHE "
                                                                      "or ~/.cache/finetune; 'off': in memory)."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
) -> None:
    from finetune.api import ConfigError, preflight

    pairs = preflight.parse_models(model, weights)  # NAME=WEIGHTS each, or --weights (torch-free)
    lr_list, wd_list = preflight.parse_floats(lrs, "lrs", ()), preflight.parse_floats(wds, "wds", ())
    ks = preflight.parse_ints(knn, ())  # the flags first (no file read), then names, data, weights file: no torch
    preflight.check_run(pairs, weights, data)
    for flag, v in (("--epochs", epochs), ("--batch-size", batch_size)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be at least 1, got {v}")

    from finetune.api import shown

    def progress(msg: str) -> None:
        if not quiet:  # messages name paths and models: control characters escaped, line by line
            typer.echo("\n".join(shown(line) for line in str(msg).split("\n")), err=True)

    from finetune.api import probe as run_probe
    from finetune.api import interrupted_as

    # SIGTERM as Ctrl-C (probe names what it wrote)
    with O.quiet_logs(quiet), interrupted_as("interrupted; nothing was written"):
        results = run_probe(pairs, weights=weights, data=data, lrs=lr_list or None, wds=wd_list or None,
                            knn=ks if knn is not None else None, out=out, overwrite=overwrite, cache_dir=cache_dir,
                            progress=progress, labels=labels, val_split=val_split, image_size=image_size,
                            epochs=epochs, batch_size=batch_size, seed=seed, device=device, precision=precision)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], allow_nan=False))  # to_dict: NaN -> null
        return
    render(results)


def render(results) -> None:
    from rich.table import Table

    from finetune.cli.render import console, pct_pm, term
    from finetune.api import tied

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    for r in results:
        src = "read from the feature cache" if r.from_store else "computed"
        t = Table(title=f"{term(r.model)} (weights {term(r.weights)}): {r.train_images} train / {r.val_images} val "
                        "images, "
                        f"{r.feature_dim}-d features {src} in {r.features_seconds:.1f} s; {len(r.heads)} heads in "
                        f"{r.sweep_seconds:.1f} s", title_justify="left")
        for col in ("#", "lr", "weight decay", "val acc (95%)", "", "val loss", "train loss"):
            t.add_column(col, justify="left" if col == "" else "right")
        order = sorted(range(len(r.heads)), key=lambda h: (-r.heads[h].val_acc, r.heads[h].val_loss))
        for rank, h in enumerate(order, 1):
            x = r.heads[h]
            mark = "[green]≈ best[/green]" if h == r.best else "≈" if x.within_noise else ""
            t.add_row(str(rank), f"{x.lr:g}", f"{x.weight_decay:g}", pct_pm(x.val_acc, r.val_images), mark,
                      f"{x.val_loss:.4f}", f"{x.train_loss:.4f}")
        console.print(t)
        # the lines under a table unwrapped (soft_wrap): a command stays one line to copy, no trailing spaces
        console.print(noise_line(r), highlight=False, soft_wrap=True)
        if r.knn:
            console.print("k-NN (cosine): " + "   ".join(f"k={k}: {pct_pm(v, r.val_images)}"
                                                         for k, v in r.knn.items()), highlight=False, soft_wrap=True)
        if r.run_dir:
            d, m = term(r.run_dir), term(r.model)
            console.print(f"best head -> {d}/best.pt  (finetune eval {d}/best.pt; fine-tune from "
                          f"it: finetune train --model {m} --weights {d}/best.pt ...)", highlight=False,
                          soft_wrap=True)
    if len(results) > 1:
        t = Table(title="backbones on this data (best head each)", title_justify="left")
        ks = sorted({k for r in results for k in r.knn})
        own = len({r.weights for r in results}) > 1  # --model a=PATH,b: each row names its weights
        for col in (["model"] + ["weights"] * own + ["val acc (95%)", "", "lr", "weight decay"] +
                    [f"k-NN k={k}" for k in ks] + ["features"]):
            t.add_column(col, justify="left" if col in ("model", "weights", "") else "right",
                         overflow="fold" if col in ("model", "weights") else "ellipsis")  # names whole, not "timm:…"
        ranked = sorted(results, key=lambda r: -r.heads[r.best].val_acc)
        first = ranked[0].heads[ranked[0].best].val_acc
        for r in ranked:
            b = r.heads[r.best]
            same_n = r.val_images == ranked[0].val_images
            mark = "top" if r is ranked[0] else "≈" if same_n and tied(b.val_acc, first, r.val_images) else ""
            w = [term(os.path.basename(r.weights) or r.weights)] * own  # the file's name (its path: the title)
            t.add_row(term(r.model), *w, pct_pm(b.val_acc, r.val_images), mark, f"{b.lr:g}", f"{b.weight_decay:g}",
                      *[pct_pm(r.knn.get(k), r.val_images) for k in ks], f"{r.feature_dim}-d")
        console.print(t)
        console.print("≈: within noise of the top backbone (each inside the other's 95% Wilson interval on "
                      f"{ranked[0].val_images} val images): a tie, not a ranking", highlight=False, soft_wrap=True)


def noise_line(r) -> str:
    """The lines under a probe table: how big the noise is and how the best head was chosen."""
    top = r.heads[r.top if r.top is not None else r.best]
    pm = "" if r.val_acc_pm is None else f", ± {100 * r.val_acc_pm:.1f} points (95%) at the top"
    ties = sum(h.within_noise for h in r.heads)
    best = r.heads[r.best]
    why = ("the lowest val loss of them, and the top accuracy" if r.best == r.top else
           f"the lowest val loss of them ({best.val_loss:.4f}; the top accuracy's head has {top.val_loss:.4f})")
    return (f"val: {r.val_images} images{pm}; ≈: within noise of the top ({ties} of {len(r.heads)} heads)\n"
            f"best: {why}")
