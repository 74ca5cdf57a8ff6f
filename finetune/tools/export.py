"""``finetune export``: a checkpoint as weights alone (safetensors, state_dict) or as a deployable graph (ONNX,
TorchScript) with its preprocessing beside it.

The graph formats run without finetune: ONNX with a dynamic batch axis (``input`` [batch, 3, H, W] float32 ->
``logits`` [batch, classes]), produced by PyTorch's ``torch.export``-based exporter (onnxscript); TorchScript by
``torch.jit.trace`` in eval mode. Next to the graph, ``<file>.json`` records what a deployment needs to feed it:
the checkpoint's eval transform (resize, crop, mean/std, interpolation), the class names in logit order, the input
shape, and for ONNX the opset. The graph is always fp32 and channels-first, whatever precision the run trained
in: a deployment runtime picks its own precision. Writes are atomic and never replace a file without
``overwrite``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune.config.preflight import checkpoint_file
from finetune.files import atomic_write_bytes
from finetune.run.checkpoint import EXPORT_SUFFIX, export_weights, load_checkpoint
from finetune.run import checkpoint as ck
from finetune.errors import CheckpointError

GRAPH_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
FORMATS = (*EXPORT_SUFFIX, *GRAPH_SUFFIX)
DEFAULT_OPSET = 18  # the torch.export-based exporter's lowest opset; onnxruntime >= 1.14 runs it


def export(checkpoint: str | Path, fmt: str = "safetensors", out: str | Path | None = None, *,
           overwrite: bool = False, opset: int | None = None) -> list[Path]:
    """Export ``checkpoint`` as ``fmt`` (``safetensors | state-dict | onnx | torchscript``); returns the files
    written (the graph formats: the graph, then its ``.json`` sidecar). ``out`` defaults to the checkpoint's name
    with the format's suffix, next to it."""
    if fmt in EXPORT_SUFFIX:
        if opset is not None:
            raise CheckpointError(f"--opset applies to --format onnx only, not {fmt}")
        if out is not None:
            refuse_run_file(Path(out))
        checkpoint_file(checkpoint)  # a missing checkpoint: the error before torch is imported
        return [export_weights(checkpoint, fmt, out, overwrite=overwrite)]
    if fmt not in GRAPH_SUFFIX:
        raise CheckpointError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if opset is not None and fmt != "onnx":
        raise CheckpointError(f"--opset applies to --format onnx only, not {fmt}")
    if fmt == "onnx":
        if opset is not None and opset < DEFAULT_OPSET:
            raise CheckpointError(f"--opset must be >= {DEFAULT_OPSET} (the torch.export-based ONNX exporter's "
                                  f"lowest), got {opset}")
        _need_onnx()
    checkpoint_file(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    src = Path(ckpt["_path"])
    dest = Path(out) if out is not None else src.with_suffix(GRAPH_SUFFIX[fmt])
    side = dest.with_name(dest.name + ".json")
    for p in (dest, side):
        refuse_run_file(p)
        if p.resolve() == src.resolve():
            raise CheckpointError(f"refusing to export '{src}' onto itself; choose another --out")
        if p.is_dir():
            raise CheckpointError(f"'{p}' is a directory; --out takes a file path")
        if p.exists() and not overwrite:
            raise CheckpointError(f"'{p}' already exists; pass --overwrite to replace it or choose another --out")
    model, example = _eval_model(ckpt)
    meta = sidecar(ckpt, fmt)
    if fmt == "onnx":
        data, meta["opset"] = _onnx_bytes(model, example, opset or DEFAULT_OPSET, meta)
        write = lambda f: f.write(data)  # noqa: E731
    else:
        traced = _traced(model, example)
        write = lambda f: _jit_save(traced, f)  # noqa: E731
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # the write below fails with its own one-line error
    new = not dest.exists()
    try:
        atomic_write_bytes(dest, write)
        try:
            atomic_write_bytes(side, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM between the two: no graph without its sidecar
            if new:
                dest.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise CheckpointError(f"cannot write '{dest}': {e.strerror or e}") from None
    return [dest, side]


def run_file_owner(path: Path) -> Path | None:
    """The run directory that owns ``path`` (a name a finetune run writes -- last.pt, best.pt, best_ema.pt,
    epochNNN.pt, metrics.json, config.yaml, report.html, ... -- in a folder holding a run: last.pt, metrics.json,
    config.yaml or the run marker), else None. Checked for the path as given and for where a symlink leads."""
    for p in dict.fromkeys((Path(path), Path(os.path.realpath(path)))):
        folder = p.parent
        if ck._run_owned(p.name) and any((folder / n).is_file() for n in ("last.pt", "metrics.json", "config.yaml",
                                                                          ck.MARKER)):
            return folder
    return None


def refuse_run_file(path: Path) -> None:
    """An export must never replace (or add) a file of a run directory: ``--out RUN/last.pt --overwrite`` would
    turn the run's checkpoint into an exported graph."""
    folder = run_file_owner(path)
    if folder is not None:
        raise CheckpointError(f"refusing to write the export to '{path}': '{Path(path).name}' is a file of the run "
                              f"directory '{folder}'; choose another --out (a name the run does not use)")


def sidecar(ckpt: dict[str, Any], fmt: str) -> dict[str, Any]:
    """What a deployment needs beside the graph: input layout, the eval transform, the class names."""
    tf = dict(ckpt["transform"])
    c, h, w = (int(v) for v in tf["input_size"])
    return {"format": fmt, "model_name": str(ckpt["model_name"]), "num_classes": int(ckpt["num_classes"]),
            "class_names": list(ckpt["class_names"]),
            "input": {"name": "input", "shape": ["batch", c, h, w], "dtype": "float32", "layout": "NCHW",
                      "range": "RGB scaled to [0, 1], then (x - mean) / std"},
            "output": {"name": "logits", "shape": ["batch", int(ckpt["num_classes"])]},
            "transform": tf, "epoch": ckpt.get("epoch")}


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise CheckpointError(f"--format onnx needs the packages onnx and onnxscript ({e.name} is missing); "
                              "install them with pip install 'finetune[onnx]'") from None


def _eval_model(ckpt: dict[str, Any]):
    """The checkpoint's model in eval mode, fp32, channels-first, on the CPU, and an example batch of 2."""
    import torch

    from finetune.run.restore import restore_model

    model = restore_model(ckpt, "cpu", channels_last=False)[0].float()
    example = torch.zeros(2, *(int(v) for v in ckpt["transform"]["input_size"]))
    return model, example


def _onnx_bytes(model, example, opset: int, meta: dict[str, Any]) -> tuple[bytes, int]:
    import contextlib
    import io
    import warnings

    import torch

    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.inference_mode(False):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset,
                                     input_names=["input"], output_names=["logits"],
                                     dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as e:  # noqa: BLE001 - an exporter failure names the operator; one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"ONNX export of '{meta['model_name']}' failed: {first}; "
                              "try --format torchscript") from None
    proto = prog.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    for k, v in (("finetune.class_names", json.dumps(meta["class_names"])),
                 ("finetune.transform", json.dumps(meta["transform"])), ("finetune.model_name", meta["model_name"])):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    return proto.SerializeToString(), int(got)


def _traced(model, example):
    import warnings

    import torch

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return torch.jit.trace(model, example, check_trace=False)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"TorchScript export failed: {first}; try --format onnx") from None


def _jit_save(traced, f) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; it still loads everywhere
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, f)
