"""Side-by-side speed benchmark: a tutorial-style hand loop against finetune, in ONE process.

    python benchmarks/bench.py            # the full run (~10-15 min on a 2-core CPU)
    python benchmarks/bench.py --quick    # fewer images and epochs, a smoke test (~2 min)

Each row also gets a **ceiling**: the model-only time for the same work (same model, batch, bf16 autocast,
channels_last) on synthetic tensors, measured in the same run (:func:`ceiling_of`), and finetune's fraction of it
(``model-only s / finetune s``; above 1 where the feature cache skips work the ceiling's loop does).

Same data, same starting weights (random init saved once to a file: no pretrained download happens, so the
accuracies are those of random-init training and are only comparable with each other), same seed, same sample
order (the hand loop draws finetune's EpochSampler permutation, so the accuracy comparison is tight; drawing it
costs the same as shuffle=True), same optimizer and hyperparameters (SGD lr 0.01 momentum 0.9, no weight decay,
constant LR, batch 32), same number of epochs, and a val pass after every epoch in both.

The hand loop is the PyTorch tutorial's: torchvision ImageFolder + PIL transforms every epoch (Resize, CenterCrop,
ToTensor, Normalize — the same eval transform finetune uses, ``augment: none``), fp32, channels-first, the full
model forward every epoch (frozen layers have ``requires_grad=False`` and their BatchNorm is kept in eval mode),
``torch.no_grad()`` for evaluation, num_workers=0 (a 2-core machine has no spare core for a loader process).
finetune runs ``finetune.train`` / ``finetune.evaluate_checkpoint`` with its defaults (``precision auto``,
``channels_last auto``, ``cache_features auto``, decoded-image cache). Wall time is the whole call for both,
data set construction included. Peak RSS is sampled every 20 ms during each run.

Data: ../shared/data/flowers12 (720 train / 240 val photos, 12 classes) when present, else the bundled sample.
Writes benchmarks/results/latest.json and prints a table (markdown with --markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import datasets, transforms

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import finetune  # noqa: E402
from finetune.config import apply_overrides, load_recipe  # noqa: E402
from finetune.training.engine import Reporter  # noqa: E402
from finetune.models.smallcnn import SmallCNN  # noqa: E402

SEED = 0
LR, MOMENTUM, BATCH = 0.01, 0.9, 32
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TARGETS = {"linear probe": 15.0, "partial freeze": 2.5, "full fine-tune": 2.5, "eval": 2.5}
PARTIAL = ["conv1", "bn1", "layer1", "layer2", "layer3"]
LITE0_PARTIAL = ["conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]  # stem + 4 of 7 stages


def is_frozen(name: str, frozen: list[str]) -> bool:
    """``frozen``: module paths (``layer1``, ``blocks.3``); ``["*"]``: everything but the ``fc`` head."""
    if frozen == ["*"]:
        return not name.startswith("fc.")
    return any(name == f or name.startswith(f + ".") for f in frozen)


# ----------------------------------------------------------------------------------------------- measuring

class PeakRSS:
    """Peak resident set size (MB) of this process while the block runs, sampled from /proc every 20 ms."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss()) / 2**20


class Capture(Reporter):
    """Keeps finetune's run summary and notes (what precision/layout/cache it picked)."""

    def __init__(self):
        self.info, self.notes = {}, []

    def start(self, info):
        self.info = info

    def note(self, message):
        self.notes.append(message)


# ----------------------------------------------------------------------------------------------- the ceiling

def model_only(make_model, *, train: bool, size: int, batch: int, classes: int, frozen: list[str] | None = None,
               precision: str = "bf16", channels_last: bool = True, min_s: float = 3.0, min_steps: int = 4,
               device: str = "cpu", compile_: bool = False, autotune: bool = False) -> float:
    """Images/s of the model alone on synthetic tensors: the ceiling for the same model, batch, precision and layout.

    ``train``: forward + backward + SGD step with ``frozen`` applied as in :func:`hand_train` (frozen BatchNorm in
    eval mode); else a forward under ``eval()`` + ``inference_mode``. Two warm-up calls, then at least ``min_steps``
    calls and ``min_s`` seconds. No data loading, no decoding, no metrics: what a loop could reach at best.
    ``device`` cuda: the clock waits for the GPU (``synchronize``); ``compile_``: ``torch.compile`` the model (the
    warm-up calls pay the compile time); ``autotune``: the depthwise convs finetune's ``train.autotune`` switches to
    an fp32 backward are switched here too (the model-only step with finetune's kernels)."""
    torch.manual_seed(SEED)
    model = make_model().to(device)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=mf)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=mf)
    y = torch.randint(0, classes, (batch,), device=device)
    kind = torch.device(device).type
    cast = (lambda: torch.autocast(kind, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    net = torch.compile(model) if compile_ else model
    if autotune and train:
        from finetune.speedups import depthwise as dwgrad

        dwgrad.switch(model, dwgrad.tune(model, tuple(x.shape), channels_last)["switched"])
    if train:
        if frozen:
            for name, p in model.named_parameters():
                p.requires_grad = not is_frozen(name, frozen)
        still = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                 and not any(p.requires_grad for p in m.parameters())]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
        loss_fn = nn.CrossEntropyLoss()

        def once():
            model.train()
            for m in still:
                m.eval()
            with cast():
                loss = loss_fn(net(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        model.eval()

        def once():
            with torch.inference_mode(), cast():
                net(x)
    once()
    once()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < min_s:
        once()
        n += 1
        sync()
    return n * batch / (time.perf_counter() - t0)


def ceiling_of(make_model, *, size: int, classes: int, train_images: int, val_images: int, epochs: int,
               frozen: list[str] | None, probe: bool = False, eval_only: bool = False, quick: bool = False,
               autotune: bool = False) -> dict:
    """The model-only seconds for a scenario's work: ``epochs`` x (train steps over the train images at batch 32 +
    forward over val at batch 64); a probe's work is ONE forward over train + val (what the feature cache needs);
    eval is one forward over val. ``ceiling_s / finetune wall s`` is finetune's fraction of the ceiling."""
    kw = dict(size=size, classes=classes, min_s=1.0 if quick else 3.0)
    fwd = model_only(make_model, train=False, batch=64, **kw)
    out = {"forward_ips": fwd}
    if probe:
        out["ceiling_s"] = (train_images + val_images) / fwd
    elif eval_only:
        out["ceiling_s"] = val_images / fwd
    else:
        out["train_ips"] = model_only(make_model, train=True, batch=BATCH, frozen=frozen, **kw)
        out["ceiling_s"] = epochs * (train_images / out["train_ips"] + val_images / fwd)
        if autotune:  # the same step with finetune's per-layer kernel choice (finetune/speedups/depthwise.py)
            out["train_ips_tuned"] = model_only(make_model, train=True, batch=BATCH, frozen=frozen, autotune=True,
                                                **kw)
    return out


# ----------------------------------------------------------------------------------------------- the hand loop

def hand_transform(size: int, resize: int, mean, std):
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def epoch_order(n: int, epoch: int) -> list[int]:
    """finetune's EpochSampler permutation for (SEED, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED * 1_000_003 + epoch)).tolist()


def hand_evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    return correct / total


def hand_train(make_model, weights: Path, root: Path, tf, epochs: int, frozen: list[str] | None,
               limit: int | None) -> dict:
    """The tutorial loop. ``frozen``: module prefixes to freeze (None = nothing; ["*"] = all but fc)."""
    torch.manual_seed(SEED)
    train_ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    val_ds = datasets.ImageFolder(str(root / "val"), transform=tf)
    if limit:
        train_ds = torch.utils.data.Subset(train_ds, range(0, len(train_ds), max(1, len(train_ds) // limit)))
    model = make_model()
    model.load_state_dict(torch.load(weights, weights_only=True))
    frozen_mods = []
    if frozen:
        for name, p in model.named_parameters():
            p.requires_grad = not is_frozen(name, frozen)
        frozen_mods = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
                       and not any(p.requires_grad for p in m.parameters())]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=BATCH, shuffle=False)
    acc = None
    for epoch in range(epochs):
        model.train()
        for m in frozen_mods:  # frozen BatchNorm keeps its running statistics, as finetune's bn: frozen
            m.eval()
        loader = torch.utils.data.DataLoader(train_ds, batch_size=BATCH, sampler=epoch_order(len(train_ds), epoch))
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        acc = hand_evaluate(model, val_loader)
    return {"val_acc": acc, "images": epochs * (len(train_ds) + len(val_ds)), "model": model}


# ----------------------------------------------------------------------------------------------- finetune

def ft_train(model: str, weights: Path, root: Path, size: int, epochs: int, freeze: dict, out: Path,
             limit: int | None, extra: dict | None = None) -> dict:
    r = load_recipe("default")
    over = {"model.name": model, "model.weights": str(weights), "data.path": str(root), "data.image_size": size,
            "data.augment": "none", "optimizer.name": "sgd", "optimizer.lr": LR, "optimizer.momentum": MOMENTUM,
            "optimizer.weight_decay": 0.0, "scheduler.name": "constant", "scheduler.warmup_epochs": 0.0,
            "train.epochs": epochs, "train.batch_size": BATCH, "train.seed": SEED, "train.tensorboard": False,
            "train.graph": False, **freeze, **(extra or {})}
    r = apply_overrides(r, over)
    cap = Capture()
    res = finetune.train(r, out=out, overwrite=True, reporter=cap)
    n_train, n_val = cap.info.get("train_images", 0), cap.info.get("val_images", 0)
    ips = [e["images_per_sec"] for e in res.epochs if e.get("images_per_sec")]
    return {"val_acc": res.epochs[-1]["val_acc"], "images": epochs * (n_train + n_val), "n_train": n_train,
            "n_val": n_val, "loop_ips": sum(ips) / len(ips) if ips else None,
            "picked": {k: cap.info.get(k) for k in ("precision", "channels_last", "feature_cache")},
            "notes": cap.notes, "run_dir": res.run_dir}


# ----------------------------------------------------------------------------------------------- real weights

LITE0 = "tf_efficientnet_lite0"
REAL_WEIGHTS = REPO.parent / "shared" / "weights" / f"{LITE0}.safetensors"


def lite0_hand(weights: Path, root: Path, epochs: int, head_only: bool, bf16: bool) -> dict:
    """The 20-line loop a practitioner writes with real weights: timm's model, the pretrained file,
    ``reset_classifier(C)`` (PyTorch's default Linear init), timm's eval transform (no augmentation), SGD 0.01
    momentum 0.9, batch 32, constant LR. ``head_only``: everything but the classifier frozen and the whole model in
    eval mode (the tutorial's probe, fp32); else everything trains in train mode (bf16 autocast + channels_last when
    ``bf16``). Val accuracy and wall time are recorded after every epoch."""
    import timm
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    model = timm.create_model(LITE0, num_classes=1000)
    model.load_state_dict(load_file(str(weights)))
    train_ds = datasets.ImageFolder(str(root / "train"))
    model.reset_classifier(len(train_ds.classes))
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    train_ds.transform = tf
    val_ds = datasets.ImageFolder(str(root / "val"), transform=tf)
    if head_only:
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("classifier.")
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=64, shuffle=False)
    cl = (lambda x: x.contiguous(memory_format=torch.channels_last)) if bf16 else (lambda x: x)
    per_epoch = []
    for epoch in range(epochs):
        model.train(not head_only)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=BATCH, sampler=epoch_order(len(train_ds), epoch))
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(cl(x)).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        correct = total = 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for x, y in val_loader:
                correct += (model(cl(x)).argmax(1) == y).sum().item()
                total += y.numel()
        per_epoch.append({"val_acc": correct / total, "wall_s": time.perf_counter() - t0})
    return {"val_acc": per_epoch[-1]["val_acc"], "per_epoch": per_epoch, "images": epochs * (len(train_ds) +
                                                                                            len(val_ds))}


# recipes that name resnet18 layers run on Lite0 with the same plan by stage address ('finetune inspect' lists them)
LITE0_PLANS = {"resnet18-freeze-early": {"freeze.layers": [], "freeze.stages": 4}}  # stem, blocks.0-2 frozen


def ft_recipe(recipe: str, weights: Path, root: Path, epochs: int, out: Path, extra: dict | None = None) -> dict:
    """A shipped recipe as a user runs it on Lite0: ``--recipe R --model timm:LITE0 --weights W --data D``."""
    over = {"model.name": f"timm:{LITE0}", "model.weights": str(weights), "data.path": str(root),
            "train.epochs": epochs, "train.tensorboard": False, "train.graph": False, **(extra or {})}
    cap = Capture()
    res = finetune.train(apply_overrides(load_recipe(recipe), over), out=out, overwrite=True, reporter=cap)
    return {"val_acc": res.epochs[-1]["val_acc"], "per_epoch": [{"val_acc": e["val_acc"]} for e in res.epochs],
            "images": epochs * (cap.info.get("train_images", 0) + cap.info.get("val_images", 0)),
            "picked": {k: cap.info.get(k) for k in ("precision", "channels_last", "feature_cache")}}


def real_rows(root: Path, tmp: Path, quick: bool, recipes: list[str], rows: list[dict], save) -> list[dict]:
    """Every shipped recipe that fits a timm model, on Lite0 with real ImageNet weights, beside the hand loops,
    in one process. Goals (issue 11): the probe >= the hand probe - 0.5 point and >= 10x faster; lp-ft >= the best
    hand loop at the same epochs; full-finetune (2 epochs) >= the hand full fine-tune at 2 epochs."""
    ep = 2 if quick else 5

    def add(kind, name, what, epochs, fn):
        print(f"[real] {name} ...", file=sys.stderr, flush=True)
        r = timed(fn)
        rows.append({"kind": kind, "name": name, "what": what, "epochs": epochs, **r})
        save()
        print(f"[real] {name}: {r['val_acc']:.4f} in {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
        return r

    add("hand", "hand: head only", "backbone frozen in eval mode, PyTorch's default head init, SGD 0.01, fp32",
        ep, lambda: lite0_hand(REAL_WEIGHTS, root, ep, head_only=True, bf16=False))
    add("hand", "hand: all trainable", "everything trains, PyTorch's default head init, SGD 0.01, bf16 + "
        "channels_last", ep, lambda: lite0_hand(REAL_WEIGHTS, root, ep, head_only=False, bf16=True))
    for recipe in recipes:
        epochs = min(2, ep) if recipe == "full-finetune" else ep
        extra = LITE0_PLANS.get(recipe, {})
        what = describe_recipe(recipe) + (f" (on Lite0: {extra})" if extra else "")
        add("finetune", recipe, what, epochs,
            lambda recipe=recipe, epochs=epochs, extra=extra: ft_recipe(recipe, REAL_WEIGHTS, root, epochs,
                                                                     tmp / f"real-{recipe}", extra))
    for prec in ("fp32", "bf16"):  # precision auto, checked on real features (issue 11, item 5)
        add("precision", f"linear-probe {prec}", "the linear-probe recipe with --precision " + prec, ep,
            lambda prec=prec: ft_recipe("linear-probe", REAL_WEIGHTS, root, ep, tmp / f"real-lp-{prec}",
                                        {"train.precision": prec}))
    return rows


def describe_recipe(name: str) -> str:
    return load_recipe(name).description


def real_goals(rows: list[dict]) -> list[str]:
    by = {r["name"]: r for r in rows}
    hp, hf = by.get("hand: head only"), by.get("hand: all trainable")
    out = []

    def at(r, epochs):  # a hand row's accuracy after `epochs` epochs
        return r["per_epoch"][min(epochs, len(r["per_epoch"])) - 1]["val_acc"]

    def wall_at(r, epochs):
        return r["per_epoch"][min(epochs, len(r["per_epoch"])) - 1]["wall_s"]

    if hp and "linear-probe" in by:
        f = by["linear-probe"]
        ok = f["val_acc"] >= hp["val_acc"] - 0.005 and hp["wall_s"] / f["wall_s"] >= 10
        out.append(f"linear-probe: {100 * f['val_acc']:.1f}% vs hand head-only {100 * hp['val_acc']:.1f}% "
                   f"(goal >= -0.5 point), {hp['wall_s'] / f['wall_s']:.1f}x faster (goal >= 10x): "
                   f"{'met' if ok else 'MISSED'}")
    if hp and hf and "lp-ft" in by:
        f, e = by["lp-ft"], by["lp-ft"]["epochs"]
        best = max(at(hp, e), at(hf, e))
        out.append(f"lp-ft ({e} epochs): {100 * f['val_acc']:.1f}% vs best hand loop at {e} epochs "
                   f"{100 * best:.1f}%: {'met' if f['val_acc'] >= best else 'MISSED'}")
    for name in ("full-finetune", "gradual-unfreeze", "resnet18-freeze-early", "first-n"):
        if hf and name in by:
            f, e = by[name], by[name]["epochs"]
            out.append(f"{name} ({e} epochs): {100 * f['val_acc']:.1f}% in {f['wall_s']:.0f} s vs hand all "
                       f"trainable at {e} epochs {100 * at(hf, e):.1f}% in {wall_at(hf, e):.0f} s: "
                       f"{'met' if f['val_acc'] >= at(hf, e) else 'MISSED'}")
    return out


# ----------------------------------------------------------------------------------------------- driver

def timed(fn):
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        out = fn()
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = rss.peak
    out.pop("model", None)
    return out


def subset_root(root: Path, per_class_train: int, per_class_val: int, tmp: Path) -> Path:
    """A smaller copy (symlinks) of an ImageFolder root for --quick."""
    dst = tmp / "subset"
    for split, k in (("train", per_class_train), ("val", per_class_val)):
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:k]:
                (dst / split / cls.name / f.name).symlink_to(f.resolve())
    return dst


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
            "bf16_native": finetune.training.engine.cpu_has_native_bf16(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 train / 3 val images per class, fewer epochs")
    ap.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: flowers12 or "
                    "the bundled sample)")
    ap.add_argument("--only", default=None, help="comma-separated scenarios: real,probe,partial,full,eval,lite0,"
                    "smallcnn,"
                    "prec (real: shipped recipes on EfficientNet-Lite0 with real ImageNet weights, when "
                    "../shared/weights has them)")
    ap.add_argument("--recipes", default="linear-probe,lp-ft,full-finetune,gradual-unfreeze,resnet18-freeze-early",
                    help="recipes for the real-weights rows")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latest.json"))
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--per-class", default=None, help="TRAIN,VAL: use only that many images per class (the "
                    "epochs stay those of the full run)")
    ap.add_argument("--render", default=None, help="print the table of a saved JSON file and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    logging.getLogger("finetune").setLevel(logging.ERROR)
    # features are computed in the run, never read from an earlier run's persistent store: the rows measure work
    os.environ["FINETUNE_CACHE"] = "off"
    shared = REPO.parent / "shared" / "data" / "flowers12"
    root = Path(args.data) if args.data else (shared if shared.is_dir() else REPO / "data" / "sample")
    only = set(args.only.split(",")) if args.only else {"real", "probe", "partial", "full", "eval", "lite0",
                                                         "smallcnn", "prec"}
    tmp = Path(tempfile.mkdtemp(prefix="ftbench-"))
    if args.quick:
        root = subset_root(root, 5, 3, tmp)
    elif args.per_class:
        k_train, k_val = (int(v) for v in args.per_class.split(","))
        root = subset_root(root, k_train, k_val, tmp)
    ep_probe, ep_partial, ep_full, ep_small = (2, 1, 1, 2) if args.quick else (5, 2, 1, 10)
    classes = len([p for p in (root / "train").iterdir() if p.is_dir()])

    # the same random-init weights for both sides, saved once
    torch.manual_seed(SEED)
    w_resnet = tmp / "resnet18_init.pth"
    torch.save(torchvision.models.resnet18(num_classes=classes).state_dict(), w_resnet)
    w_small = tmp / "smallcnn_init.pth"
    torch.save(SmallCNN(classes).state_dict(), w_small)
    tf224 = hand_transform(224, 256, *IMAGENET)
    tf32 = hand_transform(32, 32, (0.5,) * 3, (0.5,) * 3)
    resnet = lambda: torchvision.models.resnet18(num_classes=classes)  # noqa: E731

    # warm-up: oneDNN kernel selection and first-call costs for both precisions/layouts, so that neither side of
    # the first scenario pays them
    with torch.inference_mode():
        net = resnet().eval()
        x = torch.randn(8, 3, 224, 224)
        net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    rows = []
    prec = []
    real: list[dict] = []
    data_label = (f"{root} (quick subset)" if args.quick else
                  f"{root}: {args.per_class} train,val images per class of {args.data or 'flowers12'}"
                  if args.per_class else str(root))

    def save():  # after every scenario, so an interrupted run keeps what it measured
        info = {"machine": machine(), "data": data_label, "quick": args.quick, "rows": rows, "precision": prec,
                "real": real, "real_goals": real_goals(real)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(info, indent=2, default=str))
        return info

    def pair(name, hand_fn, ft_fn, what, ceiling=None):
        print(f"[{name}] hand loop ...", file=sys.stderr, flush=True)
        h = timed(hand_fn)
        print(f"[{name}] finetune ...", file=sys.stderr, flush=True)
        f = timed(ft_fn)
        row = {"scenario": name, "what": what, "hand": h, "finetune": f, "ratio": h["wall_s"] / f["wall_s"],
               "target": TARGETS.get(name)}
        if ceiling is not None:  # the model-only time for the same work, measured now, in this process
            print(f"[{name}] model-only ceiling ...", file=sys.stderr, flush=True)
            c = ceiling(f)
            row["ceiling"] = {**c, "of_ceiling": c["ceiling_s"] / f["wall_s"]}
            if c.get("train_ips") and f.get("loop_ips") and f.get("picked", {}).get("feature_cache") != "used":
                row["ceiling"]["loop_of_ceiling"] = f["loop_ips"] / c["train_ips"]
                if c.get("train_ips_tuned"):
                    row["ceiling"]["loop_of_tuned"] = f["loop_ips"] / c["train_ips_tuned"]
        row["acc_ok"] = f["val_acc"] >= h["val_acc"] - 0.01
        row["met"] = None if row["target"] is None else bool(row["ratio"] >= row["target"] and row["acc_ok"])
        rows.append(row)
        save()
        print(f"[{name}] {h['wall_s']:.1f} s vs {f['wall_s']:.1f} s = {row['ratio']:.2f}x; val acc "
              f"{h['val_acc']:.3f} vs {f['val_acc']:.3f}; finetune picked {f.get('picked')}", file=sys.stderr,
              flush=True)
        return row

    if "real" in only and REAL_WEIGHTS.is_file():
        real_rows(root, tmp, args.quick, [r for r in args.recipes.split(",") if r], real, save)
        save()
    if "probe" in only:
        pair("linear probe", lambda: hand_train(resnet, w_resnet, root, tf224, ep_probe, ["*"], None),
             lambda: ft_train("resnet18", w_resnet, root, 224, ep_probe, {"freeze.backbone": True}, tmp / "probe",
                              None),
             f"resnet18 224px, backbone frozen, {ep_probe} epochs",
             lambda f: ceiling_of(resnet, size=224, classes=classes, train_images=f["n_train"],
                                  val_images=f["n_val"], epochs=ep_probe, frozen=["*"], probe=True, quick=args.quick))
    if "partial" in only:
        pair("partial freeze", lambda: hand_train(resnet, w_resnet, root, tf224, ep_partial, PARTIAL, None),
             lambda: ft_train("resnet18", w_resnet, root, 224, ep_partial, {"freeze.layers": PARTIAL},
                              tmp / "partial", None),
             f"resnet18 224px, conv1..layer3 frozen, {ep_partial} epochs",
             lambda f: ceiling_of(resnet, size=224, classes=classes, train_images=f["n_train"],
                                  val_images=f["n_val"], epochs=ep_partial, frozen=PARTIAL, quick=args.quick))
    full = None
    if "full" in only or "eval" in only:
        full = pair("full fine-tune", lambda: hand_train(resnet, w_resnet, root, tf224, ep_full, None, None),
                    lambda: ft_train("resnet18", w_resnet, root, 224, ep_full, {}, tmp / "full", None),
                    f"resnet18 224px, all trainable, {ep_full} epoch",
                    lambda f: ceiling_of(resnet, size=224, classes=classes, train_images=f["n_train"],
                                         val_images=f["n_val"], epochs=ep_full, frozen=None, quick=args.quick))
    if "eval" in only and full is not None:
        ckpt = Path(full["finetune"]["run_dir"]) / "last.pt"

        def hand_eval():
            model = resnet()
            model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
            val = datasets.ImageFolder(str(root / "val"), transform=tf224)
            acc = hand_evaluate(model, torch.utils.data.DataLoader(val, batch_size=64, shuffle=False))
            return {"val_acc": acc, "images": len(val)}

        def ft_eval():
            res = finetune.evaluate_checkpoint(ckpt, batch_size=64)
            return {"val_acc": res["accuracy"], "images": res["n"]}

        pair("eval", hand_eval, ft_eval, "resnet18 224px, one pass over val (the full fine-tune's checkpoint)",
             lambda f: ceiling_of(resnet, size=224, classes=classes, train_images=0, val_images=f["images"],
                                  epochs=1, frozen=None, eval_only=True, quick=args.quick))
    if "lite0" in only:  # the same two training scenarios on a depthwise-conv net (random init, saved once)
        import timm

        lite0 = lambda: timm.create_model(LITE0, num_classes=classes)  # noqa: E731
        torch.manual_seed(SEED)
        w_lite0 = tmp / "lite0_init.pth"
        torch.save(lite0().state_dict(), w_lite0)
        for name, frozen, ep, freeze in (
                ("lite0 full fine-tune", None, ep_full, {}),
                ("lite0 partial freeze", LITE0_PARTIAL, ep_partial, {"freeze.layers": LITE0_PARTIAL})):
            pair(name, lambda frozen=frozen, ep=ep: hand_train(lite0, w_lite0, root, tf224, ep, frozen, None),
                 lambda ep=ep, freeze=freeze, name=name: ft_train(f"timm:{LITE0}", w_lite0, root, 224, ep, freeze,
                                                                  tmp / name.replace(" ", "-"), None),
                 f"tf_efficientnet_lite0 224px, {'stem + blocks.0-3 frozen' if frozen else 'all trainable'}, "
                 f"{ep} epoch{'s' if ep > 1 else ''}",
                 lambda f, frozen=frozen, ep=ep: ceiling_of(lite0, size=224, classes=classes,
                                                            train_images=f["n_train"], val_images=f["n_val"],
                                                            epochs=ep, frozen=frozen, quick=args.quick,
                                                            autotune=True))
    if "smallcnn" in only:
        pair("smallcnn 32px", lambda: hand_train(lambda: SmallCNN(classes), w_small, root, tf32, ep_small, None,
                                                 None),
             lambda: ft_train("smallcnn", w_small, root, 32, ep_small, {}, tmp / "small", None),
             f"smallcnn 32x32, all trainable, {ep_small} epochs",
             lambda f: ceiling_of(lambda: SmallCNN(classes), size=32, classes=classes, train_images=f["n_train"],
                                  val_images=f["n_val"], epochs=ep_small, frozen=None, quick=args.quick))
    if "prec" in only:  # item 2: bf16 vs fp32 of the default and linear-probe recipes, finetune alone
        for recipe, over in (("default", {}),
                             ("linear-probe", {"model.weights": str(w_resnet), "data.path": str(root),
                                               "data.augment": "none", "train.epochs": ep_probe})):
            accs = {}
            for p in ("fp32", "bf16"):
                r = apply_overrides(load_recipe(recipe), {**over, "train.precision": p, "train.tensorboard": False})
                if args.quick and recipe == "default":
                    r.train.epochs = 4
                t0 = time.perf_counter()
                res = finetune.train(r, out=tmp / f"prec-{recipe}-{p}", overwrite=True)
                accs[p] = {"val_acc": res.epochs[-1]["val_acc"], "wall_s": time.perf_counter() - t0}
            prec.append({"recipe": recipe, **accs,
                         "diff_points": 100 * abs(accs["bf16"]["val_acc"] - accs["fp32"]["val_acc"])})
            print(f"[precision] {recipe}: {accs}", file=sys.stderr, flush=True)
            save()
    info = save()
    print(render(info, markdown=args.markdown))
    return 0


def _ceiling_cells(c: dict | None) -> list[str]:
    """The model-only seconds for the same work (with the train-step and forward img/s it came from) and finetune's
    fraction of it: whole call (data set construction included), and the training loop alone where the full model
    runs every step (``loop``: the epochs' own img/s over the model-only train step)."""
    if not c:
        return ["-", "-"]
    ips = f"{c['train_ips']:.1f} / {c['forward_ips']:.1f}" if c.get("train_ips") else f"fwd {c['forward_ips']:.1f}"
    if c.get("train_ips_tuned"):
        ips += f"; with finetune's kernels {c['train_ips_tuned']:.1f} train"
    frac = f"{c['of_ceiling']:.2f}x" + (f" (loop {c['loop_of_ceiling']:.2f}x" + (
        f", {c['loop_of_tuned']:.2f}x of the tuned step" if c.get("loop_of_tuned") else "") + ")"
        if c.get("loop_of_ceiling") else "")
    return [f"{c['ceiling_s']:.1f} ({ips})", frac]


def render(info: dict, markdown: bool = True) -> str:
    """The table (markdown); ``python benchmarks/bench.py --render FILE.json`` prints it again."""
    m = info["machine"]
    lines = []
    if info.get("real"):
        lines += [f"Real weights: timm tf_efficientnet_lite0 (ImageNet) on {info['data']}; {m['cpu']}, "
                  f"{m['cores']} cores, torch {m['torch']}, {m['date']}", "",
                  "| run | what | epochs | val acc | wall s | val acc per epoch |", "|---|---|---|---|---|---|"]
        for r in info["real"]:
            per = " ".join(f"{100 * e['val_acc']:.1f}" for e in r["per_epoch"]) if r.get("per_epoch") else ""
            lines.append(f"| {r['name']} | {r['what']} | {r['epochs']} | {100 * r['val_acc']:.1f}% | "
                         f"{r['wall_s']:.1f} | {per} |")
        lines += [""] + [f"- {g}" for g in info.get("real_goals", [])] + [""]
    if not info["rows"]:
        return "\n".join(lines)
    head = ["scenario", "hand loop s", "finetune s", "hand img/s", "finetune img/s", "ratio", "target",
            "val acc hand", "val acc finetune", "peak RSS MB hand / finetune", "model-only s (train / fwd img/s)",
            "finetune / ceiling"]
    lines += [f"{m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), native bf16: {m['bf16_native']}, "
             f"torch {m['torch']}, torchvision {m['torchvision']}, {m['date']}; data: {info['data']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in info["rows"]:
        h, f = r["hand"], r["finetune"]
        target = "-" if r["target"] is None else (f">= {r['target']:g}x " + ("met" if r["met"] else "**MISSED**"))
        lines.append("| " + " | ".join([
            f"{r['scenario']}: {r['what']}", f"{h['wall_s']:.1f}", f"{f['wall_s']:.1f}",
            f"{h['images'] / h['wall_s']:.1f}", f"{f['images'] / f['wall_s']:.1f}", f"{r['ratio']:.2f}x", target,
            f"{100 * h['val_acc']:.1f}%", f"{100 * f['val_acc']:.1f}%",
            f"{h['peak_rss_mb']:.0f} / {f['peak_rss_mb']:.0f}", *_ceiling_cells(r.get("ceiling"))]) + " |")
    if info["rows"]:
        picked = info["rows"][0]["finetune"].get("picked")
        lines.append("")
        lines.append(f"finetune picked: {picked}")
    for p in info.get("precision", []):
        lines.append(f"precision, recipe {p['recipe']}: val acc fp32 {100 * p['fp32']['val_acc']:.1f}% "
                     f"({p['fp32']['wall_s']:.1f} s), bf16 {100 * p['bf16']['val_acc']:.1f}% "
                     f"({p['bf16']['wall_s']:.1f} s): {p['diff_points']:.1f} points apart")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
