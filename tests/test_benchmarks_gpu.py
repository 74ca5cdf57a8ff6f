"""benchmarks/gpu.sh: the parts that run without a GPU (the GPU run itself needs a CUDA machine)."""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.sh"

# bash in a child process; the file imports no pytest (a plain `pytest.mark.subprocess` once it does)
pytestmark = __import__("pytest").mark.subprocess


def test_gpu_sh_parses_and_refuses_an_unknown_argument():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "gpu.sh: unknown argument '--fast' (use --dry-run or nothing)"
    h = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "bash benchmarks/gpu.sh --dry-run" in h.stdout
