"""The test tiers (markers in pyproject.toml): every test that starts a child process is marked ``subprocess`` (those
that start several training processes ``distributed`` as well), and every ``distributed`` test is ``slow``, so that
``pytest -m "not slow"`` stays the quick loop and ``-m "not subprocess"`` really starts no process.

A static check over the test files' AST (no imports: milliseconds). A test "starts a process" when its body, a fixture
it requests, or a helper it calls (in its own file, conftest.py or a module it imports from tests/, e.g.
helpers.run_cli, browser.open_page), transitively, names one of ``SPAWNS``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SPAWNS = {"subprocess", "Popen", "run_cli", "torchrun", "spawn", "fork"}  # mp.spawn, os.fork; the rest say it


class _Module:
    def __init__(self, path: Path):
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.defs = {n.name: n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        self.imports = {a.asname or a.name: n.module for n in ast.walk(self.tree)
                        if isinstance(n, ast.ImportFrom) and n.module and (TESTS / f"{n.module}.py").exists()
                        for a in n.names}
        self.marks = set()
        for n in self.tree.body:
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets):
                values = n.value.elts if isinstance(n.value, (ast.List, ast.Tuple)) else [n.value]
                self.marks |= {m for v in values if (m := _mark(v))}


def _mark(node: ast.expr) -> str | None:
    """``pytest.mark.NAME`` or ``pytest.mark.NAME(...)`` -> NAME."""
    node = node.func if isinstance(node, ast.Call) else node
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
        return node.attr
    return None


def _names(node: ast.AST) -> set[str]:
    """Every identifier a definition uses: names, attributes, and its parameters (the fixtures a test requests)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
    return out


class _Index:
    def __init__(self):
        self.modules = {p.stem: _Module(p) for p in TESTS.glob("*.py")}
        self.memo: dict[tuple[str, str], bool] = {}

    def spawns(self, module: str, name: str) -> bool:
        key = (module, name)
        if key not in self.memo:
            self.memo[key] = False  # a cycle adds nothing
            self.memo[key] = self._spawns(module, name)
        return self.memo[key]

    def _spawns(self, module: str, name: str) -> bool:
        mod = self.modules[module]
        node = mod.defs.get(name)
        if node is None:
            if name in mod.imports:
                return self.spawns(mod.imports[name], name) if name in self.modules[mod.imports[name]].defs else False
            if module != "conftest" and name in self.modules["conftest"].defs:  # a fixture from conftest.py
                return self.spawns("conftest", name)
            return False
        used = _names(node) - {name}
        return bool(used & SPAWNS) or any(self.spawns(module, u) for u in used if u != name)


@functools.cache
def _tests() -> list[tuple[str, str, set[str], bool]]:
    """(module, test name, its markers, whether it starts a process) for every test function in tests/test_*.py."""
    return list(_walk(_Index()))


def _walk(index: _Index):
    for module, mod in sorted(index.modules.items()):
        if not module.startswith("test_"):
            continue
        for node in mod.tree.body:
            funcs = [(node, set())]
            if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                own = {m for d in node.decorator_list if (m := _mark(d))}
                funcs = [(f, own) for f in node.body if isinstance(f, ast.FunctionDef)]
            for f, class_marks in funcs:
                if isinstance(f, ast.FunctionDef) and f.name.startswith("test_"):
                    marks = mod.marks | class_marks | {m for d in f.decorator_list if (m := _mark(d))}
                    uses = bool(_names(f) & SPAWNS) or index.spawns(module, f.name)
                    yield module, f.name, marks, uses


def test_every_test_that_starts_a_process_is_marked_so():
    unmarked = [f"{m}.py::{name}" for m, name, marks, uses in _tests() if uses and "subprocess" not in marks]
    assert not unmarked, ("these tests start a child process (run_cli, subprocess, torchrun, mp.spawn, ...): add "
                          "@pytest.mark.subprocess (and distributed if it starts several training processes; slow "
                          "if it takes over ~2 s):\n" + "\n".join(unmarked))


def test_every_distributed_test_is_slow_and_subprocess():
    bad = [f"{m}.py::{name}" for m, name, marks, _ in _tests() if "distributed" in marks
           and not {"slow", "subprocess"} <= marks]
    assert not bad, "distributed tests are in the slow and subprocess tiers too:\n" + "\n".join(bad)


def test_the_check_sees_processes_through_helpers_and_fixtures():
    found = {(m, name): uses for m, name, _, uses in _tests()}
    assert found[("test_bad_inputs", "test_real_process_errors_have_no_traceback")]  # helpers.run_cli
    assert found[("test_distributed", "test_two_processes_complete_and_eval_matches")]  # its ddp_run fixture
    assert found[("test_kill_resume", "test_sigkill_at_random_moments_then_resume_is_bitwise_exact")]  # ForkServer
    assert not found[("test_cli", "test_version")]  # the in-process CliRunner
