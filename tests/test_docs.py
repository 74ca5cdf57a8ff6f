"""The documentation: the generated CLI reference covers every command, and the README stays a short front page
that still opens with the two set-up commands (CI runs the test command it gives)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = ("pip install -e . && finetune train", "pip install -e '.[dev]' && pytest -q")


def _hooks():
    """docs/hooks.py, the MkDocs hook that renders docs/cli.md: loaded from its file (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("finetune_docs_hooks", ROOT / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _click_commands() -> list[str]:
    """Every command path of the Typer app, walked here independently of the hook."""
    import typer.main

    from finetune.cli.app import app

    paths = []

    def walk(cmd, path):
        paths.append(path)
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            if not getattr(sub, "hidden", False):
                walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "finetune")
    return paths


def test_cli_reference_has_every_command():
    hooks = _hooks()
    page = hooks.cli_reference()
    commands = _click_commands()
    assert {"finetune train", "finetune eval", "finetune cache list", "finetune lr-find"} <= set(commands)
    for path in commands:
        assert f"`{path}`" in page, f"{path} is missing from the generated CLI reference"
        assert f"Usage: {path} [OPTIONS]" in page, f"{path}: its --help text is missing"
    assert hooks.commands() == commands


def test_cli_page_uses_the_hook():
    assert _hooks().MARKER in (ROOT / "docs" / "cli.md").read_text()
    assert "docs/hooks.py" in (ROOT / "mkdocs.yml").read_text()


def test_readme_is_short_and_opens_with_the_setup_commands():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200: the rest belongs in docs/)"
    for command in SETUP:
        assert command in text, command
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert all(command in first_block for command in SETUP), "the README's first code block is the set-up commands"


def test_readme_links_resolve():
    """Links from the README into docs/ and benchmarks/ name files that exist."""
    import re

    text = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if not t.startswith(("http://", "https://"))]
    assert targets
    for target in targets:
        assert (ROOT / target).exists(), target


CPU_WHEELS = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"


def test_the_cpu_only_install_sits_beside_the_setup_commands():
    """Issue #30 item 8: a plain `pip install -e .` on Linux pulls the CUDA build of torch and its nvidia wheels
    (5.7 GB); the README and the getting-started page give PyTorch's CPU wheel index right after the two set-up
    commands, installed before the package."""
    readme = (ROOT / "README.md").read_text()
    after = readme.split("```bash\n", 1)[1].split("```", 1)[1]  # the text after the set-up block
    assert after.lstrip().startswith("Python >= 3.10. No GPU? Install PyTorch's CPU wheels first")
    assert after.index(CPU_WHEELS) < after.index("then `pip install -e .`") < after.index("##")
    page = (ROOT / "docs" / "getting-started.md").read_text()
    install = page.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert all(command in install for command in SETUP)
    assert f"```bash\n{CPU_WHEELS}\npip install -e .\n```" in install
    assert "For a machine without a\nGPU, install PyTorch's CPU wheels first" in install
