"""Process groups through megatron-core's ``parallel_state``.

``init_parallel(tp, cp)`` initialises torch.distributed (from torchrun's environment, or a single
local process when there is none), builds megatron's TP/CP/DP groups and returns a
``ProcessGroupCollection`` that is passed down to every module that needs a group.
Backend: NCCL with CUDA, gloo without.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.parallel.collectives import group_size
from kvpo_megatron.parallel.cpu_shims import apply_cpu_shims
from kvpo_megatron.parallel.layout import CPAttention, check_heads, cp_attention_of


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout. Data parallel is world_size / (TP * CP)."""

    tensor_model_parallel_size: int = 1
    """Heads (and FFN columns) sharded over this many ranks."""
    context_parallel_size: int = 1
    """Tokens of a block sharded over this many ranks."""
    cp_attention: CPAttention = CPAttention.auto
    """Cached self-attention under CP: ``ulysses`` (all-to-all), ``allgather`` (of K/V) or ``auto``
    (ulysses when heads % (TP*CP) == 0, else allgather); ``parallel/layout.py``."""
    branches_over_dp: bool = False
    """Spread the G branches of one prompt over the DP ranks (all DP ranks then share one prompt). DP rank 0 alone
    rolls out the anchor; the others replay their branches meanwhile (``kvpo/branch_schedule.py``)."""
    replay_ahead: int | None = None
    """With ``branches_over_dp``: own branches the ranks without the anchor replay while DP rank 0 rolls it out
    (None: as many as the anchor's forwards cover, ``kvpo/branch_schedule.plan_counts``)."""
    replay_handoff: int | None = None
    """With ``branches_over_dp``: branch replays DP rank 0 hands to the other ranks after the coefficients
    (None: the count that balances the replays left, ``kvpo/branch_schedule.plan_counts``)."""

    def __post_init__(self):
        for f in ("tensor_model_parallel_size", "context_parallel_size"):
            if getattr(self, f) < 1:
                raise ConfigError(f"parallel.{f} must be >= 1, got {getattr(self, f)}")
        self.cp_attention = cp_attention_of(self.cp_attention)
        for f in ("replay_ahead", "replay_handoff"):
            if getattr(self, f) is not None and getattr(self, f) < 0:
                raise ConfigError(f"parallel.{f} must be >= 0, got {getattr(self, f)}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed once; returns (rank, world_size)."""
    apply_cpu_shims()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ:  # torchrun (env:// rendezvous)
            dist.init_process_group(backend)
        else:  # a plain single process; the environment is left untouched for child processes
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def validate_layout(par: ParallelConfig, *, world_size: int, num_heads: int | None = None) -> None:
    """Reject impossible layouts with one clear message, before anything runs."""
    mp = par.tensor_model_parallel_size * par.context_parallel_size
    if world_size % mp:
        raise ConfigError(f"world size {world_size} is not divisible by tensor_model_parallel_size "
                          f"({par.tensor_model_parallel_size}) x context_parallel_size ({par.context_parallel_size})")
    if num_heads is not None:
        check_heads(num_heads, tp=par.tensor_model_parallel_size, cp=par.context_parallel_size,
                    cp_attention=par.cp_attention)


def validate_tokens(cfg, par: ParallelConfig, latent_height: int, latent_width: int) -> None:
    """Context parallelism shards each latent frame's tokens: CP must divide (and not exceed) them.

    ``cfg`` is the model's ``WanConfig`` (for the patch size); call before generating at a latent size.
    """
    cp = par.context_parallel_size
    if cp == 1:
        return
    _, ph, pw = cfg.patch_size
    t = cfg.tokens_per_frame(latent_height, latent_width)
    where = (f"latent {latent_height}x{latent_width} with patch {ph}x{pw} gives {t} tokens per latent frame")
    if cp > t:
        raise ConfigError(f"context_parallel_size ({cp}) is larger than the tokens of a latent frame: {where}")
    if t % cp:
        raise ConfigError(f"context_parallel_size ({cp}) must divide the tokens of a latent frame: {where}")


def check_group_sizes(pg_collection, *, tp: int, cp: int) -> None:
    """The layout sizes a model is built with must match the process groups it is given."""
    for name, want in (("tp", tp), ("cp", cp)):
        got = group_size(getattr(pg_collection, name, None))
        if got != want:
            raise ConfigError(f"model built with {name} size {want} but pg_collection.{name} has {got} ranks; "
                              "pass the sizes init_parallel was called with")


def init_parallel(par: ParallelConfig, *, num_heads: int | None = None):
    """Initialise distributed + megatron parallel_state; return megatron's ProcessGroupCollection."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    _, world = init_distributed()
    validate_layout(par, world_size=world, num_heads=num_heads)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=par.tensor_model_parallel_size,
                                 context_parallel_size=par.context_parallel_size)
    if torch.cuda.is_available():  # megatron's on-GPU weight init (model.overrides.use_cpu_initialization=false)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # draws from its RNG tracker

        model_parallel_cuda_manual_seed(0)
    pgs = ProcessGroupCollection()
    pgs.tp = ps.get_tensor_model_parallel_group()
    pgs.cp = ps.get_context_parallel_group()
    pgs.dp = ps.get_data_parallel_group()
    pgs.dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
    pgs.tp_cp = ps.get_tensor_and_context_parallel_group()
    pgs.mp = ps.get_model_parallel_group()
    # megatron's DistributedDataParallel also wants these (size 1 here: no pipeline/expert parallelism)
    pgs.pp = ps.get_pipeline_model_parallel_group()
    pgs.ep = ps.get_expert_model_parallel_group()
    pgs.expt_dp = ps.get_expert_data_parallel_group(with_gtp_remat=False)
    return pgs
