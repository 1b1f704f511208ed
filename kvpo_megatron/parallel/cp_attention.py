"""Context parallelism for the streaming DiT: a token plan at the model boundary and two cached-attention cores.

Token plan (:class:`CPTokenSharding`)
-------------------------------------
A forward's tokens ``[b, F*T, dim]`` (F latent frames of T tokens, frame-major) are sharded *per frame*:
CP rank ``r`` keeps piece ``r`` of every frame (``[b, F, cp, T/cp, dim][:, :, r]``), so all token-wise
work (linears, norms, per-frame adaLN modulation, FFN, cross-attention) runs on ``F*T/cp`` tokens and the
block's per-frame view ``[b, F, T/cp, dim]`` still holds. ``gather`` restores ``[b, F*T, dim]`` before the
head (all-gather; its backward is a reduce-scatter, see ``parallel/collectives.py`` for the convention:
parameter gradients are averaged over CP, which megatron's DDP over ``dp_cp`` does).

Cached-attention cores (same contract as ``model.attention.CachedSDPA``)
------------------------------------------------------------------------
* :class:`UlyssesCachedAttention`: all-to-all from token-sharded ``[b, F*T/cp, h/TP, d]`` to head-sharded
  full sequences ``[b, F*T, h/(TP*CP), d]``, local cached attention, all-to-all back. The cache holds
  ``h/(TP*CP)`` heads of every token of each frame. Needs ``heads % (TP*CP) == 0``.
* :class:`AllGatherCachedAttention`: the cache holds this rank's ``T/cp`` tokens of each frame for the
  ``h/TP`` heads; the view's frames are read locally, then context and current K/V are all-gathered over
  CP and the local queries attend to all of them. No head constraint.

Default (``cp_attention: auto``): Ulysses whenever ``heads % (TP*CP) == 0``, else all-gather. Why:

1. Communication per layer and forward, per rank, for a block of L tokens attending C cached tokens
   (D = channels per TP rank): Ulysses moves q, k, v and the output once, ``4 * L/cp * D * (cp-1)/cp``,
   independent of the context; all-gather receives K and V of context + block, ``2 * (C+L) * D * (cp-1)/cp``.
   Streaming Wan attends a 12-frame span with a 3-frame block (C = 3L), so all-gather moves ``2*cp``
   times more (4x at CP=2, 8x at CP=4), on every one of the 5 forwards per block, and its backward adds a
   reduce-scatter of the block's K/V gradients.
2. Cache locality: under Ulysses a rank holds whole frames (all T tokens) of its heads, so any view
   (sink + local, CHR-routed history, MemFlow bank) is a local ``index_select`` with no communication:
   the CHR gather stays local. Under all-gather each rank gathers its token shard of the view's frames
   locally (identical indices on every rank), and the frames' full tokens only meet inside attention (or
   in :func:`distributed_frame_gather`, the distributed index gather).
3. Memory is the same: both store 1/(TP*CP) of the unsharded cache per rank.

``attn_mask`` (full-sequence block-causal mode) is not supported under CP: the mask is indexed in the
unsharded token order; run full-sequence checks with ``context_parallel_size=1`` or stream with a cache
(streaming attention needs no mask).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model.attention import CachedSDPA, sdpa, uses_replay_kernel
from kvpo_megatron.model.kv_cache import KVCache, LayerKV
from kvpo_megatron.model.specs import CausalWanSubmodules, block_spec
from kvpo_megatron.model.split_attention import cached_attention
from kvpo_megatron.parallel.collectives import (all_gather_dim0, all_gather_dim0_nograd, all_to_all_dim0,
                                                group_rank, group_size)
from kvpo_megatron.parallel.layout import CPAttention, check_heads


def _cp_group(pg_collection, who: str):
    group = getattr(pg_collection, "cp", None)
    if group is None:
        raise ConfigError(f"{who} needs pg_collection.cp (the context-parallel group); build the model with the "
                          "ProcessGroupCollection returned by init_parallel")
    return group


def _no_mask(attn_mask) -> None:
    if attn_mask is not None:
        raise ConfigError("attn_mask (full-sequence block-causal mode) is not supported with "
                          "context_parallel_size > 1; use context_parallel_size=1 for full-sequence forwards, "
                          "or stream with a KV cache (no mask needed)")


class CPTokenSharding(nn.Module):
    """Model-boundary token plan: rank ``r`` of the CP group keeps piece ``r`` of every frame's tokens."""

    def __init__(self, pg_collection=None):
        super().__init__()
        self.cp_group = _cp_group(pg_collection, "CPTokenSharding")

    def _split(self, n: int, frames: int) -> tuple[int, int]:
        cp = group_size(self.cp_group)
        if frames < 1 or n % frames:
            raise ConfigError(f"token count {n} is not a whole number of frames ({frames})")
        t = n // frames
        if t % cp:
            raise ConfigError(f"tokens per latent frame ({t}) must be divisible by context_parallel_size ({cp})")
        return cp, t // cp

    def shard(self, tokens: torch.Tensor, *per_token: torch.Tensor, frames: int):
        """tokens [b, F*T, d] -> [b, F*T/cp, d]; each per-token tensor [F*T, ...] -> [F*T/cp, ...]."""
        b, n, d = tokens.shape
        cp, tl = self._split(n, frames)
        r = group_rank(self.cp_group)
        out = [tokens.reshape(b, frames, cp, tl, d)[:, :, r].reshape(b, frames * tl, d)]
        for t in per_token:
            if t.shape[0] != n:
                raise ValueError(f"per-token tensor has {t.shape[0]} rows, tokens have {n}")
            out.append(t.reshape(frames, cp, tl, *t.shape[1:])[:, r].reshape(frames * tl, *t.shape[1:]))
        return tuple(out)

    def gather(self, tokens: torch.Tensor, *, frames: int) -> torch.Tensor:
        """[b, F*T/cp, d] -> [b, F*T, d] in the original frame-major order (autograd all-gather)."""
        b, nl, d = tokens.shape
        cp = group_size(self.cp_group)
        g = all_gather_dim0(tokens.reshape(1, b, frames, nl // frames, d), self.cp_group)  # [cp, b, F, Tl, d]
        return g.permute(1, 2, 0, 3, 4).reshape(b, frames * cp * (nl // frames), d)


class UlyssesCachedAttention(nn.Module):
    """All-to-all to head-sharded full sequences, a local cached core on ``h/(TP*CP)`` heads, all-to-all back.

    ``inner``: the local cached core (contract of ``model.attention.CachedSDPA``, which is the default; the TE spec
    passes its ``TECachedAttention`` built for ``h/(TP*CP)`` heads). It sees whole frames of this rank's heads, so
    the cache, CHR's routed views and the memory bank stay local; when the view commits, the current K/V are put in
    the unsharded (frame-major) token order first, as the cache stores frames. Queries stay rank-major (attention
    has no mask, so only the keys' order within a frame matters, and only to the cache). The forward, inner core
    included, is excluded from torch.compile (one graph break per layer, as the TE core alone has): its collectives
    and the cache reads/writes run eagerly."""

    def __init__(self, config, pg_collection=None, inner: ModuleSpec | type = CachedSDPA):
        super().__init__()
        self.cp_group = _cp_group(pg_collection, "UlyssesCachedAttention")
        check_heads(config.num_attention_heads, tp=config.tensor_model_parallel_size, cp=group_size(self.cp_group),
                    cp_attention=CPAttention.ulysses)
        self.inner = build_module(inner, config=config, pg_collection=pg_collection)

    def _seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, Lr, H, d] (this rank's tokens) -> [s, b, cp*Lr, H/cp, d] (rank-major tokens)."""
        cp = group_size(self.cp_group)
        s, b, lr, h, d = x.shape
        x = x.reshape(s, b, lr, cp, h // cp, d).permute(3, 0, 1, 2, 4, 5)  # [cp(dest), s, b, Lr, Hc, d]
        x = all_to_all_dim0(x, self.cp_group)  # [cp(src), s, b, Lr, Hc, d]
        return x.permute(1, 2, 0, 3, 4, 5).reshape(s, b, cp * lr, h // cp, d)

    def _heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """[b, cp*Lr, Hc, d] (rank-major tokens) -> [b, Lr, cp*Hc, d] (this rank's tokens, all its heads)."""
        cp = group_size(self.cp_group)
        b, n, hc, d = x.shape
        x = x.reshape(b, cp, n // cp, hc, d).transpose(0, 1)  # [cp(dest), b, Lr, Hc, d]
        x = all_to_all_dim0(x, self.cp_group)  # [cp(src = head chunk), b, Lr, Hc, d]
        return x.permute(1, 2, 0, 3, 4).reshape(b, n // cp, cp * hc, d)

    def _frame_major(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """Rank-major [b, cp*F*Tl, Hc, d] -> frame-major [b, F*T, Hc, d] (the unsharded token order)."""
        cp = group_size(self.cp_group)
        b, n, hc, d = x.shape
        return x.reshape(b, cp, frames, n // (cp * frames), hc, d).transpose(1, 2).reshape(b, n, hc, d)

    @torch.compiler.disable
    def forward(self, q, k, v, *, kv: LayerKV | None = None, attn_mask=None):
        """q, k, v: [b, F*T/cp, h/TP, d] -> [b, F*T/cp, h/TP, d]."""
        _no_mask(attn_mask)
        qh, kh, vh = self._seq_to_heads(torch.stack([q, k, v])).unbind(0)  # [b, F*T, h/(TP*CP), d] each
        if kv is not None and kv.view.write_slots is not None:  # the cache stores frames in the unsharded order
            nf = kv.view.write_slots.shape[-1]
            kh, vh = self._frame_major(kh, nf), self._frame_major(vh, nf)
        return self._heads_to_seq(self.inner(qh, kh, vh, kv=kv))


class AllGatherCachedAttention(nn.Module):
    """Token-sharded cache; context and current K/V all-gathered over CP; local queries attend to all."""

    def __init__(self, config, pg_collection=None):
        super().__init__()
        self.cp_group = _cp_group(pg_collection, "AllGatherCachedAttention")
        self.split_attention = config.split_attention

    def _gather_tokens(self, kv: torch.Tensor, grad: bool) -> torch.Tensor:
        """[2, b, n, h, d] per rank -> [2, b, cp*n, h, d] (rank-major tokens)."""
        two, b, n, h, d = kv.shape
        fn = all_gather_dim0 if grad else all_gather_dim0_nograd
        g = fn(kv.unsqueeze(0), self.cp_group)  # [cp, 2, b, n, h, d]
        return g.permute(1, 2, 0, 3, 4, 5).reshape(two, b, -1, h, d)

    def forward(self, q, k, v, *, kv: LayerKV | None = None, attn_mask=None):
        """q, k, v: [b, F*T/cp, h/TP, d] -> [b, F*T/cp, h/TP, d]."""
        _no_mask(attn_mask)
        ctx = None
        if kv is not None:
            ctx = kv.read(q)  # this rank's token shard of the view's frames (read before write)
            kv.write(k, v)  # this rank's token shard of the current frames
        cur = torch.stack([k, v])  # [2, b, L, h, d]
        needs_grad = torch.is_grad_enabled() and cur.requires_grad
        if ctx is None:
            kv_all = self._gather_tokens(cur, needs_grad)
        elif not uses_replay_kernel(q, k, v):  # one collective for context + current
            kv_all = self._gather_tokens(torch.cat([torch.stack(ctx).to(cur.dtype), cur], 2), False)
        else:  # gradient of the current K/V returns to its owning rank (reduce-scatter); none for the cache
            c_all = self._gather_tokens(torch.stack(ctx).to(cur.dtype), False)
            n_all = self._gather_tokens(cur, needs_grad)
            return cached_attention(q, n_all[0], n_all[1], c_all[0], c_all[1], fused=self.split_attention)
        return sdpa(q, kv_all[0], kv_all[1])


def context_parallel_spec(kind: CPAttention) -> CausalWanSubmodules:
    """The CP layer spec: the local spec's blocks with the ``kind`` attention core (``ulysses`` or ``allgather``,
    as :func:`~kvpo_megatron.parallel.layout.check_heads` resolved it) and the CP token plan. (The TE spec builds
    its CP variant from the same pieces: ``model/te_spec.py``.)"""
    core = {CPAttention.ulysses: UlyssesCachedAttention, CPAttention.allgather: AllGatherCachedAttention}[kind]
    return CausalWanSubmodules(block=block_spec(core_attention=core), token_sharder=CPTokenSharding)


def distributed_frame_gather(cache: KVCache, layer: int, slots: torch.Tensor, cp_group):
    """Full-token K/V of the frames in ``slots`` from a token-sharded (all-gather layout) cache.

    Every CP rank gathers its shard of the same frames (identical ``slots``), then the shards are
    all-gathered and put back in frame-major token order. Returns ``[b, n*T, h/TP, d]`` each (None if
    ``slots`` is empty); under Ulysses the local ``cache.gather`` already returns whole frames.
    """
    got = cache.gather(layer, slots)
    if got is None:
        return None
    cp = group_size(cp_group)
    n = slots.shape[-1]
    kv = torch.stack(got)  # [2, b, n*Tl, h, d]
    two, b, ntl, h, d = kv.shape
    g = all_gather_dim0_nograd(kv.unsqueeze(0), cp_group)  # [cp, 2, b, n*Tl, h, d]
    g = g.reshape(cp, two, b, n, ntl // n, h, d).permute(1, 2, 3, 0, 4, 5, 6).reshape(two, b, cp * ntl, h, d)
    return g[0], g[1]
