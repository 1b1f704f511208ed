"""MemFlow's per-layer memory bank: long-range frames kept by their relevance to the prompt.

What an entry is
----------------
The K/V of one latent frame, *after RoPE at its absolute position*: the first frame of a block, copied from
the clean commit pass (t = 0) into bank slots of the same per-layer buffers as the cache (see
``KVCache`` "Memory bank"), so it survives the frame's eviction from the ring history. No parameters.

Rules (``MemoryBankConfig``; block ``b`` starts at frame ``s = b * frames_per_block``; ``r = record_interval``)
-------------------------------------------------------------------------------------------------------------
1. Record (``schedule``), on the commit of block ``b``; recomputations of earlier blocks (LongLive's recache at a
   prompt switch) never record:

   * ``release`` (default; MemFlow's released inference, ``wan/modules/causal_model.py`` at KlingTeam/MemFlow
     7ed5147: ``current_end_bank``, ``_apply_cache_updates_before``, ``compress_kv_bank``): *every* commit
     records frame ``s``. While ``b // r < bank_size`` the frame goes to entry ``b // r``, replacing the frame an
     earlier block of the same group put there; after that every commit compresses (rule 2). Sink frames count
     (block 0 puts frame 0 in entry 0 until block 1 replaces it). With the defaults (3 frames per block, r = 3,
     bank 3) the bank after blocks 0..8 holds [0], [3], [6], [6 9], [6 12], [6 15], [6 15 18], [6 15 21],
     [6 15 24], and from block 9 on two kept entries plus the newest block's first frame.
   * ``interval``: block ``b`` records iff ``b % r == 0`` and ``s >= num_sink_frames`` (frames 9, 18, 27, ...
     after blocks 3, 6, 9, ... with the defaults); a full bank compresses.
2. Compress: the old entries are scored against the prompt of the block being committed and the top
   ``bank_size - 1`` are kept (ties: the older entry) plus the new frame, which is always kept. Entries stay in
   frame order (the release orders them by score; attention does not depend on the order). Each layer (and each
   sample) decides on its own. ``mask_padding`` (default off, as released: MemFlow scores its whole 512-position
   cross-attention cache) leaves padded text positions out of the scores.
3. Attend: every forward (solver steps, commit, CHR-routed steps, KVPO replay) attends
   ``[sink ; bank ; local window]``. Bank entries are never routed; they are not in the ring's frame table,
   so CHR's routable set never contains them.
4. Prompt switch: the bank is kept. Scoring uses the text K of the prompt passed to the commit (the new
   prompt from the switch block on), which the caller encoded before; an empty prompt (every text
   position masked) or an all-zero text K raises instead of scoring.
5. Sparse memory activation (``sma``, default off): the sink and bank frames of a view are candidates; each
   forward of each layer scores candidate ``j`` by ``mean_t q[t] . mean_u k_j[u] / sqrt(head_dim)`` summed over
   heads (``q``: the current tokens' queries after RoPE; ``k_j``: the candidate's cached keys) and attends
   only the ``sma_top_k`` best (ties: the older slot; all of them when there are no more than ``sma_top_k``),
   in view order, followed by the local window. The choice differs per layer, per sample, per solver step,
   and is not differentiated (an index). Sharded caches complete the means and head sums through the same
   :class:`ScoreReduction`; its results are bitwise identical on every rank, so every rank picks the same
   frames without a broadcast. (MemFlow's released ``dynamic_topk_routing_attention`` picks per head and
   without the scale; its released configs leave it off, as the ``memflow-1.3b`` preset does.)

Score of entry ``i`` (per layer, per sample); ``z[l,h,t] = <k_text[l,h], k_i[t,h]> / sqrt(head_dim)`` over
the text positions ``l`` (the valid ones under ``mask_padding``), heads ``h`` and the entry's tokens ``t``:

* ``dot`` (as released): ``s_i = mean_{l,h,t} z[l,h,t]``;
* ``softmax`` (attention-normalised over the entry's tokens): the uniform mean over ``t`` is replaced by the
  attention weights of the text query over the entry's tokens, ``s_i = mean_{l,h} sum_t softmax_t(z)[l,h,t]
  * z[l,h,t]``. (Averaging the normalised weights themselves would give 1/T for every entry.)

Sharded caches (TP heads; CP heads under Ulysses, tokens under the K/V all-gather) compute partial sums and
complete them through an injected :class:`ScoreReduction` built by ``parallel/bank_reduction.py``; this file
holds no process-group code. The kept indices go through ``ScoreReduction.agree`` so every rank of a
model-parallel group keeps the same entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Callable

import torch

from kvpo_megatron.errors import ConfigError

if TYPE_CHECKING:
    from kvpo_megatron.model.attention import TextKV
    from kvpo_megatron.model.kv_cache import KVCache


class BankScore(StrEnum):
    """How an entry's relevance to the prompt is computed (module docstring)."""

    dot = "dot"  # mean of the scaled text-key / entry-key dot products (MemFlow's release)
    softmax = "softmax"  # attention-weighted mean over the entry's tokens (MemFlow's paper)


class BankSchedule(StrEnum):
    """Which commits record a bank entry (module docstring, rule 1)."""

    release = "release"  # MemFlow's released inference: every commit; entry b // r until full, then compress
    interval = "interval"  # every record_interval-th block (sink frames excepted)


@dataclass(kw_only=True, slots=True)
class MemoryBankConfig:
    """MemFlow memory bank (``cache.memory_bank``; None = no bank, LongLive)."""

    bank_size: int = 3
    """Entries per layer (the attended span grows by this many frames)."""
    record_interval: int = 3
    """Blocks per bank entry: ``release``: blocks ``b`` with the same ``b // record_interval`` share an entry while
    the bank fills; ``interval``: a block whose index is a multiple of this records (sink frames excepted)."""
    schedule: BankSchedule = BankSchedule.release
    """``release`` (MemFlow's released inference) or ``interval`` (rule 1)."""
    bank_score: BankScore = BankScore.dot
    """Relevance score used to compress a full bank: ``dot`` or ``softmax``."""
    mask_padding: bool = False
    """Leave padded text positions out of the scores (MemFlow's release counts all of them)."""
    sma: bool = False
    """MemFlow's sparse memory activation: each forward of each layer attends only the ``sma_top_k`` sink/bank
    frames most relevant to its queries (rule 5); the local window is always attended."""
    sma_top_k: int = 3
    """Sink + bank frames kept by ``sma`` (with sink 3 and bank 3: half of the long-range frames)."""

    def __post_init__(self):
        for name, enum in (("bank_score", BankScore), ("schedule", BankSchedule)):
            try:
                setattr(self, name, enum(getattr(self, name)))
            except ValueError:
                raise ConfigError(f"cache.memory_bank.{name} must be one of {[e.value for e in enum]}, "
                                  f"got {getattr(self, name)!r}") from None
        if self.bank_size < 1:
            raise ConfigError(f"cache.memory_bank.bank_size must be >= 1, got {self.bank_size}")
        if self.record_interval < 1:
            raise ConfigError(f"cache.memory_bank.record_interval must be >= 1, got {self.record_interval}")
        if self.sma_top_k < 1:
            raise ConfigError(f"cache.memory_bank.sma_top_k must be >= 1, got {self.sma_top_k}")


# ---- sharded reductions (injected) --------------------------------------------------------------------------
def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _all_text_heads(text_k: torch.Tensor, heads: int) -> torch.Tensor:
    if text_k.shape[2] != heads:
        raise ConfigError(f"memory bank: the text keys have {text_k.shape[2]} heads but the cache holds {heads}; "
                          "a head-sharded cache needs the ScoreReduction of its layout "
                          "(parallel.bank_reduction.score_reduction_for(model))")
    return text_k


@dataclass(kw_only=True, frozen=True)
class ScoreReduction:
    """Completes partial bank scores across the ranks that shard the cache; identity in one process."""

    text_heads: Callable[[torch.Tensor, int], torch.Tensor] = _all_text_heads
    """(text K [b, Lt, H, d], heads of the cache) -> text K of exactly the cache's heads on this rank."""
    sum_tokens: Callable[[torch.Tensor], torch.Tensor] = _same
    """Sum over ranks holding other tokens of the same heads (CP under the K/V all-gather layout)."""
    max_tokens: Callable[[torch.Tensor], torch.Tensor] = _same
    """Max over those ranks."""
    sum_heads: Callable[[torch.Tensor], torch.Tensor] = _same
    """Sum over ranks holding other heads of the same tokens (TP; TP x CP under Ulysses)."""
    agree: Callable[[torch.Tensor], torch.Tensor] = _same
    """The first rank's copy of an integer decision tensor (identical decisions on every rank)."""


LOCAL = ScoreReduction()


# ---- scores --------------------------------------------------------------------------------------------------
def _valid(text_k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[b, Lt] float weights of the valid text positions; raises on an empty or zeroed prompt."""
    b, lt = text_k.shape[:2]
    m = torch.ones(b, lt, device=text_k.device) if mask is None else mask.to(text_k.device).float()
    if m.shape != (b, lt):
        raise ConfigError(f"TextKV.mask has shape {tuple(m.shape)}, expected [batch, text tokens] = {(b, lt)}")
    if bool((m.sum(1) == 0).any()):
        raise ConfigError("memory bank: a prompt has no valid text position (every token masked); "
                          "cannot score the bank against an empty prompt")
    if float((text_k.abs().amax((2, 3)) * m).amax()) == 0.0:
        raise ConfigError("memory bank: the prompt's text K is all zero (a reset or unfilled text cache); "
                          "encode the new prompt before its first commit")
    return m


def bank_scores(text_ks: list[torch.Tensor], mask: torch.Tensor | None, entry_ks: list[torch.Tensor],
                mode: BankScore, reduction: ScoreReduction = LOCAL) -> torch.Tensor:
    """Relevance of each entry to the prompt, for every layer: ``[L, b, n]`` (float32).

    Args:
        text_ks: per layer, the prompt's cross-attention keys ``[b, Lt, H, d]`` (this rank's TP heads).
        mask: ``[b, Lt]`` True at real text tokens (None = all real).
        entry_ks: per layer, the entries' keys as stored ``[b, n, T, h, d]`` (this rank's shard).
        mode: ``dot`` or ``softmax`` (module docstring).
        reduction: completes the partial sums when the cache is sharded over ranks.
    """
    _, _, t, h, d = entry_ks[0].shape
    kts = [reduction.text_heads(k, h).float() for k in text_ks]  # [b, Lt, h, d] each
    m = _valid(kts[0], mask)  # [b, Lt]
    for kt in kts[1:]:
        _valid(kt, mask)

    def logits(i: int) -> torch.Tensor:  # [b, Lt, h, n, T]
        return torch.einsum("blhd,bnthd->blhnt", kts[i], entry_ks[i].float()) / math.sqrt(d)

    if mode == BankScore.dot:  # sum_{l,h,t} <kt, ke> = sum_h <sum_l kt, sum_t ke>
        part = torch.stack([torch.einsum("blhd,bl,bnhd->bn", kt, m, ke.float().sum(2))
                            for kt, ke in zip(kts, entry_ks)]) / math.sqrt(d)  # [L, b, n]
        stats = reduction.sum_heads(reduction.sum_tokens(torch.cat([part.flatten(), part.new_tensor([h * t])])))
        total, count = stats[:-1].view_as(part), stats[-1]
    else:  # two passes over the logits so that only one layer's [b, Lt, h, n, T] lives at a time
        zmax = reduction.max_tokens(torch.stack([logits(i).amax(-1) for i in range(len(kts))]))  # [L, b, Lt, h, n]
        sums = []
        for i in range(len(kts)):
            z = logits(i)
            e = torch.exp(z - zmax[i][..., None])
            sums.append(torch.stack([e.sum(-1), (e * z).sum(-1)]))
        sums = reduction.sum_tokens(torch.stack(sums))  # [L, 2, b, Lt, h, n]
        weighted = torch.einsum("kblhn,bl->kbn", sums[:, 1] / sums[:, 0], m)  # sum over l, h of the weighted logit
        stats = reduction.sum_heads(torch.cat([weighted.flatten(), weighted.new_tensor([h])]))
        total, count = stats[:-1].view_as(weighted), stats[-1]
    return total / (count * m.sum(1)[None, :, None])


def sparse_select(q: torch.Tensor, cand_k: torch.Tensor, top_k: int,
                  reduction: ScoreReduction = LOCAL) -> torch.Tensor:
    """Rule 5: indices ``[b, top_k]`` (ascending) of the candidates to attend.

    Args:
        q: this rank's queries of the current forward ``[b, L, h, d]``.
        cand_k: the candidates' cached keys ``[b, c, T, h, d]`` (this rank's shard), ``c > top_k``.
    """
    with torch.no_grad():
        b, c, t, h, d = cand_k.shape
        one = q.new_ones((), dtype=torch.float32)  # counts on the device without a host copy (graph capture)
        sums = torch.cat([q.detach().float().sum(1).flatten(), cand_k.float().sum(2).flatten(),
                          torch.stack([one * q.shape[1], one * t])])
        sums = reduction.sum_tokens(sums)  # complete token sums under a token-sharded cache
        nq = b * h * d
        qm = sums[:nq].view(b, h, d) / sums[-2]
        km = sums[nq:-2].view(b, c, h, d) / sums[-1]
        part = torch.einsum("bhd,bchd->bc", qm, km) / math.sqrt(d)
        scores = reduction.sum_heads(part)  # heads held by other ranks
        return keep_indices(scores, top_k)


def keep_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` best entries along the last dim; ties keep the older entry."""
    order = torch.sort(-scores, dim=-1, stable=True).indices[..., :keep]
    return order.sort(-1).values


# ---- the bank's life cycle -----------------------------------------------------------------------------------
def records(cache_cfg, block: int) -> bool:
    """Whether the commit of ``block`` records a bank entry (rule 1)."""
    cfg = cache_cfg.memory_bank
    if cfg is None:
        return False
    if cfg.schedule == BankSchedule.release:
        return True
    return block % cfg.record_interval == 0 and block * cache_cfg.frames_per_block >= cache_cfg.num_sink_frames


def update_after_commit(cache: "KVCache", block: int, text: "TextKV") -> bool:
    """Rules 1-2 after the commit pass of ``block`` wrote its K/V; returns whether an entry was recorded.
    Scores are completed over the ranks sharding the cache by ``cache.reduction``."""
    reduction = cache.reduction
    if not records(cache.cfg, block):
        return False
    cfg = cache.cfg.memory_bank
    frame = block * cache.cfg.frames_per_block
    n, layers = cache.bank_len, range(cache.num_layers)
    b = cache.batch_size
    # the entry the new frame takes while the bank is not full (candidates: the n entries, then the new frame)
    entry = min(n, block // cfg.record_interval) if cfg.schedule == BankSchedule.release else n
    if entry < cfg.bank_size:  # fill (release: replace the group's previous frame when entry == n - 1)
        keep = torch.tensor(list(range(entry)) + [n]).expand(cache.num_layers, b, entry + 1)
    else:
        mask = text.mask if cfg.mask_padding else None
        scores = bank_scores([text.layers[i][0] for i in layers], mask, [cache.bank_kv(i)[0] for i in layers],
                             cfg.bank_score, reduction)  # [L, b, n]
        old = keep_indices(scores, cfg.bank_size - 1).cpu()
        keep = torch.cat([old, torch.full((*old.shape[:2], 1), n, dtype=old.dtype)], -1)
        keep = reduction.agree(keep)
    for i in layers:
        cache.set_bank(i, frame, keep[i])
    return True

