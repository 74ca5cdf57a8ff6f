"""Rich tables for the CLI's human output (stdout); nothing here computes anything."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

console = Console(soft_wrap=False)


def _n(x: int) -> str:
    return f"{x:,}"


def parameter_table(bb, doc: dict[str, Any]) -> None:
    head = set(bb.head_parameter_names())
    t = Table(title=f"{doc['model']}  ({bb.num_classes} classes, weights: {bb.weights})", title_justify="left")
    for col, just in (("#", "right"), ("name", "left"), ("shape", "left"), ("numel", "right"),
                      ("trainable", "center")):
        t.add_column(col, justify=just)
    for r in doc["parameters"]:
        name = r["name"] + ("  [dim](head)[/dim]" if r["name"] in head else "")
        t.add_row(str(r["index"]), name, str(tuple(r["shape"])), _n(r["numel"]),
                  "[green]yes[/green]" if r["trainable"] else "[red]no[/red]")
    console.print(t)
    console.print(f"tensors: {len(doc['parameters'])}   parameters: {_n(doc['total'])}   "
                  f"trainable: {_n(doc['trainable'])}   frozen: {_n(doc['frozen'])}")


def module_tree(bb, rows: list[dict[str, Any]]) -> None:
    tree = Tree(f"[bold]{bb.name}[/bold]  (dotted names for --freeze-layers)")
    nodes: dict[str, Tree] = {"": tree}
    for r in rows:
        parent = r["name"].rpartition(".")[0]
        label = f"{r['name']}  [dim]{r['type']}[/dim]"
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
        t.add_row(r["module"], str(r["tensors"]), _n(r["params"]), _n(r["trainable"]),
                  f"[red]{_n(r['frozen'])}[/red]" if r["frozen"] else "0")
    console.print(t)
    console.print(f"steps: {'; '.join(doc['steps']) or 'none (everything trainable)'}")
    console.print(f"frozen: {len(plan.frozen)} tensors / {_n(sum(r['frozen'] for r in doc['summary']))}   "
                  f"trainable: {len(plan.trainable)} tensors / {_n(sum(r['trainable'] for r in doc['summary']))}")
    for s in doc["schedule"]:
        console.print(f"epoch {s['epoch']}: unfreeze {','.join(s['layers'])} (LR x {s['lr_mult']:g})")
