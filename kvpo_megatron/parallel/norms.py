"""Wan's q/k RMSNorm over the FULL hidden width, exact under tensor parallelism.

Wan normalises q and k over all heads at once (``RMSNorm(dim)`` before the head split). With heads
sharded over TP ranks each rank holds ``dim/TP`` channels, so the sum of squares is all-reduced
over the TP group (forward and backward) before dividing by the full width. With TP=1 the
collective is skipped and this is a plain RMSNorm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from kvpo_megatron.parallel.collectives import group_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward; the gradient of a sum shared by all ranks is also summed."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd-aware all-reduce (sum)."""
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


class FullDimRMSNorm(nn.Module):
    """RMSNorm whose statistics span ``hidden_size`` channels sharded over ``tp_group``."""

    def __init__(self, hidden_size: int, eps: float, *, tp_group=None):
        super().__init__()
        tp = group_size(tp_group)
        self.hidden_size, self.eps, self.tp_group = hidden_size, eps, tp_group
        self.weight = nn.Parameter(torch.ones(hidden_size // tp))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ss = all_reduce_sum(xf.pow(2).sum(-1, keepdim=True), self.tp_group)
        return (xf * torch.rsqrt(ss / self.hidden_size + self.eps)).type_as(x) * self.weight.to(x.dtype)
