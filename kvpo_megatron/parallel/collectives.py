"""Autograd-aware collectives over one process group, on rank-major dim 0.

Every function takes and returns tensors on the caller's device (CPU/gloo or CUDA/NCCL) and uses only
collectives both backends implement: ``all_gather_single`` (a.k.a. ``all_gather_into_tensor``),
``reduce_scatter_single`` (``reduce_scatter_tensor``) and ``all_to_all_single``.

Gradient convention: each function is the adjoint of the distributed linear map it computes, so a
backward pass gives ``d(sum over ranks of each rank's loss) / d(input)``. When every rank of the group
computes the same loss (the model output is gathered and replicated), parameter gradients summed over the
group are ``group_size`` times the single-process gradient: averaging them over the group (what
megatron's DistributedDataParallel does over ``dp_cp``) gives the single-process result.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    """Ranks in ``group`` (a process group; ``dist.group.WORLD`` for the world): 1 for None -- no such parallelism --
    or without torch.distributed. The package's one size helper: megatron's ``get_pg_size`` semantics, without
    importing megatron (the converter CLI starts without it)."""
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def group_rank(group) -> int:
    """This process's rank in ``group`` (0 for None or without torch.distributed)."""
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def global_rank() -> int:
    """This process's rank in the world (0 without torch.distributed)."""
    return group_rank(dist.group.WORLD)


def all_gather_dim0_nograd(x: torch.Tensor, group) -> torch.Tensor:
    """[n, ...] on each rank -> [world*n, ...] (rank-major), no autograd."""
    x = x.contiguous()
    out = torch.empty((group_size(group) * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x, group=group)
    return out


def reduce_scatter_dim0_nograd(x: torch.Tensor, group) -> torch.Tensor:
    """[world*n, ...] on each rank -> [n, ...]: this rank's chunk summed over ranks, no autograd."""
    x = x.contiguous()
    out = torch.empty((x.shape[0] // group_size(group), *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter(out, x, group=group)
    return out


class _AllGatherDim0(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim0_nograd(x, group)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_dim0_nograd(g, ctx.group), None


class _AllToAllDim0(torch.autograd.Function):
    """x [world, ...]: chunk ``j`` goes to rank ``j``; out[i] is the chunk rank ``i`` sent here.

    The map is its own adjoint, so the backward is the same all-to-all."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        out = torch.empty_like(g)
        dist.all_to_all_single(out, g, group=ctx.group)
        return out, None


def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd all-gather along dim 0 (identity for a 1-rank group)."""
    if group_size(group) == 1:
        return x
    return _AllGatherDim0.apply(x, group)


def all_to_all_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd all-to-all of the ``world`` chunks of dim 0 (identity for a 1-rank group)."""
    if group_size(group) == 1:
        return x
    if x.shape[0] != group_size(group):
        raise ValueError(f"all_to_all_dim0 needs dim 0 == group size {group_size(group)}, got {tuple(x.shape)}")
    return _AllToAllDim0.apply(x, group)


# ---- JSON between ranks (no pickle: torch's *_object collectives unpickle what they receive) ----------------
def comm_device() -> torch.device:
    """Where the default group's collectives take tensors: this rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _json_bytes(obj, device) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)


def _from_json_bytes(t: torch.Tensor):
    return json.loads(bytes(t.cpu().tolist()))


def broadcast_json(obj, *, src: int, group, device):
    """``obj`` (JSON-serialisable; ignored off ``src``, a global rank) as rank ``src`` holds it, on every rank."""
    data = _json_bytes(obj, device) if dist.get_rank() == src else None
    size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    if data is None:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=src, group=group)
    return _from_json_bytes(data)


def all_gather_json(obj, *, group=None, device) -> list:
    """``obj`` (JSON-serialisable) of every rank of ``group``, in rank order."""
    data, world = _json_bytes(obj, device), dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=device), group=group)
    longest = int(max(sizes))
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, torch.cat([data, data.new_zeros(longest - data.numel())]), group=group)
    return [_from_json_bytes(p[:int(n)]) for p, n in zip(parts, sizes)]
