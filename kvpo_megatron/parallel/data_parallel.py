"""Data-parallel gradient reduction of the trainable (LoRA) parameters.

Gradients are summed over the DP group in one flat bucket per dtype (the loss is pre-scaled by 1/(groups x DP),
so the sum is the mean). A rank whose prompt groups were all skipped still joins with zero gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class GradientReducer:
    def __init__(self, params: list[torch.nn.Parameter], group):
        self.params, self.group = params, group

    def all_reduce_sum(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if dist.get_world_size(self.group) == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in self.params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for ps in by_dtype.values():
            flat = _flatten_dense_tensors([p.grad for p in ps])
            dist.all_reduce(flat, group=self.group)
            for p, g in zip(ps, _unflatten_dense_tensors(flat, [p.grad for p in ps])):
                p.grad.copy_(g)
