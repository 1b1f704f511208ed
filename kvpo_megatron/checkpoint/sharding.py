"""Load a full (unsharded) state dict into a tensor-parallel model and gather it back.

Megatron marks sharded parameters with ``tensor_model_parallel=True`` and ``partition_dim``; this module
slices full tensors along that dim for this rank (and all-gathers them for export).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.parallel.collectives import group_rank, group_size


def _tp(model):
    group = getattr(getattr(model, "pg_collection", None), "tp", None)
    return group, group_rank(group), group_size(group)


def is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], *, strict: bool = True,
                         source_name: str = "state dict", skip=None) -> None:
    """Copy full tensors into the (possibly TP-sharded) parameters of ``model``; ``skip(name)`` True leaves a
    parameter alone and out of the missing-key check (e.g. LoRA adapters when loading base weights)."""
    _, rank, world = _tp(model)
    params = {n: p for n, p in model.named_parameters() if skip is None or not skip(n)}
    missing = [k for k in params if k not in full]
    unknown = [k for k in full if k not in params]
    mismatched = []
    with torch.no_grad():
        for name, p in params.items():
            if name not in full:
                continue
            t = full[name]
            if is_sharded(p) and world > 1:
                t = t.chunk(world, dim=p.partition_dim)[rank]
            if tuple(t.shape) != tuple(p.shape):
                mismatched.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(p.shape)}")
                continue
            p.copy_(t.to(p.dtype))
    problems = []
    if strict and missing:
        problems.append(f"missing keys {missing[:20]}")
    if strict and unknown:
        problems.append(f"unknown keys {unknown[:20]}")
    if mismatched:
        problems.append(f"mismatched shapes {mismatched[:20]}")
    if problems:
        raise ConfigError(f"{source_name}: " + "; ".join(problems))


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors of every parameter (all-gathered over TP for sharded ones)."""
    group, _, world = _tp(model)
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if is_sharded(p) and world > 1:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t.clone()
    return out
