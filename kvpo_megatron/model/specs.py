"""Layer specs: which linears, norms and attention cores build the DiT.

``local_spec()`` uses megatron-core's ``ColumnParallelLinear``/``RowParallelLinear`` (heads and FFN columns
sharded over TP), the TP-exact full-width RMSNorm and torch SDPA; it runs on CPU and GPU.
The context-parallel spec (``parallel/cp_attention.py``: a CP token sharder at the model boundary and a CP
attention core) and the TransformerEngine spec (``model/te_spec.py``) are built from :func:`block_spec` too.
The model never branches on the parallel layout: it builds whatever its spec names.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import nn

from kvpo_megatron.model.attention import (AttentionSubmodules, CachedSDPA, TextSDPA, WanCrossAttention,
                                           WanSelfAttention)
from kvpo_megatron.model.block import WanBlock, WanBlockSubmodules
from kvpo_megatron.parallel.norms import FullDimRMSNorm


class NoTokenSharding(nn.Module):
    """Model-boundary token plan without context parallelism: identity."""

    def __init__(self, pg_collection=None):
        super().__init__()

    def shard(self, tokens, *per_token, frames: int):
        return (tokens, *per_token)

    def gather(self, tokens, *, frames: int):
        return tokens


@dataclass
class CausalWanSubmodules:
    block: ModuleSpec
    token_sharder: ModuleSpec | type


def megatron_linear(parallel: str, group: str) -> type:
    """megatron-core's TP linears for every group: ``column`` (output sharded) or ``row`` (input sharded)."""
    return ColumnParallelLinear if parallel == "column" else RowParallelLinear


def block_spec(*, core_attention=CachedSDPA, cross_core=TextSDPA, linear=megatron_linear,
               qk_norm=FullDimRMSNorm) -> ModuleSpec:
    """One DiT block. ``linear(parallel, group)``: the ``column``- or ``row``-parallel linear of a group of linears
    (``self_attn``: q, k, v | o; ``cross_attn`` likewise; ``ffn``: fc1 | fc2); ``core_attention``/``cross_core``:
    the cached self-attention and the text cross-attention cores; ``qk_norm``: the q/k norm (all specs or classes)."""
    def attn(module, core, group):
        column = linear("column", group)
        return ModuleSpec(module=module, submodules=AttentionSubmodules(
            linear_q=column, linear_k=column, linear_v=column, linear_o=linear("row", group), q_norm=qk_norm,
            k_norm=qk_norm, core_attention=core))

    return ModuleSpec(module=WanBlock, submodules=WanBlockSubmodules(
        self_attention=attn(WanSelfAttention, core_attention, "self_attn"),
        cross_attention=attn(WanCrossAttention, cross_core, "cross_attn"),
        linear_fc1=linear("column", "ffn"), linear_fc2=linear("row", "ffn")))


def local_spec() -> CausalWanSubmodules:
    """Plain torch attention + megatron TP linears; no context parallelism."""
    return CausalWanSubmodules(block=block_spec(), token_sharder=NoTokenSharding)
