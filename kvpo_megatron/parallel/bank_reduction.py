"""Process-group side of MemFlow's bank scores: the ``ScoreReduction`` for a model's parallel layout.

The bank scores (``model/memory_bank.py``) are means over text positions, heads and an entry's tokens. Each
rank of a model-parallel group holds a disjoint shard of the cache:

* TP: ``h/TP`` heads of every token; the text K has the same heads.
* CP, Ulysses: ``h/(TP*CP)`` heads of every token — chunk ``cp_rank`` of this TP rank's heads (the all-to-all in
  ``cp_attention.py`` sends head chunk ``j`` to CP rank ``j``) — while the text K has all ``h/TP`` heads.
* CP, K/V all-gather: ``T/CP`` tokens of each frame for ``h/TP`` heads.

So heads are summed over TP (over TP x CP under Ulysses), tokens over CP under the all-gather layout, the text
K is cut to the cache's head chunk under Ulysses, and the kept indices are broadcast from the first rank of
the TP x CP group so that every rank keeps the same entries.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model.memory_bank import LOCAL, ScoreReduction
from kvpo_megatron.parallel.collectives import group_rank, group_size
from kvpo_megatron.parallel.cp_attention import UlyssesCachedAttention


def _all_reduce(group, op) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if group_size(group) == 1:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone().contiguous()
        dist.all_reduce(t, op=op, group=group)
        return t
    return reduce


def _broadcast_first(group) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if group_size(group) == 1:
        return None
    src = dist.get_global_rank(group, 0)

    def agree(t: torch.Tensor) -> torch.Tensor:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else t.device
        buf = t.to(dev).contiguous()
        dist.broadcast(buf, src=src, group=group)
        return buf.to(t.device)
    return agree


def _head_chunk(cp_group) -> Callable[[torch.Tensor, int], torch.Tensor]:
    cp, r = group_size(cp_group), group_rank(cp_group)

    def text_heads(text_k: torch.Tensor, heads: int) -> torch.Tensor:
        if text_k.shape[2] != heads * cp:
            raise ConfigError(f"memory bank under Ulysses: text K has {text_k.shape[2]} heads, expected "
                              f"{heads} cache heads x CP {cp}")
        return text_k.narrow(2, r * heads, heads)
    return text_heads


def score_reduction(pg_collection, *, heads_over_cp: bool) -> ScoreReduction:
    """The reduction for a layout; ``heads_over_cp``: the cache is head-sharded over CP (Ulysses)."""
    tp, cp = getattr(pg_collection, "tp", None), getattr(pg_collection, "cp", None)
    if group_size(tp) * group_size(cp) == 1:
        return LOCAL
    tp_cp = getattr(pg_collection, "tp_cp", None)
    if tp_cp is None or group_size(tp_cp) != group_size(tp) * group_size(cp):
        raise ConfigError("memory bank under TP/CP needs pg_collection.tp_cp (the tensor x context parallel "
                          "group); build the ProcessGroupCollection with init_parallel")
    kw = {}
    if heads_over_cp and group_size(cp) > 1:
        kw.update(text_heads=_head_chunk(cp), sum_heads=_all_reduce(tp_cp, dist.ReduceOp.SUM))
    else:
        kw.update(sum_heads=_all_reduce(tp, dist.ReduceOp.SUM), sum_tokens=_all_reduce(cp, dist.ReduceOp.SUM),
                  max_tokens=_all_reduce(cp, dist.ReduceOp.MAX))
    kw["agree"] = _broadcast_first(tp_cp)
    return ScoreReduction(**{k: f for k, f in kw.items() if f is not None})


def score_reduction_for(model) -> ScoreReduction:
    """The reduction for a built ``CausalWanDiT`` (its ``pg_collection`` and attention cores)."""
    pgs = next((m.pg_collection for m in model.modules() if hasattr(m, "pg_collection")), None)
    ulysses = any(isinstance(m, UlyssesCachedAttention) for m in model.modules())
    return score_reduction(pgs, heads_over_cp=ulysses)
