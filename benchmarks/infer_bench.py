"""Frozen inference on this machine: eager vs conv+BN folding vs bf16 weights vs torch.compile, in ONE process.

    python benchmarks/infer_bench.py [--quick] [--compile] [--threads 1,2]

resnet18 (random init) and EfficientNet-Lite0 (the shared ImageNet weights when ../shared/weights has them, else
random init), batch 64, 224 px, eval mode, ``torch.inference_mode()``, bf16 autocast + channels_last (what
finetune runs on a CPU with native bf16). The variants run in interleaved rounds (A B C A B C ...) so a load change
on a shared machine hits them alike; the table gives the best round's images/s per variant (median in brackets),
its ratio to eager and the
largest difference of the outputs from eager (relative to eager's largest |value|). ``--compile`` adds
``torch.compile`` (inductor) of the folded copy with a fixed batch shape; its compile time (first call) is
reported apart, with the number of images after which it pays back.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.models.fold import folded_copy  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "weights" / "tf_efficientnet_lite0.safetensors"
CL = torch.channels_last


def models() -> dict:
    import timm

    torch.manual_seed(0)
    lite0 = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    if WEIGHTS.is_file():
        from safetensors.torch import load_file

        lite0.load_state_dict(load_file(str(WEIGHTS)))
    r18 = torchvision.models.resnet18()
    # random-init BatchNorm has mean 0 / var 1: give it statistics, so folding has something to fold
    for m in r18.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return {"resnet18 (random init)": r18, "tf_efficientnet_lite0" + (" (ImageNet)" if WEIGHTS.is_file() else ""):
            lite0}


def variants(model: torch.nn.Module, x: torch.Tensor, with_compile: bool) -> tuple[dict, dict]:
    model = model.eval().to(memory_format=CL)
    folded, n = folded_copy(model, x)
    bf16w = copy.deepcopy(folded).to(torch.bfloat16)
    out = {"eager": model, f"folded ({n} pairs)": folded, "folded + bf16 weights": bf16w}
    extra = {}
    if with_compile:
        comp = torch.compile(copy.deepcopy(folded), dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            comp(x)
        extra["compile_s"] = time.perf_counter() - t0
        out["folded + torch.compile"] = comp
    return out, extra


def bench(model: torch.nn.Module, x: torch.Tensor, rounds: int, with_compile: bool) -> dict:
    vs, extra = variants(model, x, with_compile)
    ips = {k: [] for k in vs}
    outs = {}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for k, m in vs.items():  # warm-up (oneDNN primitive creation) and the outputs for the error column
            outs[k] = m(x).float()
        for _ in range(rounds):
            for k, m in vs.items():
                t0 = time.perf_counter()
                m(x)
                ips[k].append(x.shape[0] / (time.perf_counter() - t0))
    with torch.inference_mode():
        fp32 = vs["eager"](x).float()  # the fp32 reference: how far bf16 eager already is from it
    ref = outs["eager"]
    rows = {}
    for k in vs:
        med = max(ips[k])  # the best round: on a shared machine the least disturbed one
        rows[k] = {"ips": med, "vs_eager": med / max(ips["eager"]), "median_ips": statistics.median(ips[k]),
                   "max_rel_diff": float((outs[k] - ref).abs().max() / ref.abs().max()),
                   "vs_fp32": float((outs[k] - fp32).abs().max() / fp32.abs().max())}
    if "compile_s" in extra:
        k = "folded + torch.compile"
        gain = 1 / rows["eager"]["ips"] - 1 / rows[k]["ips"]  # seconds saved per image
        rows[k]["compile_s"] = extra["compile_s"]
        rows[k]["pays_back_after_images"] = extra["compile_s"] / gain if gain > 0 else float("inf")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds at batch 16")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (inductor); slow to compile")
    ap.add_argument("--threads", default=None, help="comma-separated torch thread counts to try (default: as set)")
    args = ap.parse_args(argv)
    batch, rounds = (16, 3) if args.quick else (64, 10)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=CL)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    print(f"torch {torch.__version__}, batch {batch}, 224 px, bf16 autocast + channels_last, {rounds} interleaved "
          f"rounds, best round's images/s (median in brackets)")
    print("| model | threads | variant | img/s | vs eager | max rel. diff vs bf16 eager | vs fp32 eager | compile s | "
          "pays back after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model in models().items():
        for t in threads:
            torch.set_num_threads(t)
            for k, r in bench(model, x, rounds, args.compile).items():
                comp = (f"{r['compile_s']:.1f} | {r['pays_back_after_images']:.0f} images"
                        if "compile_s" in r else "- | -")
                print(f"| {name} | {t} | {k} | {r['ips']:.1f} ({r['median_ips']:.1f}) | {r['vs_eager']:.2f}x | "
                      f"{r['max_rel_diff']:.1e} | "
                      f"{r['vs_fp32']:.1e} | {comp} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
