"""Model FLOPs of the causal Wan DiT's forwards, for throughput and MFU reports (benchmarks, the trainer).

Per forward of ``b`` samples with ``L`` query tokens each:

* linears: ``2 * b * L * P`` with ``P`` the weights of every per-token linear of every block (self-attention
  q, k, v, o: ``4 d^2``; cross-attention q, o: ``2 d^2``; FFN ``2 d f``), plus the patch embedding
  (``C * prod(patch) * d``) and, when the head runs, the head (``d * C_out * prod(patch)``); unmerged LoRA adds
  its rank-r weights on the same linears;
* per-frame time embedding/projection: ``2 * b * F * (freq d + d^2 + 6 d^2)``;
* attention: ``4 * Lq * Lk * head_dim * heads`` (QK^T and PV, two flops per multiply-add) per sample and
  layer, self-attention with ``Lk`` = cached + current tokens, cross-attention with ``Lk = text_len``;
* not counted: cross-attention K/V (computed once per prompt), norms, RoPE, modulation and other element-wise
  work; biases. A commit pass (the cache write) is counted the same way without the head.
A replay forward + backward with LoRA-only weight gradients (:func:`replay_flops`) adds the base linears' data
gradient (1x their forward), LoRA's data and weight gradients (2x) and the attention backward (2x its forward).
The formula equals ``torch.utils.flop_counter`` on the tiny model (tests/benchmarks/test_bench.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardRecord:
    """Shape of one engine forward (what :func:`record_flops` needs)."""

    batch: int
    frames: int
    tokens_per_frame: int
    cached_frames: int
    head: bool
    grad: bool
    lora_rank: int
    """Rank of unmerged, active LoRA adapters computed in this forward (0 = none or merged)."""


def linear_params_per_token(cfg) -> int:
    """Weights of the per-token linears of all blocks (cross-attention K/V excluded)."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    return cfg.num_layers * (4 * d * d + 2 * d * d + 2 * d * f)


def lora_params_per_token(cfg, rank: int) -> int:
    """LoRA weights on every per-token block linear (q, k, v, o of self-attention; q, o of cross; FFN)."""
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    return cfg.num_layers * rank * (6 * 2 * d + 2 * (d + f))


def forward_flops(cfg, *, batch: int, frames: int, tokens_per_frame: int, cached_frames: int,
                  head: bool = True, lora_rank: int = 0) -> dict[str, float]:
    """FLOPs of one forward (module docstring). Returns {'linear', 'attention', 'total'}."""
    d, L = cfg.hidden_size, frames * tokens_per_frame
    patch = math.prod(cfg.patch_size)
    per_token = linear_params_per_token(cfg) + cfg.in_channels * patch * d
    if head:
        per_token += d * cfg.out_channels * patch
    if lora_rank:
        per_token += lora_params_per_token(cfg, lora_rank)
    linear = 2.0 * batch * L * per_token
    linear += 2.0 * batch * frames * (cfg.freq_dim * d + d * d + 6 * d * d)
    lk = (cached_frames + frames) * tokens_per_frame
    attn = 4.0 * batch * L * (lk + cfg.text_len) * d * cfg.num_layers
    return {"linear": linear, "attention": attn, "total": linear + attn}


def replay_flops(cfg, *, batch: int, frames: int, tokens_per_frame: int, cached_frames: int,
                 lora_rank: int) -> float:
    """Forward + backward of one block-step with LoRA-only weight gradients (model FLOPs)."""
    base = forward_flops(cfg, batch=batch, frames=frames, tokens_per_frame=tokens_per_frame,
                         cached_frames=cached_frames, head=True)
    lora = 2.0 * batch * frames * tokens_per_frame * lora_params_per_token(cfg, lora_rank)
    return 2 * base["linear"] + 3 * base["attention"] + 3 * lora


def record_flops(cfg, rec: ForwardRecord) -> float:
    """FLOPs of one recorded forward (+ its backward when it ran with gradients)."""
    kw = dict(batch=rec.batch, frames=rec.frames, tokens_per_frame=rec.tokens_per_frame,
              cached_frames=rec.cached_frames)
    if rec.grad:
        return replay_flops(cfg, lora_rank=rec.lora_rank, **kw)
    return forward_flops(cfg, head=rec.head, lora_rank=rec.lora_rank, **kw)["total"]
