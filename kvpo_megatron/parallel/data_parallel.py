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
