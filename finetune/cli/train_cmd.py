"""``finetune train``: flags -> recipe keys -> a run (or a resume). Its options are generated: one per recipe key
that has a flag (declared on the key's field in :mod:`finetune.config`), plus :func:`run_options`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from finetune.cli import options as O

HELP = ("Train a model from a recipe (default: smallcnn on the bundled sample data); flags override the recipe. "
        "Writes a run directory with config.yaml, metrics.json, last.pt, best.pt and TensorBoard logs.")

_T = "Run"


def run_options(
    recipe: Optional[str] = O.panel(O.RECIPE, "Recipe"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<time>-<model>).",
                                       rich_help_panel=_T),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory.",
                                   rich_help_panel=_T),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its "
                                          "last.pt (--epochs may extend it).", rich_help_panel=_T),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors.", rich_help_panel=_T),
    nproc: int = typer.Option(1, "--nproc", help="Launch N processes with torchrun (DDP: N GPUs, or N CPU "
                              "processes with gloo). --batch-size is per process.", rich_help_panel=_T),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines in the job (torchrun --nnodes; with --node-rank and "
                               "--master-addr, the same command on each).", rich_help_panel=_T),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's number, 0..nnodes-1.", rich_help_panel=_T),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="HOST[:PORT] of node 0, where the nodes "
                                              "meet (c10d rendezvous; port 29500 by default).", rich_help_panel=_T),
    trust_checkpoint: bool = O.panel(O.TRUST, "Model"),
) -> None:
    """The options of ``train`` and ``lr-find`` that set no recipe key (the others come from the recipe schema)."""


def budget_option(
    budget: Optional[str] = typer.Option(None, "--budget", help="Wall-clock budget (90s, 20m, 1h30m): the epochs are "
                                         "sized from this machine's measured speed to end inside it (up to the "
                                         "recipe's; the LR schedule spans them), and the run stops on schedule should "
                                         "it run slower. A new run, one process.", rich_help_panel=_T),
) -> None:
    """``train``'s own option beside :func:`run_options`."""


def _train(v: dict[str, Any]) -> None:
    """The command's body over its parameter values ``v``."""
    from finetune import api
    from finetune.cli.progress import RichReporter

    budget = api.preflight.parse_budget(v["budget"])  # torch-free, before anything else
    if budget is not None and v["resume"] is not None:
        raise api.ConfigError("--budget sizes a new run; drop it with --resume (pass --epochs to extend the run)")
    if budget is not None and (v["nproc"] > 1 or v["nnodes"] > 1):
        raise api.ConfigError("--budget sizes a run in one process; drop --nproc/--nnodes, or drop --budget and pass "
                              "--epochs")
    _launch_if_asked(v)
    typed = typed_keys(v)
    reporter = RichReporter(quiet=v["quiet"])
    if v["resume"] is not None:
        with O.quiet_logs(v["quiet"]):
            _resume(v, typed, reporter)
        return
    r = recipe_of(v, typed)
    try:
        with api.trusted(v["trust_checkpoint"]), O.quiet_logs(v["quiet"]):
            _run(lambda: api.train(r, out=v["out"], overwrite=v["overwrite"], reporter=reporter, budget=budget))
    except api.FreezeError as e:
        raise api.from_recipe(e, v["recipe"], typed) from None


train = O.command(_train, run_options, budget_option)


def _launch_if_asked(v: dict[str, Any]) -> None:
    """``--nproc N`` (N > 1) or ``--nnodes M`` (M > 1) outside torchrun: relaunch this command under torchrun with
    N processes here (one of M machines)."""
    import os
    import sys

    from finetune.api import ConfigError

    nproc, nodes = v["nproc"], (v["nnodes"], v["node_rank"], v["master_addr"])
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    nnodes, node_rank, master = nodes
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ConfigError(f"--nnodes must be at least 1 and --node-rank in 0..nnodes-1, got --nnodes {nnodes} "
                          f"--node-rank {node_rank}")
    if nnodes > 1 and not master:
        raise ConfigError(f"--nnodes {nnodes} needs --master-addr HOST[:PORT], node 0's address (the same on every "
                          "node)")
    if (nproc > 1 or nnodes > 1) and "LOCAL_RANK" not in os.environ:
        from finetune.api import launch, strip_nproc

        argv = sys.argv[sys.argv.index("train"):] if "train" in sys.argv else ["train"]
        raise typer.Exit(launch(nproc, strip_nproc(argv), nodes))


def typed_keys(v: dict[str, Any]) -> dict[str, Any]:
    """The recipe keys that the flags the user typed set, with their values."""
    return {k: x for k, x in O.overrides(v).items() if x is not None}


def recipe_of(v: dict[str, Any], typed: dict[str, Any]):
    """The checked recipe that the flags describe: ``--recipe`` (or the base :func:`_base_recipe` picks) with the
    ``typed`` keys replaced; an error in a key names the flag that set it."""
    from finetune import api

    given = dict(typed)
    recipe, model = v["recipe"], v["model"]
    if model is not None and v["weights"] is None and recipe is None:
        given["model.weights"] = "default"  # a new model from the command line: its own pretrained weights
    with O.name_flags(given, O.flag_map()):
        base = _base_recipe(recipe, model, given)
        r = api.apply_overrides(base, given)
    if recipe is not None and model is not None and model != base.model.name:  # record what ran, not the recipe's
        r.name = f"{base.name or recipe} (model overridden)"
        r.description = (f"{with_model(base.description, base.model.name, model)} -- model overridden: {model} "
                         f"instead of {base.model.name}")
    return r


def with_model(description: str, old: str, new: str) -> str:
    """``description`` with each mention of the model ``old`` (a whole name: ``resnet18``, not ``resnet18d``)
    replaced by ``new``: "resnet18 (ImageNet weights), all trainable" describes the run with ``--model new``
    as "new (ImageNet weights), all trainable"."""
    import re

    return re.sub(rf"(?<![\w:./-]){re.escape(old)}(?![\w:./-])", lambda _: new, description or "")


def _resume(v: dict[str, Any], typed: dict[str, Any], reporter) -> None:
    """``--resume RUN``: continue the run as it was configured; only ``--epochs`` may change."""
    from finetune import api

    extra = sorted(set(typed) - {"train.epochs"})
    if v["recipe"] or extra or v["out"]:
        flags = ", ".join(dict.fromkeys(["--recipe"] * bool(v["recipe"]) + ["--out"] * bool(v["out"])
                                        + [O.flag_map()[k] for k in extra]))
        raise api.ConfigError(f"--resume continues a run exactly as it was configured; drop {flags} (only --epochs "
                              "may change)")
    with api.trusted(v["trust_checkpoint"]):  # a last.pt holding pickled objects loads only when trusted
        _run(lambda: api.train(None, resume=v["resume"], epochs=v["epochs"], reporter=reporter))


def _base_recipe(recipe: Optional[str], model: Optional[str], given: dict):
    """What the flags override: the named recipe; for ``--model`` without ``--recipe``, the ``lp-ft`` recipe when
    the model starts from pretrained weights and no freeze flag is given (head first on cached features, then
    everything at a lower LR: what practitioners do, fastai's ``fine_tune``), else (random init, smallcnn, or a
    freeze plan of the user's own) the generic defaults (light augmentation, the backbone's input size, SGD 0.01)
    rather than the smallcnn-tuned ``default`` recipe; with neither, the ``default`` recipe (the main job). The
    start-up lines name the recipe that runs."""
    from finetune import api

    if recipe is None and model is not None:
        weights = given.get("model.weights")
        pretrained = weights not in (None, "none") and not (model.strip() == "smallcnn" and weights == "default")
        if pretrained and not any(k.startswith("freeze.") and k != "freeze.bn" for k in given):
            return api.load_recipe("lp-ft")
        r = api.Recipe()
        init = ("its pretrained weights" if weights in ("default", "pretrained") else f"weights '{weights}'") \
            if pretrained else "random init"
        r.name, r.description = f"{model}-cli", f"{model} from {init}, configured from the command line"
        return r
    return api.load_recipe(recipe or "default")


def _run(fn) -> None:
    """Run training (SIGTERM stops it as Ctrl-C does); under torchrun, leave the process group cleanly whatever
    happens."""
    from finetune.api import shutdown_distributed, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            fn()
    finally:
        shutdown_distributed()
