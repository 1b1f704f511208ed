"""Streaming KV cache: per-layer K/V buffers over frame *slots* plus a frame table.

Layout
------
Per layer ``i``, ``k[i]`` and ``v[i]`` are preallocated tensors ``[b, num_slots, T, h, d]`` where a slot
holds one latent frame's ``T`` tokens for this rank's ``h`` heads (the cache never sees process groups:
under TP/CP it simply stores the shard it is handed). Keys are stored after RoPE at their absolute
frame positions, so any cached frame can be attended from anywhere.

Slots: the first ``num_sink_frames`` frames are pinned to slots ``0..S-1``; every later frame ``f`` lives in
the ring slot ``S + (f - S) % history_frames`` and evicts the frame ``history_frames`` older than it.

Memory bank (MemFlow, ``cfg.memory_bank``; see ``model/memory_bank.py`` for the rules)
------------------------------------------------------------------------------------------
The buffers hold ``bank_size`` extra slots after the ring (``[sink | ring | bank]``). Bank slot ``j`` of layer
``i`` holds, per sample, the frame ``bank_frames[i][b, j]``: a copy of a frame's committed K/V that outlives
the frame's eviction from the ring. Layers (and samples) keep different frames; the number of entries is
the same everywhere. Views place the bank right after the sink frames in ``read_slots``
(``[sink ; bank ; rest]``), so every attention core reads it through the same gather and the buffers'
version counter changes whenever the bank does. The bank is part of ``snapshot``/``restore``/``fork``.
With sparse memory activation (``memory_bank.sma``) a view marks its sink + bank slots as candidates and
``LayerKV.read(q)`` keeps the ``sma_top_k`` of them that the layer's queries pick (a per-sample gather).

Views
-----
Attention does not read "the cache"; it reads an :class:`AttentionView`: an ordered list of resident frames
(built by the caller: the default sink + local window, a CHR-routed window, a MemFlow bank, ...) and,
for a commit pass, the frames whose K/V the current forward writes. Building a view translates frames to
slots once per forward; each layer then does one ``index_select`` (or a batched gather for per-sample
views). Reads happen before writes within a layer, so a view may read a frame whose slot it overwrites.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model.memory_bank import LOCAL, MemoryBankConfig, ScoreReduction, sparse_select


@dataclass(kw_only=True, slots=True)
class CacheConfig:
    """Which frames are kept and which are attended."""

    frames_per_block: int = 3
    """Latent frames generated per block."""
    num_sink_frames: int = 3
    """First frames pinned forever (the sink)."""
    local_attn_frames: int = 9
    """Local window attended by a block, *including* the block itself (span = sink + local = 12)."""
    history_frames: int = 30
    """Resident non-sink frames (routable history for CHR); older frames are dropped."""
    memory_bank: MemoryBankConfig | None = None
    """MemFlow's per-layer memory bank (None: none, LongLive)."""

    def __post_init__(self):
        if self.frames_per_block < 1:
            raise ConfigError(f"cache.frames_per_block must be >= 1, got {self.frames_per_block}")
        if self.local_attn_frames < self.frames_per_block:
            raise ConfigError(f"cache.local_attn_frames ({self.local_attn_frames}) must be >= "
                              f"cache.frames_per_block ({self.frames_per_block})")
        if self.history_frames < self.local_attn_frames:
            raise ConfigError(f"cache.history_frames ({self.history_frames}) must be >= "
                              f"cache.local_attn_frames ({self.local_attn_frames})")
        if self.num_sink_frames < 0:
            raise ConfigError(f"cache.num_sink_frames must be >= 0, got {self.num_sink_frames}")

    def default_read_frames(self, start: int, num_frames: int | None = None) -> list[int]:
        """Unrouted context of a block starting at frame ``start``: sink + the local frames before it."""
        n = self.frames_per_block if num_frames is None else num_frames
        sink = list(range(min(self.num_sink_frames, start)))
        first_local = max(self.num_sink_frames, start - (self.local_attn_frames - n))
        return sink + list(range(first_local, start))


@dataclass(frozen=True)
class AttentionView:
    """What one forward attends to (besides its own tokens) and which frames it writes."""

    read_frames: tuple[int, ...] | tuple[tuple[int, ...], ...]
    """Cached frames attended, in order; per-sample tuples when samples differ."""
    read_slots: torch.Tensor
    """[n] or [b, n] slot indices of ``read_frames``."""
    write_frames: tuple[int, ...] = ()
    """Frames of the current input whose K/V are written (commit pass); empty otherwise."""
    write_slots: torch.Tensor | None = None
    """[F] slots receiving the current input's K/V."""
    bank_entries: int = 0
    """Memory-bank slots in ``read_slots``, right after the sink frames (frames differ per layer)."""
    sparse_candidates: int = 0
    """MemFlow's sparse memory activation: the leading slots (sink + bank) among which each layer attends only
    ``sparse_top_k``, chosen from its queries (``LayerKV.read(q)``); 0 = off or nothing to choose."""
    sparse_top_k: int = 0


class LayerKV:
    """One layer's access to the cache under a view (what the attention core receives)."""

    __slots__ = ("cache", "layer", "view")

    def __init__(self, cache: "KVCache", layer: int, view: AttentionView):
        self.cache, self.layer, self.view = cache, layer, view

    def read(self, q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached K, V of the view's frames: [b, n*T, h, d] each (None if the view reads nothing).

        ``q``: the current forward's queries as the core holds them ([b, L, h, d], this rank's shard). A view
        with sparse memory activation needs them: it reads only the chosen sink/bank frames
        (``memory_bank.sparse_select``) and then the rest of the view."""
        return self.cache.gather(self.layer, self.slots_for(q))

    def slots_for(self, q: torch.Tensor | None) -> torch.Tensor:
        """The slots this layer reads: ``view.read_slots``, or [b, top_k + rest] under sparse activation."""
        view, slots = self.view, self.view.read_slots
        c = view.sparse_candidates
        if c == 0:
            return slots
        if q is None:
            raise ValueError("this view uses MemFlow's sparse memory activation (cache.memory_bank.sma) but the "
                             "attention core did not pass its queries to LayerKV.read(q)")
        cache = self.cache
        slots = slots.to(cache.k[self.layer].device)
        rows = slots if slots.dim() == 2 else slots[None].expand(q.shape[0], -1)
        cand = rows[:, :c]
        b = torch.arange(rows.shape[0], device=rows.device)[:, None]
        keep = sparse_select(q, cache.k[self.layer][b, cand], view.sparse_top_k, cache.reduction)
        chosen = torch.cat([cand.gather(1, keep.to(cand.device)), rows[:, c:]], 1)
        if cache.sparse_log is not None:
            cache.sparse_log.append((self.layer, cache.frames_of(self.layer, chosen)))
        return chosen

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the current input's K/V ([b, F*T, h, d]) if the view commits."""
        if self.view.write_slots is not None:
            self.cache.store(self.layer, self.view.write_slots, k, v)


@dataclass
class CacheSnapshot:
    """A restorable copy of a cache's contents and frame table."""

    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    frame_of_slot: list[int | None]
    extra: dict = field(default_factory=dict)
    bank_frames: list[torch.Tensor | None] | None = None
    """Per layer, the memory bank's frames [b, n] (None: no bank)."""


class KVCache:
    """Frame-slot KV cache of all layers. Nothing outside this class indexes its tensors."""

    def __init__(self, cfg: CacheConfig, num_layers: int, *, reduction: ScoreReduction = LOCAL):
        """``reduction``: completes MemFlow's bank and sparse-activation scores over the ranks that shard this
        cache (``parallel.bank_reduction.score_reduction_for(model)``; the identity in one process)."""
        self.cfg = cfg
        self.reduction = reduction
        self.sparse_log: list | None = None
        """Set to a list to record ``(layer, attended frames per sample)`` of every sparse read (tests)."""
        self.num_layers = num_layers
        self.num_slots = cfg.num_sink_frames + cfg.history_frames  # frame table (sink + ring); bank slots follow
        self.bank_size = 0 if cfg.memory_bank is None else cfg.memory_bank.bank_size
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.frame_of_slot: list[int | None] = [None] * self.num_slots
        self.bank_frames: list[torch.Tensor | None] = [None] * num_layers  # [b, n] long (CPU) per layer

    # ---- frame table -------------------------------------------------------------------------
    def slot_for(self, frame: int) -> int:
        s = self.cfg.num_sink_frames
        return frame if frame < s else s + (frame - s) % self.cfg.history_frames

    def resident_frames(self) -> list[int]:
        return sorted(f for f in self.frame_of_slot if f is not None)

    def is_resident(self, frame: int) -> bool:
        return frame >= 0 and self.frame_of_slot[self.slot_for(frame)] == frame

    def _slots(self, frames) -> list[int]:
        missing = [f for f in frames if not self.is_resident(f)]
        if missing:
            raise KeyError(f"frames {missing} are not resident in the KV cache (resident: {self.resident_frames()})")
        return [self.slot_for(f) for f in frames]

    def view(self, read_frames, write_frames=(), device=None, *, bank: bool = True) -> AttentionView:
        """Build a view. ``read_frames``: a list of frames, or a list of per-sample lists of equal length.
        ``bank``: also attend the memory bank's entries (after the sink frames), if there are any."""
        per_sample = len(read_frames) > 0 and isinstance(read_frames[0], (list, tuple))
        n_bank = self.bank_len if bank else 0
        if per_sample:
            slots = torch.tensor([self._with_bank(fr, n_bank) for fr in read_frames], dtype=torch.long, device=device)
            frames = tuple(tuple(int(f) for f in fr) for fr in read_frames)
        else:
            slots = torch.tensor(self._with_bank(read_frames, n_bank), dtype=torch.long, device=device)
            frames = tuple(int(f) for f in read_frames)
        write_slots = None
        if write_frames:
            write_slots = torch.tensor([self.slot_for(f) for f in write_frames], dtype=torch.long, device=device)
            for f in write_frames:
                self.frame_of_slot[self.slot_for(f)] = int(f)
        mb = self.cfg.memory_bank
        n_cand = n_bank + self._n_sink(frames[0] if per_sample else frames)
        sparse = mb is not None and mb.sma and n_bank > 0 and n_cand > mb.sma_top_k
        return AttentionView(read_frames=frames, read_slots=slots, write_frames=tuple(int(f) for f in write_frames),
                             write_slots=write_slots, bank_entries=n_bank, sparse_candidates=n_cand if sparse else 0,
                             sparse_top_k=mb.sma_top_k if sparse else 0)

    def _n_sink(self, frames) -> int:
        """Leading sink frames of a view's frame list."""
        return next((j for j, f in enumerate(frames) if f >= self.cfg.num_sink_frames), len(frames))

    def _with_bank(self, frames, n_bank: int) -> list[int]:
        """Slots of ``frames`` with ``n_bank`` bank slots inserted after the leading sink frames."""
        slots = self._slots(frames)
        n_sink = self._n_sink(frames)
        return slots[:n_sink] + list(range(self.num_slots, self.num_slots + n_bank)) + slots[n_sink:]

    def attended_frames(self, layer: int, view: AttentionView) -> list[list[int]]:
        """Per sample, the frames a view makes ``layer`` read now (bank slots resolved for that layer; before
        sparse memory activation, which also depends on the queries: see ``sparse_log``)."""
        return self.frames_of(layer, view.read_slots)

    def frames_of(self, layer: int, slots: torch.Tensor) -> list[list[int]]:
        """Per sample, the frames held by ``slots`` ([n] or [b, n]) in ``layer``."""
        slots = slots if slots.dim() == 2 else slots[None].expand(self.batch_size, -1)
        out = []
        for row, row_slots in enumerate(slots.tolist()):
            out.append([self.frame_of_slot[s] if s < self.num_slots
                        else int(self.bank_frames[layer][row, s - self.num_slots]) for s in row_slots])
        return out

    def layer(self, i: int, view: AttentionView) -> LayerKV:
        return LayerKV(self, i, view)

    # ---- storage -----------------------------------------------------------------------------
    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        b, n_tok, h, d = k.shape
        t = n_tok // slots.numel()
        if self.k[layer] is None:
            shape = (b, self.num_slots + self.bank_size, t, h, d)
            self.k[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        slots = slots.to(k.device)
        self.k[layer].index_copy_(1, slots, k.detach().reshape(b, -1, t, h, d))
        self.v[layer].index_copy_(1, slots, v.detach().reshape(b, -1, t, h, d))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K, V of ``slots`` ([n] shared, or [b, n] per sample) as [b, n*T, h, d]."""
        if slots.numel() == 0:
            return None
        k, v = self.k[layer], self.v[layer]
        slots = slots.to(k.device)
        if slots.dim() == 1:
            kk, vv = k.index_select(1, slots), v.index_select(1, slots)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            kk, vv = k[rows, slots], v[rows, slots]
        return kk.flatten(1, 2), vv.flatten(1, 2)

    def frame_kv(self, layer: int, frames) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of resident ``frames`` as [b, n, T, h, d] (for inspection, MemFlow scoring, tests)."""
        slots = torch.tensor(self._slots(frames), dtype=torch.long, device=self.k[layer].device)
        return self.k[layer].index_select(1, slots), self.v[layer].index_select(1, slots)

    # ---- memory bank (policy in model/memory_bank.py) ---------------------------------------------
    @property
    def batch_size(self) -> int:
        return next((t.shape[0] for t in self.k if t is not None), 1)

    @property
    def bank_len(self) -> int:
        """Entries in the bank (the same in every layer)."""
        return 0 if self.bank_frames[0] is None else self.bank_frames[0].shape[1]

    def bank_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the bank's entries in ``layer``: [b, n, T, h, d] each."""
        sl = slice(self.num_slots, self.num_slots + self.bank_len)
        return self.k[layer][:, sl], self.v[layer][:, sl]

    def set_bank(self, layer: int, frame: int, keep: torch.Tensor) -> None:
        """Replace ``layer``'s bank by ``candidates[keep]`` per sample, where the candidates are the current entries
        followed by the resident ``frame``; ``keep`` [b, m] (m <= bank_size) indexes them."""
        if keep.shape[-1] > self.bank_size:
            raise ValueError(f"memory bank of layer {layer}: cannot keep {keep.shape[-1]} entries "
                             f"(bank_size {self.bank_size})")
        n = 0 if self.bank_frames[layer] is None else self.bank_frames[layer].shape[1]
        k, v = self.k[layer], self.v[layer]
        b = k.shape[0]
        cand = torch.tensor(list(range(self.num_slots, self.num_slots + n)) + self._slots([frame]), device=k.device)
        rows, idx = torch.arange(b, device=k.device)[:, None], keep.to(k.device).expand(b, -1)
        m = idx.shape[1]
        new_k, new_v = k.index_select(1, cand)[rows, idx], v.index_select(1, cand)[rows, idx]  # [b, m, T, h, d]
        k[:, self.num_slots:self.num_slots + m] = new_k
        v[:, self.num_slots:self.num_slots + m] = new_v
        old = self.bank_frames[layer] if self.bank_frames[layer] is not None else torch.zeros(b, 0, dtype=torch.long)
        frames = torch.cat([old, torch.full((b, 1), int(frame), dtype=torch.long)], 1)
        self.bank_frames[layer] = frames.gather(1, keep.cpu().long().expand(b, -1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    # ---- fork / restore ----------------------------------------------------------------------
    def snapshot(self) -> CacheSnapshot:
        clone = lambda ts: [None if t is None else t.clone() for t in ts]  # noqa: E731
        return CacheSnapshot(k=clone(self.k), v=clone(self.v), frame_of_slot=list(self.frame_of_slot),
                             bank_frames=clone(self.bank_frames))

    def restore(self, snap: CacheSnapshot) -> None:
        """Copy a snapshot back in place (buffers keep their storage)."""
        for dst, src in ((self.k, snap.k), (self.v, snap.v)):
            for i, t in enumerate(src):
                if t is None:
                    dst[i] = None
                elif dst[i] is None or dst[i].shape != t.shape:
                    dst[i] = t.clone()
                else:
                    dst[i].copy_(t)
        self.frame_of_slot = list(snap.frame_of_slot)
        frames = snap.bank_frames if snap.bank_frames is not None else [None] * self.num_layers
        self.bank_frames = [None if t is None else t.clone() for t in frames]

    def fork(self) -> "KVCache":
        """An independent copy (for a branch that writes its own frames)."""
        other = KVCache(self.cfg, self.num_layers, reduction=self.reduction)
        other.restore(self.snapshot())
        return other
