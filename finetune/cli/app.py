"""The ``finetune`` command. Parses, calls the library, prints. Imports neither torch nor timm at module
level: ``finetune --help`` and ``finetune recipes`` must answer in well under a second."""

from __future__ import annotations

import logging
import sys

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

from finetune.api import FinetuneError, Interrupted, flag_names, report_worker_error, shown, stopped_line

_ABORT = tuple(c for c in (getattr(_cx, "Abort", None), getattr(typer, "Abort", None))
               if isinstance(c, type) and issubclass(c, BaseException))


class FinetuneGroup(TyperGroup):
    """Turns user errors into one ``Error: ...`` line on stderr: exit 1 for FinetuneError, 2 for usage errors; a
    command the user stopped (Ctrl-C, SIGTERM: exit 130) into one ``Stopped ...`` line. While a command runs, the
    library's messages name settings by their flags (``--weights``, not ``model.weights``)."""

    def invoke(self, ctx):
        """A Ctrl-C that no run handled (eval, predict, runs, a prompt) is a stop too: typer would turn it into a
        silent exit 130."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted("interrupted.") from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _setup_logging()
        try:
            from finetune.cli.options import flag_map

            with flag_names(flag_map):
                rv = super().main(args=args, prog_name=prog_name or "finetune", complete_var=complete_var,
                                  standalone_mode=False, **extra)
        except _cx.NoArgsIsHelpError as e:
            typer.echo(e.ctx.get_help())
            sys.exit(0)
        except _cx.UsageError as e:
            cmd = e.ctx.command_path if e.ctx else "finetune"
            typer.echo(f"Error: {e.format_message()} (see '{cmd} --help')", err=True)
            sys.exit(2)
        except _cx.ClickException as e:
            typer.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except FinetuneError as e:
            if not report_worker_error(shown(e), e.exit_code):  # a --nproc worker: its launcher prints it, once
                # one line, whatever the message quotes; a stop (also a --nproc worker's, as the launcher's error)
                # is what the user asked for, not an error
                stopped = e.exit_code == Interrupted.exit_code
                typer.echo(stopped_line(shown(e)) if stopped else f"Error: {shown(e)}", err=True)
            sys.exit(e.exit_code)
        except _ABORT + (KeyboardInterrupt,):
            typer.echo("Stopped.", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `finetune models | head`: the reader left; not an error
            sys.stderr.close()
            sys.exit(0)
        if isinstance(rv, int) and not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _setup_logging() -> None:
    log = logging.getLogger("finetune")
    if not any(getattr(h, "_finetune", False) for h in log.handlers):
        handler = logging.StreamHandler()  # stderr, resolved at emit time so CliRunner captures it
        handler.stream = None  # type: ignore[assignment]
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler._finetune = True  # type: ignore[attr-defined]
        handler.emit = _emit_to_current_stderr(handler)  # type: ignore[method-assign]
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _emit_to_current_stderr(handler: logging.StreamHandler):
    def emit(record: logging.LogRecord) -> None:
        msg = handler.format(record)
        if record.levelno == logging.INFO:
            msg = record.getMessage()
        # warnings name files from disk: an ESC/OSC in a file name is shown escaped, never sent to the terminal
        msg = "\n".join(shown(line) for line in msg.split("\n"))
        typer.echo(msg.replace("WARNING:", "warning:"), err=True)

    return emit


app = typer.Typer(
    cls=FinetuneGroup,
    name="finetune",
    help="Fine-tune pretrained image classifiers: pick a backbone, freeze what stays fixed, train the rest.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: wraps instead of eliding option names at 80 columns; no <bool>
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _version(value: bool) -> None:
    if value:
        from finetune import __version__

        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Fine-tune pretrained image classifiers: pick a backbone, freeze what stays fixed, train the rest."""


from finetune.cli import (auto_cmd, cache_cmd, eval_cmd, export_cmd, inspect_cmd, lr_find_cmd, models_cmd,  # noqa: E402
                          predict_cmd, probe_cmd, recipes_cmd, report_cmd, runs_cmd, train_cmd)

for _name, _fn, _help in (  # in the order of `finetune --help`
        ("train", train_cmd.train, train_cmd.HELP), ("auto", auto_cmd.auto, auto_cmd.HELP),
        ("eval", eval_cmd.eval_, eval_cmd.HELP),
        ("predict", predict_cmd.predict, predict_cmd.HELP), ("inspect", inspect_cmd.inspect, inspect_cmd.HELP),
        ("models", models_cmd.models, models_cmd.HELP), ("recipes", recipes_cmd.recipes, recipes_cmd.HELP),
        ("export", export_cmd.export, export_cmd.HELP), ("probe", probe_cmd.probe, probe_cmd.HELP),
        ("lr-find", lr_find_cmd.lr_find, lr_find_cmd.HELP), ("report", report_cmd.report, report_cmd.HELP),
        ("runs", runs_cmd.runs, runs_cmd.RUNS_HELP), ("compare", runs_cmd.compare, runs_cmd.COMPARE_HELP)):
    app.command(_name, help=_help)(_fn)
app.add_typer(cache_cmd.cache_app, name="cache", help=cache_cmd.HELP)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
