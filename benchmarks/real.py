"""Where the benchmarks find the real pretrained weights and photos (../shared beside the checkout, else
/work/shared); importing this also puts the checkout first on sys.path, so a benchmark runs this tree's finetune."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.safetensors"
DATA = SHARED / "data" / "flowers12"
MODEL = "timm:tf_efficientnet_lite0"
