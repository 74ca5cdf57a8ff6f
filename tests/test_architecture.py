"""The package's structure: imports flow one way (no cycles, not even through function-level imports), and the
CLI reaches the library only through its front door (``finetune`` / ``finetune.api``)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "finetune"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """finetune modules that ``path`` imports anywhere in it (top level or inside functions)."""
    mod = _module(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("finetune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            base = PKG.parent / node.module.replace(".", "/")
            subs = {f"{node.module}.{a.name}" for a in node.names
                    if (base / f"{a.name}.py").is_file() or (base / a.name / "__init__.py").is_file()}
            # from finetune.models import weights -> finetune.models.weights; from finetune.x import f -> finetune.x
            out |= subs if len(subs) == len(node.names) else subs | {node.module}
    out.discard(mod)
    out.discard("finetune")  # the package itself only holds the version and a lazy map
    return out


def graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PKG.rglob("*.py")}


def test_no_import_cycles():
    g = graph()
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        for n in sorted(g.get(m, ())):
            if n in stack:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in done:
                visit(n, stack + [n])
        done.add(m)

    done: set[str] = set()
    for m in sorted(g):
        visit(m, [m])
    assert sorted(set(cycles)) == []


def test_cli_imports_only_the_front_door():
    allowed = {"finetune", "finetune.api"}
    bad = sorted(f"{m} imports {n}" for m, deps in graph().items() if m.startswith("finetune.cli")
                 for n in deps if not n.startswith("finetune.cli") and n not in allowed)
    assert bad == []


# The layers, bottom to top: a package imports only packages in lower layers (and its own modules). errors, files
# and config import no torch; api is the front door; cli reaches the library only through it.
LAYERS = [
    {"finetune.errors"},
    {"finetune.files"},
    {"finetune.config"},
    {"finetune.models", "finetune.data"},
    {"finetune.training"},
    {"finetune.parallel"},
    {"finetune.speedups"},
    {"finetune.run"},
    {"finetune.tools", "finetune.reporting"},
    {"finetune.api"},
    {"finetune.cli"},
    {"finetune.__main__"},
]


def _layer(module: str) -> tuple[str, int] | None:
    for i, group in enumerate(LAYERS):
        for unit in group:
            if module == unit or module.startswith(unit + "."):
                return unit, i
    return None


def test_layer_order():
    """Every import (top level or inside a function) points to the importer's own package or a lower layer."""
    bad = []
    for m, deps in sorted(graph().items()):
        src = _layer(m)
        for n in sorted(deps):
            dst = _layer(n)
            if src and dst and src[0] != dst[0] and dst[1] >= src[1]:
                bad.append(f"{m} imports {n}")
    assert bad == []


def test_every_module_has_a_layer_and_the_top_level_is_small():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "api.py", "errors.py", "files.py"]
    unplaced = sorted(m for m in graph() if m != "finetune" and _layer(m) is None)
    assert unplaced == []
