"""Inference graphs kept per checkpoint: a later ``predict`` of the same ``best.pt`` imports neither timm nor
torchvision.

Restoring a timm or torchvision model imports its library, and both import torchvision, whose ``ops`` import
``torch._dynamo``: ~2.7 s over ``import torch`` on the 2-core CPU, for a forward pass over one photo of ~0.03 s.
A ``predict`` builds the model as always; the second one of the same checkpoint file then also exports the module it
ran (the conv+BN folded copy when fast inference folded it) with ``torch.export`` (batch size dynamic) and keeps
the graph (the first only leaves a mark, ``<key>.seen``: a checkpoint predicted once never repays the ~2.5 s of an
export); every later ``predict`` of that file runs the graph with :class:`Graph` and the torchvision-free eval transform
(:class:`finetune.data.transforms.PlainEvalTransform`).

An entry, ``<cache root>/inference/<key>/``: ``graph.json`` (the nodes: ATen operator names and their arguments,
constants written as JSON) and ``tensors.safetensors`` (parameters, buffers and constants). The key: the SHA-256 of
the checkpoint file's bytes, the fast-inference mode, the device type, torch's version and :data:`FORMAT`. An entry
is written atomically (a temporary sibling directory, renamed) only after the graph's output on the first batch
equalled the module's bitwise, and read only when everything checks out (the format, every operator an
``OpOverload`` of ``torch.ops.aten`` that touches no file, every tensor present); anything else is a miss and the
model is built. Nothing in an entry runs but ATen operators on its own tensors and the input. ``finetune cache
clear`` removes entries with the features; ``FINETUNE_CACHE=off`` keeps none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from finetune import files

log = logging.getLogger("finetune")

FORMAT = 1
DIR = "inference"
REFUSED = ("file", "print", "save", "load")  # no operator whose name mentions these runs from an entry


class Unstorable(Exception):
    """The exported graph holds something :func:`store` does not write (then nothing is kept)."""


def key_of(checkpoint: Path, mode: str, device: torch.device) -> str:
    h = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    parts = {"format": FORMAT, "checkpoint": h.hexdigest(), "mode": mode, "device": device.type,
             "torch": torch.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def _root(cache_dir=None) -> Path | None:
    root = files.cache_root(cache_dir)
    return root / DIR if root is not None else None


# ----------------------------------------------------------------------------------------------- encoding

def _enc(a: Any) -> Any:
    from torch.fx import Node

    if isinstance(a, Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, str)):
        return a
    if isinstance(a, (int, float)):
        return a if a == a and abs(a) != float("inf") else {"float": repr(float(a))}
    if isinstance(a, (list, tuple)):
        return {"list": [_enc(v) for v in a]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": a.type}
    raise Unstorable(f"argument of type {type(a).__name__}")


def _dec(a: Any, env: dict[str, Any]) -> Any:
    if not isinstance(a, dict):
        return a
    (kind, v), = a.items()
    if kind == "node":
        return env[v]
    if kind == "list":
        return [_dec(x, env) for x in v]
    if kind == "float":
        if str(v) not in ("inf", "-inf", "nan"):
            raise ValueError(f"not a special float: {v}")
        return float(v)
    if kind in ("dtype", "memory_format", "layout"):
        got = getattr(torch, str(v), None)
        if not isinstance(got, (torch.dtype, torch.memory_format, torch.layout)):
            raise ValueError(f"not a torch {kind}: {v}")
        return got
    if kind == "device":
        if str(v) not in ("cpu", "cuda", "mps", "xpu"):
            raise ValueError(f"not a device type: {v}")
        return torch.device(str(v))
    raise ValueError(f"unknown argument kind {kind}")


def _check(a: Any, known: set[str]) -> None:
    """A ValueError unless ``a`` is an argument :func:`_enc` writes whose node references are all in ``known``."""
    if a is None or isinstance(a, (bool, int, float, str)):
        return
    if not isinstance(a, dict) or len(a) != 1:
        raise ValueError("malformed argument")
    (kind, v), = a.items()
    if kind == "node":
        if v not in known:
            raise ValueError(f"a reference to {v!r} before it is defined")
    elif kind == "list":
        if not isinstance(v, list):
            raise ValueError("malformed list")
        for x in v:
            _check(x, known)
    elif kind in ("float", "dtype", "memory_format", "layout", "device"):
        _dec(a, {})
    else:
        raise ValueError(f"unknown argument kind {kind!r}")


def _op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"aten.{target._opname}.{target._overloadname}"
    raise Unstorable(f"operator {target}")


def _op(name: str):
    if name == "getitem":
        return operator.getitem
    ns, op, overload = name.split(".")
    if ns != "aten" or any(w in op for w in REFUSED):
        raise ValueError(f"operator {name} is not run from the inference store")
    got = getattr(getattr(torch.ops.aten, op), overload)
    if not isinstance(got, torch._ops.OpOverload):
        raise ValueError(f"{name} is not an ATen operator")
    return got


# ----------------------------------------------------------------------------------------------- the graph

class Graph:
    """A stored inference graph: ``graph(x)`` runs its nodes in order (ATen operators on the stored tensors and
    ``x``) and returns the model's output."""

    def __init__(self, nodes: list[dict[str, Any]], tensors: dict[str, torch.Tensor], inputs: list[list],
                 output: str):
        """Checks the whole document first (a ValueError for anything malformed): every node's operator, every
        argument's form, and every reference to a name defined before it."""
        self.inputs = [(str(name), None if t is None else str(t)) for name, t in inputs]  # t None: the user's input
        known = {name for name, _ in self.inputs}
        self.nodes = []
        for n in nodes:
            args, kwargs = n["args"], n["kwargs"]
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise ValueError("malformed node")
            for a in [*args, *kwargs.values()]:
                _check(a, known)
            self.nodes.append((str(n["name"]), _op(str(n["op"])), args, kwargs))
            known.add(str(n["name"]))
        if output not in known:
            raise ValueError("the output is not a node")
        self.tensors, self.output = tensors, output

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = {name: (x if t is None else self.tensors[t]) for name, t in self.inputs}
        for name, op, args, kwargs in self.nodes:
            env[name] = op(*_dec({"list": args}, env), **{k: _dec(v, env) for k, v in kwargs.items()})
        return env[self.output]


def _export(module: torch.nn.Module, example: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(graph.json's document, tensors)`` of ``module`` exported on ``example`` (its batch dimension dynamic)."""
    from torch.export import Dim, export
    from torch.export.graph_signature import InputKind, OutputKind

    ep = export(module, (example,), dynamic_shapes=({0: Dim("batch", min=1)},))
    sig = ep.graph_signature
    if [o.kind for o in sig.output_specs] != [OutputKind.USER_OUTPUT]:
        raise Unstorable("outputs other than the model's")
    inputs, tensors, nodes, output = [], {}, [], None
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            inputs.append([node.name, None])
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise Unstorable(f"input of kind {spec.kind}")
        value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        tensors[node.name] = value.detach()
        inputs.append([node.name, node.name])
    if sum(t is None for _, t in inputs) != 1:
        raise Unstorable("not one input")
    for n in ep.graph.nodes:
        if n.op == "call_function":
            nodes.append({"name": n.name, "op": _op_name(n.target), "args": _enc(list(n.args))["list"],
                          "kwargs": {k: _enc(v) for k, v in n.kwargs.items()}})
        elif n.op == "output":
            out = n.args[0]
            out = out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out
            output = _enc(out).get("node") if isinstance(_enc(out), dict) else None
        elif n.op != "placeholder":
            raise Unstorable(f"node of kind {n.op}")
    if output is None:
        raise Unstorable("an output that is not one tensor")
    # Each tensor's strides as the model held them (channels-last weights): a kernel may choose its algorithm by
    # them, so the same values in another layout need not give the same output bits.
    strides = {k: list(t.stride()) for k, t in tensors.items() if list(t.stride()) != _row_major(t.shape)}
    return {"format": FORMAT, "inputs": inputs, "nodes": nodes, "output": output, "strides": strides}, tensors


def _row_major(shape) -> list[int]:
    """The strides of a freshly allocated tensor of ``shape`` (what safetensors gives back)."""
    out, step = [], 1
    for n in reversed(list(shape)):
        out.append(step)
        step *= int(n)
    return out[::-1]


def _graph(doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Graph:
    if doc.get("format") != FORMAT:
        raise ValueError("format")
    for name, stride in doc["strides"].items():
        t, stride = tensors[name], [int(s) for s in stride]
        # a layout of the tensor's own elements (a permutation of row-major): no stride may make it allocate more
        if len(stride) != t.dim() or min(stride, default=1) < 1 or \
                1 + sum((n - 1) * s for n, s in zip(t.shape, stride)) != t.numel():
            raise ValueError(f"strides {stride} do not lay out {name}")
        tensors[name] = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)
    names = {t for _, t in doc["inputs"] if t is not None}
    if names != set(tensors):
        raise ValueError("tensors do not match the graph's inputs")
    return Graph(doc["nodes"], tensors, doc["inputs"], str(doc["output"]))


def load(key: str, device: torch.device, cache_dir=None) -> Graph | None:
    """The stored graph for ``key`` on ``device``, or None (no entry, or one that does not check out)."""
    root = _root(cache_dir)
    if root is None or not (root / key / "graph.json").is_file():
        return None
    try:
        from safetensors.torch import load_file

        doc = json.loads((root / key / "graph.json").read_text("utf-8"))
        tensors = load_file(str(root / key / "tensors.safetensors"), device=str(device))
        return _graph(doc, tensors)
    except Exception as e:  # a damaged or foreign entry is a miss: the model is built as without the store
        log.debug(f"inference store: entry {key[:12]} not used ({type(e).__name__}: {e})")
        return None


def seen(key: str, cache_dir=None) -> bool:
    """Whether a ``predict`` of this checkpoint ran before and left its mark (:func:`mark`): exporting costs
    ~2.5 s on the 2-core CPU, which a checkpoint predicted once never repays, so the graph is kept at the second."""
    root = _root(cache_dir)
    return root is not None and (root / f"{key}.seen").is_file()


def mark(key: str, cache_dir=None) -> None:
    """Leave the mark :func:`seen` looks for (an empty file; an unwritable cache keeps none)."""
    root = _root(cache_dir)
    if root is None:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{key}.seen").touch()
    except OSError as e:
        log.debug(f"inference store: no mark ({e})")


def store(key: str, module: torch.nn.Module, example: torch.Tensor, cache_dir=None) -> bool:
    """Export ``module`` and keep its graph under ``key`` when the graph's output on ``example`` equals the
    module's bitwise; True when stored. Never raises: a model that cannot be exported is simply not kept."""
    root = _root(cache_dir)
    if root is None:
        return False
    tmp, kept = None, False
    try:
        from safetensors.torch import save_file

        two = example if example.shape[0] > 1 else torch.cat([example, example])  # a batch of 1 would specialise
        doc, tensors = _export(module, two)
        graph = _graph(json.loads(json.dumps(doc, allow_nan=False)), dict(tensors))
        with torch.inference_mode():
            for x in (example[:1], two):
                if not torch.equal(graph(x), module(x)):
                    raise Unstorable("the graph's output differs from the model's")
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "graph.json").write_text(json.dumps(doc, allow_nan=False), "utf-8")
        if not (root / key).exists():
            os.replace(tmp, root / key)
        (root / f"{key}.seen").unlink(missing_ok=True)
        kept = True
    except Exception as e:  # noqa: BLE001 - an optimisation: the prediction already stands without it
        log.debug(f"inference store: not kept ({type(e).__name__}: {e})")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # left only when not renamed (a failure, or an existing entry)
    return kept
