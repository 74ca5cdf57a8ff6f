"""The peer for `finetune auto`: fastai's ``vision_learner(...).fine_tune()`` on the same timm backbone, the same local
ImageNet weights and the same data (train / val / test folders from benchmarks/auto_data.py), fastai's defaults
otherwise; reports val and TEST accuracy of the final model, wall time and epochs.

Install fastai beside (not into) the project's venv; torch, torchvision, timm, numpy, pillow, matplotlib, PyYAML and
requests come from the venv and are never reinstalled:

    PY=/work/main/.venv/bin/python
    $PY -m pip install --target /tmp/fastai-lib --no-deps fastai==2.8.12 fastcore fasttransform "fastprogress<1.1" \\
        fastdownload "plum-dispatch<2.10" beartype cloudpickle pandas pytz scipy scikit-learn joblib threadpoolctl \\
        narwhals

(`fastprogress` 1.1 imports `fasthtml` (python-fasthtml, a web framework with many deps): 1.0.x does the same job in
a console. `spacy` is only needed by fastai.text. scikit-learn 1.9 needs `narwhals`.) Then:

    $PY benchmarks/auto_data.py                                  # /tmp/auto-data/{flowers12,caltech101-small}
    PYTHONPATH=/tmp/fastai-lib $PY benchmarks/fastai_peer.py --data /tmp/auto-data/flowers12 \\
        --model tf_efficientnet_lite0 --epochs 1
    PYTHONPATH=/tmp/fastai-lib $PY benchmarks/fastai_peer.py --data /tmp/auto-data/flowers12 \\
        --model tf_efficientnet_lite0 --wall-seconds 600 --json /tmp/fastai-lite0-600.json

What runs (fastai 2.8's own code path, nothing re-implemented):

- data: ``ImageDataLoaders.from_folder(ROOT, train='train', valid='val', item_tfms=Resize(SIZE),
  batch_tfms=aug_transforms(), bs=64)`` (the fine_tune recipe of fastai's docs and course; SIZE = the timm model's
  pretrained input size: 224 for Lite0, 240 for Lite1);
- model: ``vision_learner(dls, 'tf_efficientnet_lite0', metrics=accuracy, pretrained=True,
  pretrained_cfg_overlay=dict(file=WEIGHTS))``: fastai's timm path (``create_timm_model`` → ``timm.create_model(...,
  pretrained=True, num_classes=0)``, ``TimmBody``, fastai's head, the timm config's mean/std ``Normalize``,
  ``learn.freeze()``), with timm reading the ImageNet weights from the local safetensors file instead of the hub
  (``pretrained_cfg_overlay`` is passed through ``vision_learner``'s ``**kwargs``). The script then checks that every
  body tensor equals the file's, so a silently skipped load cannot pass. (``pretrained=False`` plus a manual load
  would skip fastai's freeze and Normalize, i.e. not be fastai's default.)
- training: ``learn.fine_tune(N)`` (base_lr 2e-3, freeze_epochs 1, lr_mult 100, one-cycle, Adam, fastai's wd).
  With ``--wall-seconds S`` the two halves of fine_tune are run as fine_tune itself runs them (freeze +
  ``fit_one_cycle(1, slice(base_lr), pct_start=0.99)``, then unfreeze + ``fit_one_cycle(N, slice(base_lr/2/100,
  base_lr/2), pct_start=0.3, div=5)``), and N is chosen between them: the largest N with
  elapsed + N * (estimated unfrozen epoch) <= S. The unfrozen epoch is estimated from the frozen one, for free:
  its train time + its backward time (summed per batch by a callback) + its validation time. fastai's freeze keeps
  BatchNorm trainable (train_bn=True), so the frozen backward already runs through the whole body for the input
  gradients; unfreezing adds the convolutions' weight gradients, which cost about as much again (flowers12, Lite0,
  2 loaded cores: frozen epoch 229 s train, unfrozen 400 s). N = 0 when the frozen epoch alone uses S. The JSON
  keeps the estimate beside the measured epochs. (Timing real steps instead cost 255 s of a 600 s budget at bs 64,
  and 74 s with 8 images that timed unfrozen no slower than frozen: useless on this box.)
- selection: none. The final model (after the last epoch) is evaluated once on val and once on test: argmax of
  ``learn.get_preds`` (eval mode, valid transforms: Resize's centre crop, no augmentation).

Timing: ``wall_s`` runs from building the DataLoaders to the end of training (the budget applies to it; imports and
the final val/test evaluation are outside), ``fit_s`` is the training alone. The machine's load average is recorded
(``os.getloadavg``) at the start and the end: on a shared 2-core box the seconds are noisy.

Measured (flowers12 copy: 540 train / 180 val / 240 test; Lite0, 224 px, bs 64; CPU, 2 cores at load average 4-9;
fastai 2.8.12, timm 1.0.31, torch 2.14.1):

| run | epochs (frozen+N) | val acc % | test acc % | wall s |
|---|---|---|---|---|
| --epochs 1 | 1+1 | 91.11 ± 4.2 | 92.50 ± 3.4 | 693 |
| --wall-seconds 600 | 1+0 (frozen 292 s, unfrozen est. 402 s) | 82.22 ± 5.6 | 80.00 ± 5.0 | 292 |
| --wall-seconds 600 --channels-last | 1+1 (est. 289 s, took 269 s) | 91.11 ± 4.2 | 92.50 ± 3.4 | 476 |

fastai's default NCHW memory format is what makes 600 s too short on this CPU: channels_last (finetune's default
for conv nets) cut the frozen epoch from 292 s to 206 s and validation from 38 s to 13 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from real import SHARED  # noqa: F401 - puts the checkout on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from a local file; never wait on an unreachable hub

from finetune.training.stats import wilson  # noqa: E402 - torch-free


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/tmp/auto-data/flowers12", help="ROOT with train/, val/, test/ (auto_data.py)")
    ap.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name (fastai's string arch)")
    ap.add_argument("--weights", default=None,
                    help="safetensors of the timm model (default: SHARED/weights/<model>.safetensors)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--epochs", type=int, help="fine_tune(N): N unfrozen epochs after the frozen one")
    g.add_argument("--wall-seconds", type=float, help="pick the largest N whose estimated wall time fits")
    ap.add_argument("--freeze-epochs", type=int, default=1, help="fine_tune's freeze_epochs (default 1)")
    ap.add_argument("--base-lr", type=float, default=2e-3, help="fine_tune's base_lr (default 2e-3)")
    ap.add_argument("--bs", type=int, default=64, help="batch size (fastai's default 64)")
    ap.add_argument("--size", type=int, default=None, help="Resize size (default: the timm model's input size)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: fastai's, = CPU count)")
    ap.add_argument("--channels-last", action="store_true",
                    help="not fastai's default: the model in channels_last memory format (what finetune does for "
                         "conv nets; much faster for depthwise convs on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result as JSON to this file")
    return ap.parse_args(argv)


def _check_weights(body_model, weights: Path) -> int:
    """Every tensor of the timm body must equal the file's (the classifier is not in a num_classes=0 model)."""
    import torch
    from safetensors.torch import load_file

    ref = load_file(str(weights))
    own = body_model.state_dict()
    missing = [k for k in ref if not k.startswith("classifier.") and k not in own]
    differ = [k for k in own if k in ref and not torch.equal(own[k].cpu(), ref[k])]
    unknown = [k for k in own if k not in ref]
    if missing or differ or unknown:
        raise SystemExit(f"Error: the body does not hold {weights}: {len(missing)} missing, {len(differ)} differ, "
                         f"{len(unknown)} not in the file (e.g. {(missing + differ + unknown)[:3]})")
    return len(own)


def run(args) -> dict:
    t_import = time.perf_counter()
    import fastai
    import fastcore
    import timm
    import torch
    import torchvision
    from fastai.callback.core import Callback
    from fastai.vision.all import (ImageDataLoaders, Resize, accuracy, aug_transforms, get_image_files, set_seed,
                                   vision_learner)

    import_s = time.perf_counter() - t_import
    data = Path(args.data)
    for split in ("train", "val", "test"):
        if not (data / split).is_dir():
            raise SystemExit(f"Error: {data} has no {split}/ folder; make the benchmark copy with auto_data.py")
    weights = Path(args.weights) if args.weights else SHARED / "weights" / f"{args.model}.safetensors"
    if not weights.is_file():
        raise SystemExit(f"Error: no weights file {weights}; pass --weights")
    size = args.size or timm.get_pretrained_cfg(args.model).input_size[-1]
    load_start = _load()
    set_seed(args.seed)

    class Timer(Callback):
        "Per-epoch train/valid seconds, forward/backward seconds summed over the training batches, and the row."
        order = 100  # after Recorder (50): its log for the epoch is complete in after_epoch

        def __init__(self):
            self.rows = []

        def before_train(self):
            self.t_train, self.fwd_s, self.bwd_s = time.perf_counter(), 0.0, 0.0

        def before_batch(self):
            self.t_batch = time.perf_counter()

        def after_loss(self):
            if self.training:
                self.t_loss = time.perf_counter()
                self.fwd_s += self.t_loss - self.t_batch

        def after_backward(self):
            self.bwd_s += time.perf_counter() - self.t_loss

        def after_train(self):
            self.train_s = time.perf_counter() - self.t_train

        def before_validate(self):
            self.t_valid = time.perf_counter()

        def after_validate(self):
            self.valid_s = time.perf_counter() - self.t_valid

        def after_epoch(self):  # get_preds also calls it (before_fit too): removed before the evaluation
            log = self.learn.recorder.log  # [epoch, train_loss, valid_loss, accuracy, time]
            row = dict(phase=self.phase, epoch=len(self.rows) + 1, train_loss=float(log[1]),
                       valid_loss=float(log[2]), val_acc=float(log[3]), train_s=round(self.train_s, 2),
                       fwd_s=round(self.fwd_s, 2), bwd_s=round(self.bwd_s, 2), valid_s=round(self.valid_s, 2),
                       load=_load())
            self.rows.append(row)
            print(f"  epoch {row['epoch']:>3} ({row['phase']}): train_loss {row['train_loss']:.4f} valid_loss "
                  f"{row['valid_loss']:.4f} val_acc {100 * row['val_acc']:.2f}% train {row['train_s']:.1f}s "
                  f"valid {row['valid_s']:.1f}s load {row['load']}", flush=True)

    t0 = time.perf_counter()
    kw = {} if args.workers is None else {"num_workers": args.workers}
    dls = ImageDataLoaders.from_folder(data, train="train", valid="val", item_tfms=Resize(size),
                                       batch_tfms=aug_transforms(), bs=args.bs, seed=args.seed, **kw)
    learn = vision_learner(dls, args.model, metrics=accuracy, pretrained=True,
                           pretrained_cfg_overlay=dict(file=str(weights)))
    n_tensors = _check_weights(learn.model[0].model, weights)
    if args.channels_last:
        learn.model.to(memory_format=torch.channels_last)
    timer = Timer()
    learn.add_cb(timer)
    learn.logger = lambda *a, **k: None  # the recorder's raw list per epoch: Timer prints a labelled line instead
    setup_s = time.perf_counter() - t0
    print(f"fastai {fastai.__version__}, fastcore {fastcore.__version__}, timm {timm.__version__}, torch "
          f"{torch.__version__}, torchvision {torchvision.__version__}; device {dls.device}, torch threads "
          f"{torch.get_num_threads()}, workers {dls.train.fake_l.num_workers}", flush=True)
    print(f"{args.model} ({n_tensors} body tensors = {weights.name}), size {size}, bs {args.bs}; data {data}: "
          f"{len(dls.train_ds)} train / {len(dls.valid_ds)} val, {dls.c} classes; setup {setup_s:.1f}s; "
          f"load {load_start}", flush=True)

    estimate = None
    t_fit = time.perf_counter()
    with learn.no_bar():
        if args.epochs is not None:
            timer.phase = "fine_tune"
            learn.fine_tune(args.epochs, base_lr=args.base_lr, freeze_epochs=args.freeze_epochs)
            n_unfrozen = args.epochs
            for r in timer.rows:
                r["phase"] = "frozen" if r["epoch"] <= args.freeze_epochs else "unfrozen"
        else:
            # fine_tune's body (fastai/callback/schedule.py), split so that N is chosen after the frozen epochs
            base_lr = args.base_lr
            timer.phase = "frozen"
            learn.freeze()
            learn.fit_one_cycle(args.freeze_epochs, slice(base_lr), pct_start=0.99)
            last = timer.rows[-1]
            epoch_s = last["train_s"] + last["bwd_s"] + last["valid_s"]
            elapsed = time.perf_counter() - t0
            n_unfrozen = max(0, int((args.wall_seconds - elapsed) // epoch_s))
            estimate = dict(unfrozen_epoch_s=round(epoch_s, 1), elapsed_before_unfrozen_s=round(elapsed, 1),
                            estimated_wall_s=round(elapsed + n_unfrozen * epoch_s, 1))
            print(f"  budget {args.wall_seconds:.0f}s: {elapsed:.1f}s used, one unfrozen epoch ~{epoch_s:.1f}s "
                  f"(frozen: train {last['train_s']:.0f}s of which backward {last['bwd_s']:.0f}s, valid "
                  f"{last['valid_s']:.0f}s) -> fine_tune({n_unfrozen})", flush=True)
            if n_unfrozen > 0:
                base_lr /= 2
                timer.phase = "unfrozen"
                learn.unfreeze()
                learn.fit_one_cycle(n_unfrozen, slice(base_lr / 100, base_lr), pct_start=0.3, div=5.0)
    t_end = time.perf_counter()
    learn.remove_cb(timer)
    fit_s, wall_s = t_end - t_fit, t_end - t0

    def _acc(dl):
        preds, targs = learn.get_preds(dl=dl)
        return float((preds.argmax(dim=1) == targs).float().mean()), len(targs)

    with learn.no_bar():
        val_acc, n_val = _acc(dls.valid)
        test_acc, n_test = _acc(dls.test_dl(get_image_files(data / "test"), with_labels=True))
    eval_s = time.perf_counter() - t_end
    res = dict(
        peer="fastai vision_learner.fine_tune", data=str(data), set=data.name, model=args.model,
        weights=str(weights), size=size, bs=args.bs, base_lr=args.base_lr, freeze_epochs=args.freeze_epochs,
        epochs=n_unfrozen, channels_last=args.channels_last, wall_seconds_budget=args.wall_seconds, seed=args.seed,
        val_acc=val_acc, n_val=n_val, val_ci95=wilson(val_acc, n_val),
        test_acc=test_acc, n_test=n_test, test_ci95=wilson(test_acc, n_test),
        wall_s=round(wall_s, 1), fit_s=round(fit_s, 1), setup_s=round(setup_s, 1), eval_s=round(eval_s, 1),
        import_s=round(import_s, 1), estimate=estimate, epochs_log=timer.rows,
        load_start=load_start, load_end=_load(), device=str(dls.device), torch_threads=torch.get_num_threads(),
        workers=dls.train.fake_l.num_workers, host=platform.node(), cpus=os.cpu_count(),
        versions=dict(fastai=fastai.__version__, fastcore=fastcore.__version__, timm=timm.__version__,
                      torch=torch.__version__, torchvision=torchvision.__version__),
    )
    return res


def _pm(acc, ci):
    return f"{100 * acc:.2f}" + ("" if ci is None else f" ± {100 * (ci[1] - ci[0]) / 2:.1f}")


HEADER = ("| set | model | budget s | epochs (frozen+N) | val acc % | test acc % (95% CI) | wall s | fit s | "
          "load start→end |\n|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    budget = "-" if r["wall_seconds_budget"] is None else f"{r['wall_seconds_budget']:.0f}"
    return (f"| {r['set']} | {r['model']} | {budget} | {r['freeze_epochs']}+{r['epochs']} | "
            f"{_pm(r['val_acc'], r['val_ci95'])} | {_pm(r['test_acc'], r['test_ci95'])} | {r['wall_s']:.0f} | "
            f"{r['fit_s']:.0f} | {r['load_start']} → {r['load_end']} |")


def main(argv=None) -> int:
    args = _parse(argv)
    res = run(args)
    print(HEADER)
    print(row(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
