"""Wan self-attention (cached, RoPE, full-width q/k RMSNorm) and cross-attention (text K/V cached per prompt).

Which linears, norms and attention core are used is decided by the layer spec (``model/specs.py``):
the modules here only wire them. The attention *core* receives q, k, v for this rank's tokens/heads and
an optional :class:`~kvpo_megatron.model.kv_cache.LayerKV`; the local core below reads the cached frames,
writes the commit pass's K/V and runs SDPA. Context-parallel cores (``parallel/cp_attention.py``)
implement the same contract.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from kvpo_megatron.model.config import WanConfig
from kvpo_megatron.model.kv_cache import LayerKV
from kvpo_megatron.model.rope import apply_rope
from kvpo_megatron.model.split_attention import cached_attention


@dataclass
class AttentionSubmodules:
    linear_q: ModuleSpec | type
    linear_k: ModuleSpec | type
    linear_v: ModuleSpec | type
    linear_o: ModuleSpec | type
    q_norm: ModuleSpec | type
    k_norm: ModuleSpec | type
    core_attention: ModuleSpec | type


@dataclass
class TextKV:
    """Cross-attention K/V of one prompt for every layer: ``layers[i] = (k, v)``, each [b, Lt, h, d]."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor | None = None
    """[b, Lt] bool, True at real (unpadded) text tokens; None = all real. Cross-attention attends every
    position as Wan does; the mask only keeps padding out of MemFlow's bank scores (model/memory_bank.py)."""

    def expand(self, batch: int) -> "TextKV":
        """The same prompt for a batch of ``batch`` samples (views, no copy) when it was encoded for one."""
        have = self.layers[0][0].shape[0]
        if have == batch:
            return self
        if have != 1:
            raise ValueError(f"a prompt encoded for {have} samples cannot serve a batch of {batch}")
        ex = lambda t: t.expand(batch, *t.shape[1:])  # noqa: E731
        return TextKV(layers=[(ex(k), ex(v)) for k, v in self.layers],
                      mask=None if self.mask is None else ex(self.mask))


_REPLAY_KERNEL = threading.local()


@contextmanager
def replay_attention():
    """Inside this region every cached self-attention core attends ``[cache; current]`` with
    :func:`~kvpo_megatron.model.split_attention.cached_attention` -- the kernel the replay's backward needs --
    also without autograd, so no-grad scores (KVPO's TVE_old) evaluate exactly the function the replay
    differentiates. Outside it, that kernel is used only when the current block needs gradients."""
    before = getattr(_REPLAY_KERNEL, "on", False)
    _REPLAY_KERNEL.on = True
    try:
        yield
    finally:
        _REPLAY_KERNEL.on = before


def replay_attention_active() -> bool:
    return getattr(_REPLAY_KERNEL, "on", False)


def uses_replay_kernel(*current: torch.Tensor) -> bool:
    """Whether a cached core attends with ``cached_attention`` (see :func:`replay_attention`)."""
    return getattr(_REPLAY_KERNEL, "on", False) or (
        torch.is_grad_enabled() and any(t.requires_grad for t in current))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[b, Lq, h, d] x [b, Lk, h, d] -> [b, Lq, h, d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


class CachedSDPA(nn.Module):
    """Local attention core: [cached frames of the view ; current tokens] with torch SDPA."""

    def __init__(self, config: WanConfig, pg_collection=None):
        super().__init__()
        self.split_attention = config.split_attention

    def forward(self, q, k, v, *, kv: LayerKV | None = None, attn_mask=None):
        if kv is not None:
            ctx = kv.read(q)  # read before write: a commit may overwrite a page this view reads
            kv.write(k, v)
            if ctx is not None:
                if attn_mask is not None:
                    raise ValueError("attn_mask is only supported without a KV cache (full-sequence mode)")
                ck, cv = ctx[0].to(k.dtype), ctx[1].to(v.dtype)
                if uses_replay_kernel(q, k, v):
                    return cached_attention(q, k, v, ck, cv, fused=self.split_attention)  # replay: no dK/dV for the detached cache
                k, v = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        return sdpa(q, k, v, attn_mask)


class TextSDPA(nn.Module):
    """Cross-attention core: queries of this rank against the prompt's K/V (no cache, no mask)."""

    def __init__(self, config: WanConfig, pg_collection=None):
        super().__init__()

    def forward(self, q, k, v):
        return sdpa(q, k, v)


def _linears(cfg: WanConfig, sub: AttentionSubmodules, tp_group, kv_in: int):
    d = cfg.hidden_size
    col = dict(config=cfg, init_method=cfg.init_method, bias=True, gather_output=False, tp_group=tp_group)
    q = build_module(sub.linear_q, d, d, **col)
    k = build_module(sub.linear_k, kv_in, d, **col)
    v = build_module(sub.linear_v, kv_in, d, **col)
    o = build_module(sub.linear_o, d, d, config=cfg, init_method=cfg.output_layer_init_method, bias=True,
                     input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
    return q, k, v, o


class _WanAttention(nn.Module):
    """q, k, v, o linears, full-width RMSNorm on q and k, and an attention core, all named by the spec."""

    def __init__(self, config: WanConfig, submodules: AttentionSubmodules, pg_collection=None):
        super().__init__()
        tp_group = getattr(pg_collection, "tp", None)
        self.q, self.k, self.v, self.o = _linears(config, submodules, tp_group, config.hidden_size)
        self.norm_q = build_module(submodules.q_norm, config.hidden_size, config.layernorm_epsilon, tp_group=tp_group)
        self.norm_k = build_module(submodules.k_norm, config.hidden_size, config.layernorm_epsilon, tp_group=tp_group)
        self.core = build_module(submodules.core_attention, config=config, pg_collection=pg_collection)
        self.head_dim = config.head_dim


class WanSelfAttention(_WanAttention):
    """q,k,v,o linears; RMSNorm over the full width on q and k; 3D RoPE; cached attention core."""

    def forward(self, x: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor], kv: LayerKV | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [b, L, dim] (this rank's tokens) -> [b, L, dim]."""
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)[0]).unflatten(-1, (-1, self.head_dim))  # [b, L, h_local, d]
        k = self.norm_k(self.k(x)[0]).unflatten(-1, (-1, self.head_dim))
        v = self.v(x)[0].unflatten(-1, (-1, self.head_dim))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.core(q, k, v, kv=kv, attn_mask=attn_mask)
        return self.o(out.flatten(2))[0]


class WanCrossAttention(_WanAttention):
    """Attention from the video tokens to the prompt's tokens; the prompt side is projected once."""

    def project_text(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text: [b, Lt, dim] (after the text embedding) -> (k, v) [b, Lt, h_local, d]."""
        k = self.norm_k(self.k(text)[0]).unflatten(-1, (-1, self.head_dim))
        v = self.v(text)[0].unflatten(-1, (-1, self.head_dim))
        return k, v

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.norm_q(self.q(x)[0]).unflatten(-1, (-1, self.head_dim))
        out = self.core(q, text_kv[0].to(q.dtype), text_kv[1].to(q.dtype))
        return self.o(out.flatten(2))[0]
