"""How N processes share the model: ``ddp`` (a full replica per process, gradients all-reduced) or ``fsdp``
(PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer state sharded).

FSDP2 here (``train.strategy: fsdp``, ``--strategy fsdp``; only with more than one process):

- units from the model's own block structure: every child of timm's ``blocks``/``stages``/``layers``, torchvision's
  ``features``, and each ``layerN``; then the root (the stem, the head, whatever is left). A unit whose parameters
  are partly frozen is split into its children until each unit is all-frozen or all-trainable (frozen units get no
  gradients and no reduce-scatter; their parameters are still sharded, so they cost 1/N of the memory);
- ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` when the run is bf16, except BatchNorm layers
  (units of their own in fp32: their running statistics are fp32 and ``batch_norm`` wants the weights alike);
- the optimizer is the run's own, pointed at the sharded parameters (its state, e.g. after a resume, is sharded with
  ``set_optimizer_state_dict``);
- evaluation: every unit is all-gathered once (``unshard``) and kept whole for the pass, so ranks whose val shards
  have different batch counts never wait for each other; resharded when training resumes;
- checkpoints (``train.checkpoint_format: auto``): ``last.pt``'s weights and optimizer state are written as
  ``torch.distributed.checkpoint`` shards, each rank its own (:mod:`.sharded`), and resume at any world size
  through DCP's resharding; ``best.pt`` and the top-k files are consolidated (the model is gathered to rank 0 when
  an epoch improves) and load in one process with ``torch.load(weights_only=True)``. ``full``: every rank joins
  ``get_model_state_dict`` / ``get_optimizer_state_dict`` (full, CPU) and rank 0 writes ``last.pt`` exactly as a
  DDP run does (the optimizer state in ``Optimizer.state_dict`` form); a resume reshards the full state on load.

Not with fsdp (each is one error line): an unfreeze schedule (FSDP fixes what trains when it shards), ``--ema``,
``save_every_steps``, fp16 (GradScaler; use bf16), ``--cache-features on`` (``auto`` leaves the cache off: a probe
on cached features needs no sharding).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from finetune.parallel import distributed as dist_
from finetune.errors import ConfigError
from finetune.parallel import sharded

CONTAINERS = ("blocks", "stages", "layers", "features")  # timm / torchvision stage and block containers


def uses_fsdp(cfg, d: dist_.Dist) -> bool:
    return d.enabled and getattr(cfg.train, "strategy", "ddp") == "fsdp"


def check(cfg, precision: str) -> None:
    """The options FSDP does not combine with (see the module docstring)."""
    t = cfg.train
    bad = [("an unfreeze schedule (freeze.schedule; the lp-ft recipe, which --model with pretrained weights picks "
            "when no --recipe or freeze flag is given, has one: pass --recipe default or a freeze flag)",
            bool(cfg.freeze.schedule)), ("--ema", t.ema),
           ("--save-every-steps", bool(t.save_every_steps)), ("--precision fp16 (use bf16)", precision == "fp16"),
           ("--cache-features on", t.cache_features == "on")]
    for what, hit in bad:
        if hit:
            raise ConfigError(f"--strategy fsdp does not support {what}; drop it, or use --strategy ddp")


def units(model: nn.Module) -> list[str]:
    """The modules to shard one by one (outermost first), from the model's block structure; each is all-frozen or
    all-trainable."""
    mods = dict(model.named_modules())
    blocks = [f"{c}.{k}" for c in CONTAINERS if isinstance(mods.get(c), (nn.Sequential, nn.ModuleList))
              for k, _ in mods[c].named_children()]
    blocks += [n for n in mods if re.fullmatch(r"layer\d+", n)]
    out: list[str] = []

    def add(name: str) -> None:
        flags = {p.requires_grad for p in mods[name].parameters()}
        if len(flags) == 1:
            out.append(name)
        elif len(flags) == 2:  # mixed: its children apart (its own direct parameters stay with the parent)
            for child, _ in mods[name].named_children():
                add(f"{name}.{child}")

    for b in blocks:
        add(b)
    return out


def shard(model: nn.Module, optimizer: torch.optim.Optimizer, precision: str) -> list[str]:
    """``fully_shard`` each unit and the root, in place, and point ``optimizer`` at the sharded parameters (its
    state, if any, resharded); returns the units."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    fqn = {id(p): n for n, p in model.named_parameters()}
    full = _fqn_optimizer_state(optimizer, fqn)
    for p in model.parameters():  # FSDP2 shards contiguous tensors only (channels_last conv weights are not):
        p.data = p.data.contiguous()  # the weights go back to NCHW; the inputs stay channels_last
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    names = units(model)
    mods = dict(model.named_modules())
    if precision == "bf16":  # BatchNorm keeps fp32 weights beside its fp32 running statistics (bf16 input is fine)
        for bn in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            if any(True for _ in bn.parameters()):
                fully_shard(bn, mp_policy=MixedPrecisionPolicy())
    for n in reversed(names):  # inner before outer (nested units come after their parent in `names`)
        if not isinstance(mods[n], FSDPModule):  # (a unit that is a BatchNorm is sharded already)
            fully_shard(mods[n], mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    new = dict(model.named_parameters())
    for g in optimizer.param_groups:
        g["params"] = [new[fqn[id(p)]] for p in g["params"]]
    optimizer.state.clear()
    if full["state"]:
        set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
    for g in optimizer.param_groups:  # DTensor has no sharding rule for the fused kernels (aten._fused_sgd_)
        if g.get("fused"):
            g["fused"] = False
    _eval_unsharded(model)
    return names


def _fqn_optimizer_state(optimizer: torch.optim.Optimizer, fqn: dict[int, str]) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name (the form ``set_optimizer_state_dict`` takes)."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [fqn[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    state = {fqn[id(p)]: {k: v.contiguous() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in optimizer.state.items() if s}
    return {"state": state, "param_groups": groups}


def plain_optimizer_state(osd: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed full optimizer state -> ``Optimizer.state_dict()`` form (parameters numbered in group order),
    which a DDP or single-process run loads as it is."""
    index: dict[str, int] = {}
    groups = []
    for g in osd["param_groups"]:
        ids = [index.setdefault(n, len(index)) for n in g["params"]]
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def gather(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full model and optimizer state on CPU, on rank 0 (every rank must call it: it all-gathers; the others
    get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    return msd, plain_optimizer_state(osd) if osd else {}  # with cpu_offload only rank 0 holds them


def _eval_unsharded(root: nn.Module) -> None:
    """``root.eval()`` all-gathers every unit once and keeps it whole for the pass; ``root.train()`` reshards.

    FSDP's forward all-gathers a unit's parameters on every rank together; without this a rank whose val shard has
    one batch more than the others' would wait for them forever. ``model.eval()`` is called on every rank at the
    same points of the run (evaluation), so the all-gather is collective.
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp = [m for m in root.modules() if isinstance(m, FSDPModule)]
    plain_train = root.train

    def train(mode: bool = True):
        if root.training and not mode:
            sync_buffers(root)
            for m in fsdp:
                m.set_reshard_after_forward(False, recurse=False)
                m.unshard()
        elif mode and not root.training:
            for m in fsdp:
                m.reshard()
                if m is not root:  # FSDP keeps the root whole after forward (backward needs it at once)
                    m.set_reshard_after_forward(True, recurse=False)
        return plain_train(mode)

    root.train = train  # type: ignore[method-assign]


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank (collective).

    FSDP shards parameters, not buffers: each rank's BatchNorm layers update their running statistics from its own
    batches, so they drift apart. DDP broadcasts rank 0's before every forward, which leaves every rank with rank
    0's statistics; this does the same before each evaluation and checkpoint, where the statistics are used or
    saved (every rank evaluates with the same model, and the shards hold one copy)."""
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b.data, src=0)


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, cfg, d: dist_.Dist, device: torch.device,
         precision: str) -> nn.Module:
    """The module the loop trains: DDP around ``model``, or ``model`` sharded in place by FSDP2 (``train.strategy``;
    ``optimizer`` then points at the shards), or ``model`` itself in a single process."""
    if not uses_fsdp(cfg, d):
        return dist_.wrap(model, d, device)
    check(cfg, precision)
    shard(model, optimizer, precision)
    return model


def sharded_checkpoints(cfg, d: dist_.Dist) -> bool:
    """FSDP with ``train.checkpoint_format: auto``: last.pt's weights and optimizer state are DCP shards
    (:mod:`finetune.parallel.sharded`)."""
    return uses_fsdp(cfg, d) and getattr(cfg.train, "checkpoint_format", "auto") == "auto"


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, cfg, d: dist_.Dist,
               consolidated: bool) -> tuple[dict, dict | None] | None:
    """FSDP: the consolidated ``(model, optimizer)`` state for the checkpoints (collective: every rank calls it);
    None otherwise (the model's own ``state_dict`` is whole). With sharded checkpoints only the model is gathered,
    and only when the epoch writes a ``consolidated`` file (best.pt, top-k): ``({}, None)`` otherwise."""
    if not uses_fsdp(cfg, d):
        return None
    sync_buffers(model)
    if sharded_checkpoints(cfg, d):
        return (gather_model(model) if consolidated else {}), None
    return gather(model, optimizer)


def gather_model(model: nn.Module) -> dict:
    """The full model state on CPU on rank 0 (collective; the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, cfg, d: dist_.Dist, run_dir,
                epochs_done: int) -> dict | None:
    """Sharded checkpoints: every rank writes its shards into ``run_dir`` now (collective); the entry last.pt names
    them by."""
    if not sharded_checkpoints(cfg, d):
        return None

    return sharded.save(model, optimizer, run_dir, epochs_done, d)
