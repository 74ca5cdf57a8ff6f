"""The catalogue of bad inputs: each user mistake or failure, through the CLI, costs one clear line and nothing else.

Every row asserts: exit code != 0; stderr is exactly one line, starting ``Error: `` and containing the fragment
that names the problem (file, key, layer or value); no traceback (in-process: no exception escaped the CLI but
``SystemExit``); and, for rows that point at an existing run directory, no file in it changed (bytes and mtime).

Rows run in-process with typer's CliRunner (fast, and monkeypatching works: offline downloads, a failing disk).
``test_real_process_errors_have_no_traceback`` runs a few rows as real subprocesses as well.

"Out dir not writable": the tests run as root, so a chmod'ed folder would still be writable; the row uses a path
under a regular *file* (``--out afile/run``), which no user can create, and fails the same way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import run_cli, tiny_tree

SAMPLE = "data/sample"
FAST = ("--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--no-tensorboard", "--quiet")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Shared material: a tiny image tree, a finished 1-epoch run, odd files."""
    from finetune.cli.app import app
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("bad")
    data = tiny_tree(root / "data", per_class=8)
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(root / "run"), "--model", "smallcnn",
                                 "--weights", "none", *FAST])
    assert r.exit_code == 0, r.stderr
    (root / "empty").mkdir()
    tiny_tree(root / "one", classes=("only",), per_class=4)
    for c in ("x", "y"):
        (root / "corrupt" / c).mkdir(parents=True)
        for i in range(3):
            (root / "corrupt" / c / f"{c}{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.txt").write_text("not an image\n")
    (root / "cw.json").write_text('{"a": 1, "zebra": 2}')
    (root / "notes.html").write_text("<p>my notes</p>\n")
    (root / "afile").write_text("a regular file\n")
    (root / "fake.tar").write_text("not a tar file\n")
    torch.save(_other_arch_state_dict(), root / "resnet.pth")
    torch.save(_whole_smallcnn(), root / "whole.pth")
    (root / "bad.yaml").write_text("train:\n  epochs: [1, 2\n")
    # "billion laughs": 9 levels of 10 aliases = 10^9 values from ~450 bytes (23 GB when something expands it)
    lol = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (root / "bomb.yaml").write_text("\n".join(lol) + "\n")
    (root / "selfref.yaml").write_text("model: &m\n  name: smallcnn\n  weights: [*m]\n")
    (root / "deep.yaml").write_text("description: " + "[" * 3000 + "]" * 3000 + "\n")
    (root / "huge.yaml").write_text("train:\n  epochs: 0\n" + "# padding\n" * 30000)
    (root / "decay_neg.yaml").write_text("optimizer:\n  layer_decay: -0.5\n")
    (root / "decay_zero.yaml").write_text("optimizer:\n  layer_decay: 0\n")
    (root / "decay_big.yaml").write_text("optimizer:\n  layer_decay: 1.5\n")
    csvdata = tiny_tree(root / "csvdata", per_class=4)
    tiny_tree(root / "outside", classes=("a",), per_class=1)
    rows = [f"{c}/{c}_{i:03d}.png,{c}" for c in ("a", "b", "c") for i in range(4)]
    (csvdata / "labels.csv").write_text("path,label\n" + "\n".join(rows[:5] + ["../outside/a/a_000.png,a"]
                                                                            + rows[5:] + ["/etc/passwd.png,b"]) + "\n")
    (root / "minlr.yaml").write_text("optimizer:\n  lr: 0.01\nscheduler:\n  name: cosine\n  min_lr: 0.1\n")
    good = torch.load(root / "run" / "best.pt", weights_only=True)
    tf = good["transform"]
    for name, change in {"classes_huge": {"num_classes": 10**12}, "classes_str": {"num_classes": "3"},
                         "no_transform": {"transform": None},
                         "bad_interp": {"transform": {**tf, "interpolation": "sinc"}},
                         "huge_transform": {"transform": {**tf, "input_size": [3, 6000, 6000], "size": 6000,
                                                          "resize": 6000}}}.items():
        torch.save({**good, **change}, root / f"crafted_{name}.pt")
    (root / "shadow").write_text("root:$6$secrethash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")  # no CSV
    (root / "dup.yaml").write_text("train:\n  epochs: 0\n  batch_size: 8\n  epochs: 1\n")
    (root / "unknown_key.yaml").write_text("train:\n  epochs: 1\n  epocs: 2\n")
    (root / "wrong_type.yaml").write_text("optimizer:\n  lr: fast\n")
    blob = (root / "run" / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(blob[: len(blob) // 3])
    (root / "trunc_run").mkdir()
    (root / "trunc_run" / "last.pt").write_bytes(blob[: len(blob) // 3])
    return root


def _other_arch_state_dict() -> dict:
    from finetune.models import build_model

    return build_model("timm:test_resnet", num_classes=3).model.state_dict()


def _whole_smallcnn():
    from finetune.models import build_model

    return build_model("smallcnn", num_classes=3).model


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# (id, args with {B} = the shared folder and {R} = a copy of the finished run, expected fragment, run dir to check)
CASES: list[tuple[str, list[str], str, bool]] = []


def case(id_: str, args: str, fragment: str, run_dir: bool = False) -> None:
    CASES.append((id_, args.split(), fragment, run_dir))


case("missing-data", "train --data {B}/nope --out {B}/o1", "data path '{B}/nope' does not exist")
case("empty-data-dir", "train --data {B}/empty --out {B}/o2", "no images found in '{B}/empty'")
case("one-class", "train --data {B}/one --out {B}/o3", "found 1 class in '{B}/one' ('only'); a classifier needs")
case("only-corrupt-images", "train --data {B}/corrupt --out {B}/o4", "no readable images in '{B}/corrupt': all 6 "
     "image files failed to load (e.g. '{B}/corrupt/x/x0.png': not an image (unknown format))")
case("unknown-model", "train --model resnet1800 --out {B}/o5", "unknown model 'resnet1800' (did you mean 'resnet18'")
case("unknown-weights-name", "train --model resnet18 --weights IMAGENET1K_V9 --out {B}/o6",
     "unknown weights 'IMAGENET1K_V9' for resnet18; valid: DEFAULT, IMAGENET1K_V1")
case("weights-other-arch", "train --model smallcnn --weights {B}/resnet.pth --data {B}/data --out {B}/o7",
     "weights file '{B}/resnet.pth' does not fit smallcnn: seq.0.weight: missing from file")
case("typo-freeze-layer", "train --freeze-layers seq.0,sq.2 --data {B}/data --out {B}/o8",
     "freeze layer 'sq.2' matches no module of smallcnn")
case("freeze-first-out-of-range", "train --freeze-first 99 --data {B}/data --out {B}/o9",
     "freeze first N must be between 0 and 10 (the number of parameter tensors in smallcnn), got 99")
case("freeze-everything", "train --freeze-names seq --data {B}/data --out {B}/o10",
     "the freeze plan leaves nothing to train: all 10 parameter tensors of smallcnn are frozen")
case("unknown-optimizer", "train --optimizer adamx --out {B}/o11",
     "optimizer.name must be one of sgd, adam, adamw, rmsprop, got 'adamx'")
case("negative-lr", "train --lr -0.1 --out {B}/o12", "optimizer.lr must be greater than 0, got -0.1")
case("zero-lr", "train --lr 0 --out {B}/o13", "optimizer.lr must be greater than 0, got 0.0")
case("batch-size-0", "train --batch-size 0 --out {B}/o14", "train.batch_size must be greater than 0, got 0")
case("bad-yaml", "train --recipe {B}/bad.yaml --out {B}/o15", "recipe '{B}/bad.yaml', line 3: invalid YAML")
case("unknown-recipe-key", "train --recipe {B}/unknown_key.yaml --out {B}/o16",
     "recipe '{B}/unknown_key.yaml', line 3: unknown key 'train.epocs' (did you mean 'epochs'?)")
case("wrong-type-in-recipe", "train --recipe {B}/wrong_type.yaml --out {B}/o17",
     "recipe '{B}/wrong_type.yaml', line 2: optimizer.lr must be a number or 'auto', got 'fast'")
case("unknown-recipe-name", "train --recipe linear-prob --out {B}/o18", "unknown recipe 'linear-prob' (did you mean")
case("out-dir-exists", "train --data {B}/data --out {R}", "output directory '{R}' already exists", True)
case("resume-without-checkpoint", "train --resume {B}/empty", "cannot resume: '{B}/empty/last.pt' not found")
case("resume-with-other-flags", "train --resume {R} --lr 0.5", "drop --lr (only --epochs may change)", True)
case("resume-zero-epochs", "train --resume {R} --epochs 0", "train.epochs must be greater than 0, got 0", True)
case("resume-finished-run", "train --resume {R}", "nothing to resume: '{R}' already finished 1 of 1 epochs; pass "
     "--epochs N with N > 1", True)
case("resume-truncated-last", "train --resume {B}/trunc_run", "cannot read checkpoint '{B}/trunc_run/last.pt': not "
     "a PyTorch file or truncated")
case("truncated-checkpoint", "eval {B}/truncated.pt", "cannot read checkpoint '{B}/truncated.pt': not a PyTorch "
     "file or truncated")
case("checkpoint-not-found", "eval {R}/nope.pt", "checkpoint '{R}/nope.pt' not found", True)
case("predict-non-image", "predict {R}/last.pt {B}/notes.txt", "cannot read image '{B}/notes.txt': not an image",
     True)
case("cuda-without-cuda", "train --device cuda --out {B}/o19", "--device cuda was requested but CUDA is not available")
case("out-dir-under-a-file", "train --data {B}/data --out {B}/afile/run", "cannot write to output directory "
     "'{B}/afile/run': Not a directory; choose another --out")
case("whole-pickled-model", "train --model smallcnn --weights {B}/whole.pth --data {B}/data --out {B}/o20",
     "'{B}/whole.pth' holds pickled Python objects")
case("save-every-steps-0", "train --save-every-steps 0 --out {B}/o21",
     "train.save_every_steps must be greater than 0, got 0")
case("export-over-existing", "export {R}/last.pt --out {R}/best.pt --format state-dict",
     "refusing to write the export to '{R}/best.pt': 'best.pt' is a file of the run directory '{R}'", True)
case("lr-not-a-number", "train --lr fast --out {B}/o40", "--lr: optimizer.lr must be a number or 'auto', got 'fast'")
case("lr-find-resume", "lr-find --resume {R}", "lr-find takes the flags of a new run; drop --resume and --nproc")
case("class-weights-no-file", "train --data {B}/data --class-weights {B}/nope.json --out {B}/o41",
     "--class-weights: '{B}/nope.json' is neither auto, none nor a file")
case("class-weights-unknown-class", "train --data {B}/data --class-weights {B}/cw.json --out {B}/o42",
     "--class-weights: '{B}/cw.json' has unknown class 'zebra'; classes: a, b, c")
case("sampler-unknown", "train --sampler uniform --out {B}/o43",
     "--sampler: data.sampler must be one of random, balanced, got 'uniform'")
case("export-bad-format", "export {R}/last.pt --format tflite",
     "--format must be one of safetensors, state-dict, onnx, torchscript, got 'tflite'", True)
case("export-opset-not-onnx", "export {R}/last.pt --format torchscript --opset 17",
     "--opset applies to --format onnx only, not torchscript", True)
case("export-opset-too-low", "export {R}/last.pt --format onnx --opset 11 --out {B}/x.onnx",
     "--opset must be >= 18", True)
case("eval-plain-state-dict", "eval {B}/resnet.pth", "'{B}/resnet.pth' is not a finetune checkpoint")
case("eval-report-not-html", "eval {R}/best.pt --report {R}/last.pt", "report file '{R}/last.pt' must end in .html",
     True)
case("eval-report-over-a-file", "eval {R}/best.pt --report {B}/notes.html", "'{B}/notes.html' exists and is not a "
     "finetune report")
case("report-not-a-run", "report {B}", "'{B}' has no best.pt; finetune report takes a run directory")
case("compare-one-run", "compare {R}", "finetune compare takes at least two run directories")
case("runs-folder-missing", "runs {B}/nope", "folder '{B}/nope' not found")
case("unfreeze-bad-syntax", "train --unfreeze seq.8@soon --out {B}/o22", "--unfreeze 'seq.8@soon' must be LAYERS")
case("strategy-unknown", "train --strategy zero3 --out {B}/o44",
     "--strategy: train.strategy must be one of ddp, fsdp, got 'zero3'")
case("nnodes-without-master", "train --nnodes 2 --node-rank 1 --out {B}/o45",
     "--nnodes 2 needs --master-addr HOST[:PORT], node 0's address (the same on every node)")
case("node-rank-out-of-range", "train --nnodes 2 --node-rank 2 --master-addr localhost --out {B}/o46",
     "--nnodes must be at least 1 and --node-rank in 0..nnodes-1, got --nnodes 2 --node-rank 2")
case("fast-inference-typo", "train --fast-inference fast --out {B}/o37",
     "train.fast_inference must be one of auto, off, got 'fast'")
case("eval-fast-inference-typo", "eval {R}/best.pt --fast-inference yes", "--fast-inference must be auto or off, "
     "got 'yes'", True)
case("predict-fast-inference-typo", "predict {R}/best.pt {B}/data --fast-inference on",
     "--fast-inference must be auto or off, got 'on'", True)
case("fp16-on-cpu", "train --precision fp16 --device cpu --out {B}/o23", "--precision fp16 needs a GPU")
case("val-split-out-of-range", "train --val-split 1.5 --out {B}/o24", "data.val_split must be in [0, 1), got 1.5")
case("image-size-0", "train --image-size 0 --out {B}/o25",
     "--image-size: data.image_size must be between 8 and 2048 pixels, got 0; omit it to use the backbone's own")
case("image-size-huge", "train --image-size 100000 --out {B}/o26",
     "data.image_size must be between 8 and 2048 pixels, got 100000")
case("top-k-0", "predict {R}/last.pt {B}/data/a --top-k 0", "--top-k must be at least 1, got 0", True)
case("probe-bad-lrs", "probe --model smallcnn --weights none --data {B}/data --lrs 1e-3,fast",
     "--lrs '1e-3,fast' is not a comma-separated list of numbers (e.g. 1e-3,3e-3)")
case("probe-zero-lr", "probe --model smallcnn --weights none --data {B}/data --lrs 0",
     "--lrs '0': give positive numbers, e.g. 1e-3,3e-3")
case("probe-negative-knn", "probe --model smallcnn --weights none --data {B}/data --knn 10,-5",
     "--knn '10,-5': k must be positive (0 turns k-NN off)")
case("probe-model-twice", "probe --model smallcnn,smallcnn --weights none --data {B}/data",
     "--model names a backbone twice: smallcnn,smallcnn")
case("probe-out-dir-exists", "probe --model smallcnn --weights none --data {B}/data --out {R}",
     "output directory '{R}' already exists and is not empty; pass --overwrite", True)
case("probe-head-not-linear", "probe --model squeezenet1_0 --weights none --data {B}/data --image-size 32 --quiet "
     "--out {B}/o25", "probe needs a model whose classifier is one Linear layer on the backbone's features; "
     "squeezenet1_0's head is classifier.1 (Conv2d)")
case("probe-no-val", "probe --model smallcnn --weights none --data {B}/data --val-split 0 --quiet",
     "probe needs validation images to compare heads, but '{B}/data' has none; add a val folder or pass --val-split")
case("cache-clear-bad-age", "cache clear --older-than soon", "--older-than 'soon' is not an age; use e.g. 30m, 12h, "
     "7d or 2w")
case("yaml-alias-bomb", "train --recipe {B}/bomb.yaml --out {B}/o27", "recipe '{B}/bomb.yaml': its YAML aliases "
     "expand to more than 10,000 values; a recipe may use anchors and aliases only for a few repeated values")
case("yaml-self-reference", "train --recipe {B}/selfref.yaml --out {B}/o28", "recipe '{B}/selfref.yaml', line 3: a "
     "YAML alias refers to the node that contains it (a recursive structure); write the values out")
case("yaml-too-deep", "train --recipe {B}/deep.yaml --out {B}/o29", "recipe '{B}/deep.yaml'")
case("recipe-too-large", "train --recipe {B}/huge.yaml --out {B}/o30", "recipe '{B}/huge.yaml' is 300,019 bytes; a "
     "recipe is at most 256 KiB (is this the right file?)")
case("yaml-duplicate-key", "train --recipe {B}/dup.yaml --out {B}/o31", "recipe '{B}/dup.yaml', line 4: duplicate "
     "key 'train.epochs' (first on line 2); keep one")

for _name, _v in (("neg", "-0.5"), ("zero", "0.0"), ("big", "1.5")):
    case(f"layer-decay-{_name}", f"train --recipe {{B}}/decay_{_name}.yaml --out {{B}}/o32",
         f"recipe '{{B}}/decay_{_name}.yaml', line 2: optimizer.layer_decay must be in (0, 1] (each layer's LR is "
         f"lr x decay^distance from the head), got {_v}")

case("csv-path-outside-data", "train --data {B}/csvdata --labels csv:labels.csv --out {B}/o33",
     "label file '{B}/csvdata/labels.csv': 2 rows point outside the data folder '{B}/csvdata' (row 6: "
     "'../outside/a/a_000.png'); paths are relative to it; pass --allow-outside (data.allow_outside: true) if that "
     "is intended")
case("lr-overflows-float32", "train --lr 1e39 --out {B}/o35", "--lr: optimizer.lr must be at most 3.4e+38 (it is "
     "applied to float32 weights), got 1e+39")
for _name, _what in (("classes_huge", "num_classes must be an integer from 1 to 100000 equal to the number of "
                                   "class_names (3), got 1000000000000"),
                     ("classes_str", "num_classes must be an integer from 1 to 100000 equal to the number of "
                                     "class_names (3), got '3'"),
                     ("no_transform", "transform must be a mapping, got None"),
                     ("bad_interp", "transform.interpolation must be one of bicubic, bilinear, nearest, "
                                    "nearest-exact, got 'sinc'"),
                     ("huge_transform", "transform.input_size must be [3, H, W] with H and W from 8 to 2048 "
                                        "(resize up to 4096), got [3, 6000, 6000]")):
    case(f"crafted-checkpoint-{_name}", f"eval {{B}}/crafted_{_name}.pt",
         f"'{{B}}/crafted_{_name}.pt' is not a valid finetune checkpoint: {_what}")
case("csv-labels-not-a-csv", "train --data {B}/data --labels csv:{B}/shadow --out {B}/o36",
     "label file '{B}/shadow': row 1 has 1 column; each row needs 'path,label' (its content is not shown)")
case("missing-shard", "train --data {B}/sh-{000..001}.tar --out {B}/o40", "shard '{B}/sh-000.tar' does not exist "
     "(2 of the 2 shards of '{B}/sh-{000..001}.tar' are missing); check the pattern")
case("not-a-tar-shard", "train --data {B}/fake.tar --out {B}/o41", "cannot read shard '{B}/fake.tar': ")
case("min-lr-above-lr", "train --recipe {B}/minlr.yaml --out {B}/o34", "recipe '{B}/minlr.yaml', line 5: "
     "scheduler.min_lr (0.1) must not be above optimizer.lr (0.01): the schedule would raise the LR")

case("seed-overflow", "train --seed 9300000000000 --data {B}/data --epochs 1 --out {B}/o44",
     "--seed: train.seed must be an integer from 0 to 4294967295 (2**32 - 1: NumPy's seed range, as in Lightning's "
     "seed_everything), got 9300000000000")  # was an OverflowError traceback from the sampler's generator
case("warmup-longer-than-run", "train --warmup-epochs 1e308 --epochs 2 --data {B}/data --out {B}/o45",
     "--warmup-epochs: scheduler.warmup_epochs (1e+308) must not be more than train.epochs (2): the LR would never "
     "reach optimizer.lr")


def _fill(s: str, b: Path, r: Path) -> str:
    return s.replace("{B}", str(b)).replace("{R}", str(r))


def check_one_error(result, fragment: str) -> None:
    """The catalogue's contract for one CliRunner result."""
    assert result.exit_code != 0, result.stdout
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("args,fragment,uses_run", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(base, tmp_path, cli, args, fragment, uses_run):
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    before = _snapshot(run)
    r = cli(*[_fill(a, base, run) for a in args])
    check_one_error(r, _fill(fragment, base, run))
    assert _snapshot(run) == before  # nothing in an existing run dir written or overwritten
    if "--out" in args and not uses_run:  # a failed start leaves no half-made run dir behind
        assert not Path(_fill(args[args.index("--out") + 1], base, run)).exists()


def test_catalogue_is_big_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_download_needed_offline(base, tmp_path, cli, monkeypatch):
    """Pretrained weights that are not cached, with the network down: fail at once, saying where the file goes."""
    import finetune.models.weights as W

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(W, "_reachable", lambda host, timeout=3.0: False)
    r = cli("train", "--model", "resnet18", "--weights", "DEFAULT", "--data", base / "data", "--out", tmp_path / "o",
            *FAST)
    check_one_error(r, f"cannot download ResNet18_Weights.IMAGENET1K_V1 (https://download.pytorch.org/models/"
                       f"resnet18-f37072fd.pth): offline or unreachable; place resnet18-f37072fd.pth in "
                       f"{tmp_path / 'torch_home' / 'hub' / 'checkpoints'}")


@pytest.mark.slow
def test_write_error_while_saving_keeps_previous_checkpoint(base, tmp_path, cli, monkeypatch):
    """The disk fills up while epoch 2's checkpoint is written: one error line, and epoch 1's last.pt intact."""
    import finetune.run.checkpoint as C

    real_replace = os.replace
    seen: dict[str, object] = {}

    def replace(src, dst, *a, **k):
        if Path(dst).name == "last.pt" and Path(dst).is_file():  # the second save of last.pt
            seen["bytes"] = Path(dst).read_bytes()
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(C.os, "replace", replace)
    out = tmp_path / "o"
    r = cli("train", "--data", base / "data", "--out", out, "--model", "smallcnn", "--weights", "none",
            *FAST[:1], "2", *FAST[2:])
    check_one_error(r, f"cannot write checkpoint '{out / 'last.pt'}': No space left on device; the previous "
                       "checkpoint is unchanged")
    assert (out / "last.pt").read_bytes() == seen["bytes"]
    from finetune.run.checkpoint import load_checkpoint

    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_full_disk_at_config_yaml_leaves_no_run_folder(base, tmp_path, cli, monkeypatch):
    """The disk is full when a new run writes config.yaml (its first file after the marker): one error line, and
    the new run directory is removed (an empty one would make the same command fail with "already exists")."""
    import finetune.run.checkpoint as C

    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == "config.yaml":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(C.os, "replace", replace)
    out = tmp_path / "o"
    r = cli("train", "--data", base / "data", "--out", out, "--model", "smallcnn", "--weights", "none", *FAST)
    check_one_error(r, f"cannot write '{out / 'config.yaml'}': No space left on device")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.subprocess
def test_real_process_errors_have_no_traceback(base):
    """One row in a real process: the exit code and stderr a shell sees (CliRunner could hide a traceback)."""
    p = run_cli("eval", base / "truncated.pt")
    fragment = f"Error: cannot read checkpoint '{base / 'truncated.pt'}': not a PyTorch file or truncated"
    assert p.returncode == 1
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith(fragment)
    assert "Traceback" not in p.stderr
    p = run_cli("eval", base / "whole.pth")  # a pickle refusal: no torch warning printed before the line
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"Error: '{base / 'whole.pth'}' holds pickled Python objects (e.g. a whole model "
                                     "saved with torch.save(model)), which can run code when loaded; re-save the "
                                     "weights with torch.save(model.state_dict(), PATH), or pass --trust-checkpoint "
                                     "if you trust where the file came from"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.subprocess
def test_nproc_worker_error_is_one_line_from_the_launcher(tmp_path):
    """A mistake found only inside the --nproc workers (a corrupt image under --strict): one Error line, printed once
    by the launcher (not once per rank), exit 1, no torchrun log lines or ChildFailedError traceback; the new run
    directory is gone."""
    data = tiny_tree(tmp_path / "data", per_class=4)
    (data / "a" / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    p = run_cli("train", "--nproc", "2", "--strict", "--data", data, "--out", out, "--model", "smallcnn",
                "--weights", "none", *FAST, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    assert p.stderr.splitlines() == [f"Error: cannot read image '{data / 'a' / 'bad.png'}': not an image (unknown "
                                     "format) (--strict; remove the file, or drop --strict to skip it)"]
    assert not out.exists()


def test_launcher_shows_the_first_real_worker_error(tmp_path):
    """Rank 1 failed first; torchrun then stopped rank 0, which says "interrupted": the launcher shows rank 1's
    error. With only "interrupted" lines (Ctrl-C), rank 0's; with none, the agent's summary of the crash."""
    import json

    from finetune.parallel.launcher import pick_error

    def rec(rank, message, code, t):
        (tmp_path / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "message": message,
                                                                "exit_code": code, "time": t}))

    assert pick_error(tmp_path) is None
    (tmp_path / "agent.json").write_text(json.dumps({"message": "training process 1 ... killed", "exit_code": 1}))
    assert pick_error(tmp_path)["message"] == "training process 1 ... killed"
    rec(1, "interrupted; one", 130, 5.0)
    rec(0, "interrupted; zero", 130, 6.0)
    assert pick_error(tmp_path)["message"] == "interrupted; zero"
    rec(2, "bad image", 1, 7.0)
    rec(3, "bad value", 1, 4.0)
    assert pick_error(tmp_path) == {"rank": 3, "message": "bad value", "exit_code": 1, "time": 4.0}


def test_sharded_last_pt_without_its_shards_is_one_error(base, tmp_path, cli):
    """An FSDP run's last.pt names its weights in RUN/shards/ (parallel/sharded.py): copied without that folder,
    eval and resume say so in one line, and nothing is written."""
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    ck = torch.load(run / "last.pt", weights_only=True)
    torch.save({**ck, "model": {}, "optimizer": None,
                "sharded": {"path": "shards/e0001", "format": "torch.distributed.checkpoint", "world_size": 2}},
               run / "last.pt")
    before = _snapshot(run)
    msg = (f"Error: '{run / 'last.pt'}' names sharded weights in '{run / 'shards' / 'e0001'}', which is missing or "
           "incomplete; resume from a copy of the whole run directory (last.pt with its shards/ folder)")
    for args in (("eval", run / "last.pt"), ("train", "--resume", run, "--epochs", "2", "--quiet")):
        r = cli(*args)
        check_one_error(r, msg)
        assert r.stderr.strip().splitlines()[-1] == msg
    assert _snapshot(run) == before
