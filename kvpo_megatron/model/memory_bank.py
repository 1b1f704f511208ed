"""MemFlow's per-layer memory bank: long-range frames kept by their relevance to the prompt.

What an entry is
----------------
The K/V of one latent frame, *after RoPE at its absolute position*: the first frame of a block, copied from
the clean commit pass (t = 0) into bank slots of the same per-layer buffers as the cache (see
``KVCache`` "Memory bank"), so it survives the frame's eviction from the ring history. No parameters.

Rules (``MemoryBankConfig``; block ``b`` starts at frame ``s = b * frames_per_block``)
-------------------------------------------------------------------------------------
1. Record: the commit of block ``b`` records frame ``s`` iff ``b % record_interval == 0`` and ``s`` is not a
   sink frame (``s >= num_sink_frames``; a sink frame is attended anyway). With the defaults (sink 3,
   3 frames per block, interval 3) that is frames 9, 18, 27, ... after blocks 3, 6, 9, ...
   Recomputations of earlier blocks (LongLive's recache at a prompt switch) never record.
2. Compress: recording into a full bank (``bank_size`` entries) scores the old entries against the prompt
   of the block being committed, keeps the top ``bank_size - 1`` (ties: the older entry) plus the new frame,
   which is always kept. Entries stay in frame order. Each layer (and each sample) decides on its own.
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
   frames without a broadcast.

Score of entry ``i`` (per layer, per sample); ``z[l,h,t] = <k_text[l,h], k_i[t,h]> / sqrt(head_dim)`` over
valid (unpadded) text positions ``l``, heads ``h`` and the entry's tokens ``t``:

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


@dataclass(kw_only=True, slots=True)
class MemoryBankConfig:
    """MemFlow memory bank (``cache.memory_bank``; None = no bank, LongLive)."""

    bank_size: int = 3
    """Entries per layer (the attended span grows by this many frames)."""
    record_interval: int = 3
    """A block whose index is a multiple of this records its first frame (sink frames excepted)."""
    bank_score: BankScore = BankScore.dot
    """Relevance score used to compress a full bank: ``dot`` or ``softmax``."""
    sma: bool = False
    """MemFlow's sparse memory activation: each forward of each layer attends only the ``sma_top_k`` sink/bank
    frames most relevant to its queries (rule 5); the local window is always attended."""
    sma_top_k: int = 3
    """Sink + bank frames kept by ``sma`` (with sink 3 and bank 3: half of the long-range frames)."""

    def __post_init__(self):
        self.bank_score = BankScore(self.bank_score)
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
    return (cfg is not None and block % cfg.record_interval == 0
            and block * cache_cfg.frames_per_block >= cache_cfg.num_sink_frames)


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
    if n < cfg.bank_size:
        keep = torch.arange(n + 1).expand(cache.num_layers, b, n + 1)
    else:
        scores = bank_scores([text.layers[i][0] for i in layers], text.mask, [cache.bank_kv(i)[0] for i in layers],
                             cfg.bank_score, reduction)  # [L, b, n]
        old = keep_indices(scores, cfg.bank_size - 1).cpu()
        keep = torch.cat([old, torch.full((*old.shape[:2], 1), n, dtype=old.dtype)], -1)
        keep = reduction.agree(keep)
    for i in layers:
        cache.set_bank(i, frame, keep[i])
    return True


# ---- named generator presets ---------------------------------------------------------------------------------
GENERATOR_PRESETS: dict[str, dict] = {
    # LongLive: Wan2.1-1.3B, sink 3 + local 9 (span 12), 30 retained frames, recache at prompt switches.
    "longlive-1.3b": {
        "model": {"preset": "wan-1.3b"},
        "cache": {"frames_per_block": 3, "num_sink_frames": 3, "local_attn_frames": 9, "history_frames": 30,
                  "memory_bank": None},
        "routing": {"num_local_slots": 9, "num_recent_fixed": 3},
        "recache_on_switch": True,
    },
    # MemFlow: LongLive + a 3-entry bank recorded every 3 blocks (attended span up to 15 frames).
    "memflow-1.3b": {
        "model": {"preset": "wan-1.3b"},
        "cache": {"frames_per_block": 3, "num_sink_frames": 3, "local_attn_frames": 9, "history_frames": 30,
                  "memory_bank": {"bank_size": 3, "record_interval": 3, "bank_score": "dot", "sma": False,
                                  "sma_top_k": 3}},
        "routing": {"num_local_slots": 9, "num_recent_fixed": 3},
        "recache_on_switch": True,
    },
    # LongLive 2.0 (NVlabs/LongLive main, configs/inference.yaml; single-shot layout, multi-shot rules in
    # model/multishot.py): Wan2.2-TI2V-5B at 1280x704 (44 x 80 latents, 880 tokens per frame), blocks of 8 frames,
    # sink 8 + local 24 (span 32 = local_attn_size), no recache at prompt switches, 4-step UniPC at shift 5
    # (model timesteps 999, 937, 833, 624), clean commit pass; 128 latent frames (509 video frames at 24 fps).
    # CHR: the current block is fixed, 16 routed slots (model/multishot.py maps the paper's 3 + 9 slots).
    "longlive2-5b": {
        "model": {"preset": "wan2.2-5b"},
        "cache": {"frames_per_block": 8, "num_sink_frames": 8, "local_attn_frames": 24, "history_frames": 40,
                  "memory_bank": None, "shot_sinks": True, "shot_rope_offset": 8},
        "sampler": {"timesteps": [999.0, 749.25, 499.5, 249.75], "shift": 5.0, "kind": "unipc", "context_noise": 0.0},
        "video": {"num_frames": 128, "latent_height": 44, "latent_width": 80},
        "decoder": {"latent_channels": 48},
        "routing": {"num_local_slots": 24, "num_recent_fixed": 8},
        "recache_on_switch": False,
    },
}


def generator_preset(name: str, sections: set[str] | None = None) -> dict:
    """Config-tree values of a named generator (merge under a YAML/CLI tree, e.g. ``KVPOTrainConfig``);
    ``sections`` keeps only those top-level keys (``GenerateConfig`` has no ``routing``)."""
    import copy

    if name not in GENERATOR_PRESETS:
        raise ConfigError(f"unknown generator preset {name!r}; choose one of {sorted(GENERATOR_PRESETS)}")
    tree = copy.deepcopy(GENERATOR_PRESETS[name])
    return tree if sections is None else {k: v for k, v in tree.items() if k in sections}
