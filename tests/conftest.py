import os

import pytest

# Tests never download: make any accidental hub access fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture
def cli(runner):
    """Invoke the CLI; returns click's Result with .exit_code, .stdout, .stderr."""
    from finetune.cli.app import app

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def mini_sample(tmp_path_factory):
    """The bundled sample's four classes with 12 train / 6 val images each (48 / 24, one copy per session): for
    training runs whose assertions hold on any data (resume is exact, files are written, a flag is honoured)."""
    from helpers import sample_subset

    return sample_subset(tmp_path_factory.mktemp("mini-sample"), train=12, val=6)


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own empty feature store: tests never write to the user's ~/.cache/finetune."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("finetune-cache")))


@pytest.fixture(autouse=True)
def _no_run_report(request, monkeypatch):
    """Training runs in tests skip report.html and the TensorBoard pictures (matplotlib figures: about a second a
    run) unless the test is marked ``report``; the report's own tests (tests/test_report.py) run them for real."""
    if request.node.get_closest_marker("report") is None:
        import finetune.reporting.report

        monkeypatch.setattr(finetune.reporting.report, "after_run", lambda *a, **k: None)
        monkeypatch.setattr(finetune.reporting.report, "log_tensorboard", lambda *a, **k: None)
