"""MkDocs hook: renders the CLI reference from the Typer app at build time.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; :func:`on_page_markdown` replaces it with the
``--help`` text of every command the app registers (walked recursively, so a new command or sub-command appears
without anyone editing the docs). ``tests/test_docs.py`` calls :func:`cli_reference` directly, without mkdocs.
"""

from __future__ import annotations

MARKER = "<!-- cli-reference -->"
WIDTH = 100  # help text wrapped at a fixed width: the page does not depend on the terminal that builds it


def _walk(cmd, name: str, parent=None):
    """Yields (command path, click context, command) for ``cmd`` and every command below it, in app order."""
    # make_context applies the command's context_settings (the app's "-h, --help"); resilient parsing: no
    # required argument is asked for and no callback runs
    ctx = cmd.make_context(name, [], parent=parent, resilient_parsing=True, terminal_width=WIDTH,
                           max_content_width=WIDTH)
    yield ctx.command_path, ctx, cmd
    for sub_name, sub in (getattr(cmd, "commands", None) or {}).items():
        if getattr(sub, "hidden", False):
            continue
        yield from _walk(sub, sub_name, ctx)


def commands() -> list[str]:
    """Every command path of the app, ``finetune`` first (``finetune cache list``, ...)."""
    return [path for path, _, _ in _walk(_root_command(), "finetune")]


def _root_command():
    import typer.main

    from finetune.cli.app import app

    return typer.main.get_command(app)


def _anchor(path: str) -> str:
    return path.replace(" ", "-")


def cli_reference() -> str:
    """Markdown: an index of the commands, then one section per command with its ``--help`` output."""
    entries = list(_walk(_root_command(), "finetune"))
    out = ["| command | what it does |", "|---|---|"]
    for path, _, cmd in entries[1:]:
        short = cmd.get_short_help_str(limit=90).replace("|", "\\|")
        out.append(f"| [`{path}`](#{_anchor(path)}) | {short} |")
    out.append("")
    for path, ctx, cmd in entries:
        level = "#" * min(2 + path.count(" "), 4)
        out.append(f'{level} `{path}` {{#{_anchor(path)}}}')
        out.append("")
        out.append("```text")
        out.append(cmd.get_help(ctx).rstrip())
        out.append("```")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook signature
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown
