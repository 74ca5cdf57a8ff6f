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
