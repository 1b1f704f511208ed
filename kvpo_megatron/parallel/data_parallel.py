"""Data-parallel gradient reduction of the trainable (LoRA) parameters with megatron-core's DDP.

Megatron's ``DistributedDataParallel`` keeps a contiguous fp32 ``main_grad`` buffer for the parameters that
require grad (only the LoRA here), accumulates every backward into it, and ``finish_grad_sync()`` averages it
over the data-and-context-parallel group. Averaging over CP is what makes context parallelism exact: every CP
rank computes the same loss, so its parameter gradients sum to CP times the single-process gradient.
A rank whose prompt groups were all skipped still joins the collective with zero gradients.
"""
from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig


def wrap_data_parallel(model, pg_collection) -> DistributedDataParallel:
    """Wrap ``model`` (after LoRA injection) so its trainable gradients are reduced over ``dp_cp``."""
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    return DistributedDataParallel(model.config, ddp_cfg, model, pg_collection=pg_collection)


def clip_grad_norm(params: list, max_norm: float, mp_group) -> float:
    """Global L2 grad norm across the model-parallel group, then clip in place; returns the norm.

    TP-sharded gradients contribute their shard, TP-replicated ones only on TP rank 0 (megatron's
    ``param_is_not_tensor_parallel_duplicate``), so every rank gets the single-process norm and the same clip
    coefficient. (megatron's ``get_grad_norm_fp32`` does the same but allocates on CUDA only.)
    """
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    device = params[0].grad.device
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    for p in params:
        if param_is_not_tensor_parallel_duplicate(p):
            sq += p.grad.double().pow(2).sum()
    dist.all_reduce(sq, group=mp_group)
    total = float(sq.sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return total
