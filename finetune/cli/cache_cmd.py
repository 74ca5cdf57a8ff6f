"""``finetune cache list|clear``: the persistent feature cache (speedups/feature_store.py). No torch import."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

HELP = ("Show or free the feature cache: frozen-backbone features that probe and train reuse (and the backbones "
        "kept beside them, so that a head-only rerun need not build the model). An entry is used only for the same "
        "images (path, size, mtime, label and a hash of the bytes), model, weights, split point, "
        "transform and precision, and only when it matches the data set (rows, labels, feature shape, finite "
        "values); otherwise it is recomputed. A full or read-only cache folder: features are kept in memory.")

cache_app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False)

CACHE_DIR = typer.Option(None, "--cache-dir", help="Cache root (default $FINETUNE_CACHE or ~/.cache/finetune).")


@cache_app.command("list", help="List cached feature sets: model, data, split, images, shape, size, last used; "
                                 "unfinished writes (interrupted, or in progress) are marked as such.")
def list_(cache_dir: Optional[str] = CACHE_DIR,
          as_json: bool = typer.Option(False, "--json", help="Print only JSON to stdout.")) -> None:
    from finetune.api import featstore

    entries, features_dir = featstore.entries, featstore.features_dir

    rows = []
    for e in entries(cache_dir, temp=True):
        m = e.meta
        rows.append({"key": e.key, "model": m.get("model"), "weights": m.get("weights"), "data": m.get("data"),
                     "split": m.get("split_of_data"), "images": m.get("images"), "shape": m.get("shape"),
                     "precision": m.get("precision"), "bytes": e.bytes, "last_used": e.last_used,
                     "unfinished": e.temp, "writer_running": e.writer_alive if e.temp else None,
                     "path": str(e.path)})
    if as_json:
        typer.echo(json.dumps({"root": str(features_dir(cache_dir)), "entries": rows}))
        return
    from finetune.cli.render import console, fitted_table, term

    t, dropped = fitted_table(f"feature cache: {term(features_dir(cache_dir))}", _cells(rows, featstore.size_text),
                              console.width, fold="data", right=("images", "size"),
                              drop=("key", "precision", "features", "split", "last used", "images"))
    console.print(t)
    if dropped:
        console.print(f"columns left out to fit {console.width}: {', '.join(dropped)}; --json has them",
                      highlight=False, soft_wrap=True)
    unfinished = sum(r["unfinished"] for r in rows)
    console.print(f"{len(rows) - unfinished} entries, {featstore.size_text(sum(r['bytes'] for r in rows))}"
                  + (f" ({unfinished} unfinished)" if unfinished else ""), highlight=False)


def _cells(rows: list[dict], size_text) -> dict[str, list[str]]:
    """``cache list``'s table as columns of markup cells (:func:`finetune.cli.render.fitted_table` fits them)."""
    from finetune.cli.render import term

    cols = ("key", "model", "data", "split", "images", "features", "precision", "size", "last used")
    cells: dict[str, list[str]] = {c: [] for c in cols}
    for r in rows:
        shape = r["shape"] if isinstance(r["shape"], list) else []
        if r["unfinished"]:  # the temporary directory of a write: no meta.json yet
            mid = ["unfinished", "being written" if r["writer_running"] else "interrupted", "", "", "", ""]
        else:
            mid = [term(r["model"]), term(r["data"]), term(r["split"]), term(r["images"]),
                   "x".join(term(s) for s in shape[1:]), term(r["precision"])]
        row = [term(r["key"][:12]), *mid, size_text(r["bytes"]),
               time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))]
        for c, v in zip(cols, row):
            cells[c].append(v)
    return cells


@cache_app.command("clear", help="Delete cached features: all, or those not used for --older-than (30m, 12h, 7d); "
                                  "also the leftovers of interrupted writes.")
def clear(cache_dir: Optional[str] = CACHE_DIR,
          older_than: Optional[str] = typer.Option(None, "--older-than", help="Only entries unused for this long: "
                                                                               "30m, 12h, 7d, 2w.")) -> None:
    from finetune.api import featstore
    from finetune.api import FinetuneError, shown

    age = featstore.parse_age(older_than) if older_than is not None else None
    r = featstore.clear(cache_dir, age)
    from finetune.api import backbone_store

    r.backbones, freed = backbone_store.clear(cache_dir, age)  # kept beside the features for head-only reruns
    graphs, freed_graphs = backbone_store.clear(cache_dir, age, kind="inference")  # kept for predict
    r.freed += freed + freed_graphs
    extra = f", {r.unfinished} of them unfinished" if r.unfinished else ""

    freed = featstore.size_text(r.freed)
    kept = f" and {r.backbones} kept backbones" if r.backbones else ""
    kept += f" and {graphs} inference graphs" if graphs else ""
    typer.echo(f"removed {r.removed} entries{kept} ({freed}{extra}) from {featstore.features_dir(cache_dir)}")
    if r.busy:
        typer.echo(f"kept {r.busy} unfinished entries that a running process is still writing")
    if r.failed:
        path, err = r.failed[0]
        why = f"{err.strerror or err}" if isinstance(err, OSError) else "it is still there"
        raise FinetuneError(f"could not delete {len(r.failed)} cache entries, e.g. '{shown(path)}' ({why}); check "
                              "the permissions of the cache folder (--cache-dir / FINETUNE_CACHE)")
