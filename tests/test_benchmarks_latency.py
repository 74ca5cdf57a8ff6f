"""benchmarks/latency.py: the parts that run without the real weights and photos (the benchmark itself needs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "latency.py"


@pytest.mark.subprocess
def test_latency_help_and_a_missing_data_folder():
    h = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert h.returncode == 0, h.stderr
    assert h.stdout.startswith("usage: benchmarks/latency.py [-h] [--data DATA]")
    for flag in ("--runs", "--first-runs", "--quick", "--out"):
        assert flag in h.stdout
    r = subprocess.run([sys.executable, str(SCRIPT), "--data", "/nonexistent"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == ("benchmarks/latency.py: error: --data /nonexistent: no train/ folder there "
                                         "(an image folder with train/ and val/)")
    assert r.stdout == ""


def _latency_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("latency_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("latency_bench", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # torch-free: the benchmark imports nothing heavy itself
    return mod


def test_latency_table_judges_goals_on_the_min():
    L = _latency_module()
    rows = [L.Row("floor", [], 3, times=[1.2, 1.0, 1.1]),
            L.Row("help", [], 3, ("abs", 0.5), times=[0.6, 0.45, 0.7]),
            L.Row("predict", [], 2, ("floor", 1.5), times=[2.6, 2.8]),
            L.Row("oops", [], 1, ("abs", 0.5), mistake=True, times=[0.3], failure="no Error line (rc 0)"),
            L.Row("first", [], 1, ("ratio", 10.0), times=[30.0])]
    assert L.table(rows, 1.0, 9.5).splitlines() == [
        "| command | runs | min s | median s | min - floor | goal | met? |",
        "|---|---:|---:|---:|---:|---|---|",
        "| `floor` | 3 | 1.00 | 1.10 | +0.00 |  |  |",
        "| `help` | 3 | 0.45 | 0.60 | -0.55 | <= 0.5 s | yes |",
        "| `predict` | 2 | 2.60 | 2.70 | +1.60 | <= floor + 1.5 s | **no** |",
        "| `oops` | 1 | 0.30 | 0.30 | -0.70 | <= 0.5 s | no Error line (rc 0) |",
        "| `first` | 1 | 30.00 | 30.00 | +29.00 | >= 10x faster than tutorial | **no** |",
    ]
    assert L.goal_met(("ratio", 10.0), 30.0, 1.0, 10.0) and not L.goal_met(("ratio", 10.0), 30.0, 1.0, None)
