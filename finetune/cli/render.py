"""Rich tables for the CLI's human output (stdout); nothing here computes anything."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from finetune.api import shown

# emoji=False: a file or class name such as ":smile:" prints as written, not as a picture
console = Console(soft_wrap=False, emoji=False)


def term(value: object) -> str:
    """A name that came from disk or from the user (file, class, run, recipe, model, path) as rich text for the
    terminal, printed literally: control characters (ESC, OSC, \\r, BEL, C1) escaped visibly as in error lines
    (:func:`finetune.api.shown`), and rich markup ("[red]", "[link=...]") escaped."""
    from rich.markup import escape

    return escape(shown(value))


def pct_pm(acc: float | None, n: int | None) -> str:
    """``"86.67% ± 4.3"``: an accuracy with the half width of its 95% Wilson interval on ``n`` images (percentage
    points); just the accuracy when ``n`` is unknown, "-" when the accuracy is."""
    from finetune.api import pm_text

    if acc is None:
        return "-"
    pm = pm_text(acc, n)
    return f"{100 * acc:.2f}%" + (f" {pm}" if pm else "")


FOLD_MIN = 12  # a foldable column (a run name) keeps at least this many characters a line


def cell_width(cell: str) -> int:
    """The terminal columns of a cell (rich markup; its longest line)."""
    from rich.text import Text

    return max((line.cell_len for line in Text.from_markup(cell).split("\n")), default=0)


def fitted_table(title: str, cells: dict[str, list[str]], width: int, *, fold: str, right: tuple[str, ...] = (),
                 stack: tuple[str, str] | None = None, drop: tuple[str, ...] = ()) -> tuple[Table, list[str]]:
    """A table of ``cells`` (column -> one markup cell per row) that fits ``width`` terminal columns with every
    cell readable: rich alone squeezes no-wrap columns to nothing in a narrow terminal or a pipe (80 columns),
    printing blank cells. Every column but ``fold`` shows its cells whole; ``fold`` (a long name) folds across
    lines, at least :data:`FOLD_MIN` characters wide. While the table is too wide: first the two ``stack``
    columns share one (two lines a row: "model / recipe"), then the ``drop`` columns go, lowest value first.
    Returns the table and the columns left out (for a footer line). Below ~50 columns everything may fold."""
    cols = dict(cells)

    def natural(k: str) -> int:
        return max([cell_width(k)] + [cell_width(c) for c in cols[k]])

    def fits() -> bool:  # a boxed table: each column's padding and left rule (3), and the right edge (1)
        need = sum(natural(k) for k in cols if k != fold) + min(natural(fold), FOLD_MIN)
        return need + 3 * len(cols) + 1 <= width

    steps: list[str | None] = [None] + (["stack"] if stack else []) + list(drop)
    dropped: list[str] = []
    for step in steps:
        if step == "stack":
            a, b = stack
            merged = [f"{x}\n[dim]{y}[/dim]" for x, y in zip(cols[a], cols[b])]
            cols = {(f"{a} / {b}" if k == a else k): (merged if k == a else v) for k, v in cols.items() if k != b}
        elif step is not None:
            del cols[step]
            dropped.append(step)
        if fits():
            break
    squeezed = not fits()  # even the fewest columns are too wide: let everything fold
    t = Table(title=title, title_justify="left")
    for k in cols:
        just = "right" if k in right else "left"
        if k == fold or squeezed:
            t.add_column(k, justify=just, overflow="fold", min_width=min(natural(k), FOLD_MIN) if k == fold else None)
        else:
            t.add_column(k, justify=just, no_wrap=True, min_width=natural(k))
    for i in range(len(next(iter(cols.values())))):
        t.add_row(*[v[i] for v in cols.values()])
    return t, dropped


def _n(x: int) -> str:
    return f"{x:,}"


def parameter_table(bb, doc: dict[str, Any]) -> None:
    head = set(bb.head_parameter_names())
    t = Table(title=f"{term(doc['model'])}  ({bb.num_classes} classes, weights: {term(bb.weights)})",
              title_justify="left")
    for col, just in (("#", "right"), ("name", "left"), ("shape", "left"), ("numel", "right"),
                      ("trainable", "center")):
        t.add_column(col, justify=just)
    for r in doc["parameters"]:
        name = term(r["name"]) + ("  [dim](head)[/dim]" if r["name"] in head else "")
        t.add_row(str(r["index"]), name, str(tuple(r["shape"])), _n(r["numel"]),
                  "[green]yes[/green]" if r["trainable"] else "[red]no[/red]")
    console.print(t)
    console.print(f"tensors: {len(doc['parameters'])}   parameters: {_n(doc['total'])}   "
                  f"trainable: {_n(doc['trainable'])}   frozen: {_n(doc['frozen'])}")


def module_tree(bb, rows: list[dict[str, Any]]) -> None:
    tree = Tree(f"[bold]{term(bb.name)}[/bold]  (dotted names for --freeze-layers)")
    nodes: dict[str, Tree] = {"": tree}
    for r in rows:
        parent = r["name"].rpartition(".")[0]
        label = f"{term(r['name'])}  [dim]{term(r['type'])}[/dim]"
        if r["numel"]:
            label += f"  {_n(r['numel'])}"
            if r["trainable"] != r["numel"]:
                label += f" [red]({_n(r['numel'] - r['trainable'])} frozen)[/red]"
        nodes[r["name"]] = nodes.get(parent, tree).add(label)
    console.print(tree)


def plan_summary(plan, doc: dict[str, Any]) -> None:
    """The freeze plan per top-level module, the frozen/trainable totals, and the unfreeze schedule."""
    t = Table(title=f"freeze plan  (BatchNorm: {doc['bn']})", title_justify="left")
    for col, just in (("module", "left"), ("tensors", "right"), ("params", "right"), ("trainable", "right"),
                      ("frozen", "right")):
        t.add_column(col, justify=just)
    for r in doc["summary"]:
        t.add_row(term(r["module"]), str(r["tensors"]), _n(r["params"]), _n(r["trainable"]),
                  f"[red]{_n(r['frozen'])}[/red]" if r["frozen"] else "0")
    console.print(t)
    console.print(f"steps: {term('; '.join(doc['steps'])) or 'none (everything trainable)'}")
    console.print(f"frozen: {len(plan.frozen)} tensors / {_n(sum(r['frozen'] for r in doc['summary']))}   "
                  f"trainable: {len(plan.trainable)} tensors / {_n(sum(r['trainable'] for r in doc['summary']))}")
    for s in doc["schedule"]:
        console.print(f"epoch {s['epoch']}: unfreeze {term(','.join(s['layers']))} (LR x {s['lr_mult']:g})")
