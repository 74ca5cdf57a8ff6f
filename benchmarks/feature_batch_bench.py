"""The batch size of the frozen-feature pass on a CPU: images/s of the folded, channels-last frozen backbone per
batch size, in ONE process, interleaved rounds (4 8 16 32 64, 4 8 ...) so load hits every size alike.

    python benchmarks/feature_batch_bench.py [--models tf_efficientnet_lite0,resnet18,...] [--rounds 3]

What ``finetune`` runs for a probe or a first linear probe: the model up to its head (``num_classes=0``), eval mode,
``torch.inference_mode()``, conv+BN folded (finetune/models/fold.py), channels-last, in the precision
``--precision auto`` picks here (bf16 autocast on a CPU with native bf16, else fp32). Random init: speed does not
depend on the weights. The table gives the best round's images/s per size and its ratio to batch 64 (the size the
feature pass used before it was measured); ``speedups/feature_cache.py``'s ``feature_batch_size`` is the rule this
chose.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.models.fold import folded_copy  # noqa: E402
from finetune.training.engine import autocast  # noqa: E402

SIZES = (4, 8, 16, 32, 64)
MODELS = "tf_efficientnet_lite0,tf_efficientnet_lite1,efficientnet_b0,resnet18,resnet50,convnext_tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=128, help="images per timed pass (default 128)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="batch sizes (64 must be one of them)")
    args = ap.parse_args()
    sizes = tuple(int(b) for b in args.sizes.split(","))
    import timm

    from finetune.training.engine import resolve_precision

    dev = torch.device("cpu")
    prec = resolve_precision("auto", dev)
    print(f"CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, precision {prec}; best of {args.rounds} rounds, {args.images} images a pass\n")
    print("| model | " + " | ".join(f"bs {b} img/s" for b in sizes) + " | best | best / bs 64 |")
    print("|---|" + "---:|" * (len(sizes) + 2))
    for name in args.models.split(","):
        m = timm.create_model(name, num_classes=0).eval().to(memory_format=torch.channels_last)
        runs = {}
        for b in sizes:
            x = torch.randn(b, 3, 224, 224).contiguous(memory_format=torch.channels_last)
            with autocast(dev, prec):
                f, _ = folded_copy(m, x)
            runs[b] = (f, x)
        best = {b: 0.0 for b in sizes}
        for _ in range(args.rounds):
            for b, (f, x) in runs.items():
                k = max(1, args.images // b)
                with torch.inference_mode(), autocast(dev, prec):
                    f(x)
                    t = time.perf_counter()
                    for _ in range(k):
                        f(x)
                best[b] = max(best[b], b * k / (time.perf_counter() - t))
        top = max(best, key=best.get)
        print(f"| {name} | " + " | ".join(f"{best[b]:.1f}" for b in sizes) + f" | {top} | "
              f"{best[top] / best[64]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
