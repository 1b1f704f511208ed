"""Streaming KV cache: a frame table over logical *slots*, per-sample page tables, and a pool of K/V pages.

Layout
------
Logical slots (the same for every sample of a batch): the first ``num_sink_frames`` frames are pinned to slots
``0..S-1``; every later frame ``f`` lives in the ring slot ``S + (f - S) % history_frames`` and evicts the frame
``history_frames`` older than it. ``frame_of_slot`` says which frame each slot holds (residency, CHR's
routable set).

Physical pages (``model/kv_pages.py``): one page holds one frame's ``T`` tokens for this rank's ``h`` heads
(the cache never sees process groups: under TP/CP it stores the shard it is handed), per layer in one buffer
``[num_pages, T, h, d]``. ``page[s, slot]`` is the page holding sample ``s``'s copy of a slot. Keys are stored
after RoPE at their absolute frame positions, so any cached frame can be attended from anywhere.

Forked batches (KVPO: anchor + branches over one shared prefix)
---------------------------------------------------------------
:meth:`KVCache.fork` gives a batch of ``B`` samples that *read* the parent's pages for every frame resident at
the fork (stored once, whatever ``B``) and *write* new frames into private rings of ``private_frames`` pages
per sample (frame ``f`` -> private page ``f % private_frames``), copy-on-write by construction: the parent is
frozen and never changes, so it is the fork state that later forks (more branch chunks, the replay's context
rebuild) start from. A private ring must hold every post-fork frame that is still read (at least the local
window; CHR's window blocks read all frames generated since the pivot); reading a frame whose private page was
reused raises.

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
from kvpo_megatron.model.kv_pages import PagePool
from kvpo_megatron.model.memory_bank import LOCAL, MemoryBankConfig, ScoreReduction, sparse_select
from kvpo_megatron.model.multishot import MultiShotConfig, rope_frame_offset
from kvpo_megatron.model.multishot import default_read_frames as multishot_read_frames


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
    shot_sinks: bool = False
    """LongLive 2.0's multi-shot sinks (``model/multishot.py``): the first block of every shot (a prompt switch marked
    ``shot_boundary``) is pinned after its commit and attended as a second sink once it leaves the recent window;
    RoPE positions advance by ``shot_rope_offset`` per shot. Needs ``num_sink_frames == frames_per_block``."""
    shot_rope_offset: int = 8
    """Temporal RoPE positions added per shot boundary (``multi_shot_rope_offset``)."""

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
        if self.shot_sinks and self.num_sink_frames != self.frames_per_block:
            raise ConfigError(f"cache.shot_sinks needs num_sink_frames ({self.num_sink_frames}) == frames_per_block "
                              f"({self.frames_per_block}): the global and every shot sink are one block")
        if self.shot_sinks and self.memory_bank is not None:
            raise ConfigError("cache.shot_sinks and cache.memory_bank cannot be combined")

    @property
    def shot_pins(self) -> int:
        """Logical slots reserved for the pinned shot sink (one block with ``shot_sinks``, else none)."""
        return self.frames_per_block if self.shot_sinks else 0

    def multishot(self):
        """This layout as ``model.multishot.MultiShotConfig`` (``shot_sinks`` only)."""
        return MultiShotConfig(frames_per_block=self.frames_per_block,
                               attended_frames=self.num_sink_frames + self.local_attn_frames,
                               rope_shot_offset=self.shot_rope_offset)

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
    """[b, n] *pages* of ``read_frames`` (per sample; bank pages included), on the compute device."""
    write_frames: tuple[int, ...] = ()
    """Frames of the current input whose K/V are written (commit pass); empty otherwise."""
    write_slots: torch.Tensor | None = None
    """[b, F] pages receiving the current input's K/V."""
    bank_entries: int = 0
    """Memory-bank pages in ``read_slots``, right after the sink frames (frames differ per layer)."""
    sparse_candidates: int = 0
    """MemFlow's sparse memory activation: the leading slots (sink + bank) among which each layer attends only
    ``sparse_top_k``, chosen from its queries (``LayerKV.read(q)``); 0 = off or nothing to choose."""
    sparse_top_k: int = 0
    page_key: tuple = ()
    """The pages read, as host integers (a cheap identity of what the view reads)."""

    def for_samples(self, rows: list[int]) -> "AttentionView":
        """The read-only view of a batch made of the given samples (rows may repeat: one per replay tuple)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.read_slots.device)
        frames = self.read_frames
        if frames and isinstance(frames[0], tuple):
            frames = tuple(frames[r] for r in rows)
        return AttentionView(read_frames=frames, read_slots=self.read_slots.index_select(0, idx),
                             bank_entries=self.bank_entries, sparse_candidates=self.sparse_candidates,
                             sparse_top_k=self.sparse_top_k, page_key=(self.page_key, tuple(rows)))


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
        """The pages this layer reads: ``view.read_slots``, or [b, top_k + rest] under sparse activation."""
        view, rows = self.view, self.view.read_slots
        c = view.sparse_candidates
        if c == 0:
            return rows
        if q is None:
            raise ValueError("this view uses MemFlow's sparse memory activation (cache.memory_bank.sma) but the "
                             "attention core did not pass its queries to LayerKV.read(q)")
        cache = self.cache
        cand = rows[:, :c]
        keep = sparse_select(q, cache.pool.pages_kv(self.layer, cand)[0], view.sparse_top_k, cache.reduction)
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
    """A restorable copy of a cache's pages and tables."""

    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    frame_of_slot: list[int | None]
    page: torch.Tensor
    bank_frames: list[torch.Tensor | None]
    """Per layer, the memory bank's frames [b, n] (None: no entry)."""
    private: tuple | None = None
    pinned: dict = field(default_factory=dict)


class KVCache:
    """Frame table + page tables over a :class:`PagePool`. Nothing outside this class indexes its tensors."""

    def __init__(self, cfg: CacheConfig, num_layers: int, *, reduction: ScoreReduction = LOCAL, batch: int = 1,
                 spare_pages: int = 0, pool: PagePool | None = None):
        """A root cache of ``batch`` samples, each with its own pages for every slot and bank entry.

        ``reduction``: completes MemFlow's bank and sparse-activation scores over the ranks that shard this
        cache (``parallel.bank_reduction.score_reduction_for(model)``; the identity in one process).
        ``spare_pages``: extra pages in the pool for later forks (:meth:`fork_pages` tells how many).
        ``pool``: reuse this page pool (grown if too small; its pages are overwritten): keeps the buffers, and the
        CUDA graphs captured over them, across caches used one after the other.
        """
        self.cfg = cfg
        self.reduction = reduction
        self.sparse_log: list | None = None
        """Set to a list to record ``(layer, attended frames per sample)`` of every sparse read (tests)."""
        self.num_layers = num_layers
        self.num_slots = cfg.num_sink_frames + cfg.shot_pins + cfg.history_frames  # sink, shot pins, ring; then bank
        self.bank_size = 0 if cfg.memory_bank is None else cfg.memory_bank.bank_size
        self.batch = batch
        per = self.num_slots + self.bank_size
        if pool is not None and pool.num_layers == num_layers:
            pool.grow(batch * per + spare_pages)
            self.pool = pool
        else:
            self.pool = PagePool(num_layers, batch * per + spare_pages)
        self.page = torch.arange(batch * per, dtype=torch.long).view(batch, per)  # [b, slots + bank] (host)
        self.frame_of_slot: list[int | None] = [None] * self.num_slots
        self.bank_frames: list[torch.Tensor | None] = [None] * num_layers  # [b, n] long (host) per layer
        self.frozen = False
        self._private: tuple[torch.Tensor, int] | None = None  # (first private page per sample [b], ring size)
        self._occupant: list[int | None] = []  # frame in each private ring position (forked caches)
        self.shot_starts: list[int] = []
        """Shot boundaries of the video (``cfg.shot_sinks``; set by the streaming engine from its prompts)."""
        self.pinned: dict[int, int] = {}
        """Shot-sink frame -> its pinned slot (``cfg.shot_sinks``)."""

    # ---- frame table -------------------------------------------------------------------------
    def ring_slot(self, frame: int) -> int:
        """The slot a write of ``frame`` goes to: pinned sink slots, else the history ring."""
        s = self.cfg.num_sink_frames
        return frame if frame < s else s + self.cfg.shot_pins + (frame - s) % self.cfg.history_frames

    def slot_for(self, frame: int) -> int:
        """The slot ``frame`` is read from (a pinned shot-sink frame's pin, else :meth:`ring_slot`)."""
        return self.pinned.get(frame, self.ring_slot(frame))

    def _present(self, frame: int) -> bool:
        """A resident frame's pages still hold it (a private ring position may have been reused)."""
        if self._private is None or frame in self.pinned or self.page[0, self.slot_for(frame)] < self._private[0][0]:
            return True
        return self._occupant[frame % self._private[1]] == frame

    # ---- layout rules that depend on the video's shots ------------------------------------------
    def default_read_frames(self, start: int, num_frames: int | None = None) -> list[int]:
        """Unrouted context of a block starting at ``start`` (``CacheConfig.default_read_frames``; with shot sinks,
        ``model.multishot.default_read_frames`` over this video's shots)."""
        if not self.cfg.shot_sinks:
            return self.cfg.default_read_frames(start, num_frames)
        return multishot_read_frames(self.cfg.multishot(), self.shot_starts, start, num_frames)

    def rope_offset(self, start: int) -> int:
        """RoPE position of frame ``start`` (shifted per shot with shot sinks)."""
        if not self.cfg.shot_sinks:
            return start
        return rope_frame_offset(self.cfg.multishot(), self.shot_starts, start)

    def pin_shot_sink(self, frames: list[int]) -> None:
        """Pin the (just committed) first block of a shot as the shot sink: its K/V are copied into the pinned
        slots; the previous shot sink loses its pin and stays only while the ring still holds it."""
        if self.frozen:
            raise RuntimeError("this KV cache is frozen (it is the shared prefix of a fork); write into a fork")
        base = self.cfg.num_sink_frames
        for f in list(self.pinned):
            self.frame_of_slot[self.pinned.pop(f)] = None
        src = self.page[:, self._slots(frames)]
        slots = list(range(base, base + len(frames)))
        if self._private is not None:  # a fork pins into private pages (the parent's stay untouched)
            self.page[:, slots] = self._private[0][:, None] + self._private[1] + self.bank_size + torch.arange(len(frames))
        self.pool.copy_pages(src, self.page[:, slots])
        for f, slot in zip(frames, slots):
            self.pinned[int(f)] = slot
            self.frame_of_slot[slot] = int(f)

    def resident_frames(self) -> list[int]:
        return sorted(f for f in self.frame_of_slot if f is not None and self._present(f))

    def is_resident(self, frame: int) -> bool:
        return frame >= 0 and self.frame_of_slot[self.slot_for(frame)] == frame and self._present(frame)

    def _slots(self, frames) -> list[int]:
        missing = [f for f in frames if not self.is_resident(f)]
        if missing:
            raise KeyError(f"frames {missing} are not resident in the KV cache (resident: {self.resident_frames()})")
        return [self.slot_for(f) for f in frames]

    def _n_sink(self, frames) -> int:
        """Leading sink frames of a view's frame list."""
        return next((j for j, f in enumerate(frames) if f >= self.cfg.num_sink_frames), len(frames))

    def _read_pages(self, frames, n_bank: int, rows=None) -> torch.Tensor:
        """[b, n_bank + len(frames)] pages: sink frames, then ``n_bank`` bank entries, then the rest."""
        slots = self._slots(frames)
        n_sink = self._n_sink(frames)
        cols = slots[:n_sink] + list(range(self.num_slots, self.num_slots + n_bank)) + slots[n_sink:]
        page = self.page if rows is None else self.page[rows]
        return page[:, cols]

    def view(self, read_frames, write_frames=(), device=None, *, bank: bool = True) -> AttentionView:
        """Build a view. ``read_frames``: a list of frames, or one list per sample (all of equal length).
        ``bank``: also attend the memory bank's entries (after the sink frames), if there are any."""
        per_sample = len(read_frames) > 0 and isinstance(read_frames[0], (list, tuple))
        n_bank = self.bank_len if bank else 0
        if per_sample:  # one list per sample (a batch-1 cache serves any number of rows reading its pages)
            if len(read_frames) != self.batch and self.batch != 1 or len({len(fr) for fr in read_frames}) != 1:
                raise ValueError(f"per-sample views need {self.batch} lists of equal length, got "
                                 f"{[len(fr) for fr in read_frames]}")
            pages = torch.cat([self._read_pages(fr, n_bank, rows=[i if self.batch > 1 else 0])
                               for i, fr in enumerate(read_frames)])
            frames = tuple(tuple(int(f) for f in fr) for fr in read_frames)
        else:
            pages = self._read_pages(read_frames, n_bank)
            frames = tuple(int(f) for f in read_frames)
        write_pages = self._claim(write_frames) if write_frames else None
        mb = self.cfg.memory_bank
        n_cand = n_bank + self._n_sink(frames[0] if per_sample else frames)
        sparse = mb is not None and mb.sma and n_bank > 0 and n_cand > mb.sma_top_k
        dev = lambda t: t.to(device) if device is not None else t  # noqa: E731
        return AttentionView(read_frames=frames, read_slots=dev(pages), write_frames=tuple(int(f) for f in write_frames),
                             write_slots=None if write_pages is None else dev(write_pages), bank_entries=n_bank,
                             sparse_candidates=n_cand if sparse else 0, sparse_top_k=mb.sma_top_k if sparse else 0,
                             page_key=tuple(pages.flatten().tolist()))

    def _claim(self, frames) -> torch.Tensor:
        """Pages [b, F] that the next write of ``frames`` goes to; the frame table then names them."""
        if self.frozen:
            raise RuntimeError("this KV cache is frozen (it is the shared prefix of a fork); write into a fork")
        slots = [self.ring_slot(f) for f in frames]
        if self._private is not None:
            base, ring = self._private
            if len(set(f % ring for f in frames)) != len(frames):
                raise ValueError(f"frames {list(frames)} collide in a private ring of {ring} pages")
            for f, s in zip(frames, slots):
                self.page[:, s] = base + f % ring
                self._occupant[f % ring] = int(f)
        for f, s in zip(frames, slots):
            self.frame_of_slot[s] = int(f)
        return self.page[:, slots].clone()

    def attended_frames(self, layer: int, view: AttentionView) -> list[list[int]]:
        """Per sample, the frames a view makes ``layer`` read now (bank pages resolved for that layer; before
        sparse memory activation, which also depends on the queries: see ``sparse_log``)."""
        return self.frames_of(layer, view.read_slots)

    def frames_of(self, layer: int, pages: torch.Tensor) -> list[list[int]]:
        """Per sample, the frames held by ``pages`` ([b, n]) in ``layer``."""
        out = []
        for row, row_pages in enumerate(pages.tolist()):
            held = {int(self.page[row, s]): f for s, f in enumerate(self.frame_of_slot) if f is not None}
            for j in range(self.bank_len):
                held[int(self.page[row, self.num_slots + j])] = int(self.bank_frames[layer][row, j])
            out.append([held[p] for p in row_pages])
        return out

    def layer(self, i: int, view: AttentionView) -> LayerKV:
        return LayerKV(self, i, view)

    # ---- storage -----------------------------------------------------------------------------
    @property
    def k(self) -> list[torch.Tensor | None]:
        """Per layer, the page buffer ``[num_pages, T, h, d]`` (shared with forks)."""
        return self.pool.k

    @property
    def v(self) -> list[torch.Tensor | None]:
        return self.pool.v

    def store(self, layer: int, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pool.store(layer, pages, k, v)

    def gather(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K, V of ``pages`` ([b, n]) as [b, n*T, h, d]; None when nothing is read."""
        if pages.numel() == 0:
            return None
        return self.pool.gather(layer, pages)

    def frame_kv(self, layer: int, frames) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of resident ``frames`` as [b, n, T, h, d] (for inspection, MemFlow scoring, tests)."""
        return self.pool.pages_kv(layer, self.page[:, self._slots(frames)])

    def nbytes(self) -> int:
        return self.pool.nbytes()

    # ---- memory bank (policy in model/memory_bank.py) ---------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch

    @property
    def bank_len(self) -> int:
        """Entries in the bank (the same in every layer)."""
        return 0 if self.bank_frames[0] is None else self.bank_frames[0].shape[1]

    def _bank_pages(self, n: int) -> torch.Tensor:
        return self.page[:, self.num_slots:self.num_slots + n]

    def bank_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the bank's entries in ``layer``: [b, n, T, h, d] each."""
        return self.pool.pages_kv(layer, self._bank_pages(self.bank_len))

    def set_bank(self, layer: int, frame: int, keep: torch.Tensor) -> None:
        """Replace ``layer``'s bank by ``candidates[keep]`` per sample, where the candidates are the current entries
        followed by the resident ``frame``; ``keep`` [b, m] (m <= bank_size) indexes them."""
        if keep.shape[-1] > self.bank_size:
            raise ValueError(f"memory bank of layer {layer}: cannot keep {keep.shape[-1]} entries "
                             f"(bank_size {self.bank_size})")
        if self.frozen:
            raise RuntimeError("this KV cache is frozen (it is the shared prefix of a fork); write into a fork")
        n = 0 if self.bank_frames[layer] is None else self.bank_frames[layer].shape[1]
        b = self.batch
        cand = torch.cat([self._bank_pages(n), self.page[:, self._slots([frame])]], 1)  # [b, n+1]
        idx = keep.cpu().long().expand(b, -1)
        src = cand.gather(1, idx)  # [b, m] pages to copy from
        m = idx.shape[1]
        k, v = self.pool.k[layer], self.pool.v[layer]
        dst = self._bank_pages(m).reshape(-1).to(k.device)
        new_k, new_v = k.index_select(0, src.reshape(-1).to(k.device)), v.index_select(0, src.reshape(-1).to(k.device))
        k.index_copy_(0, dst, new_k)  # gathered first: a page may move within the bank
        v.index_copy_(0, dst, new_v)
        old = self.bank_frames[layer] if self.bank_frames[layer] is not None else torch.zeros(b, 0, dtype=torch.long)
        frames = torch.cat([old, torch.full((b, 1), int(frame), dtype=torch.long)], 1)
        self.bank_frames[layer] = frames.gather(1, idx)

    # ---- snapshot / restore / fork -------------------------------------------------------------
    def snapshot(self) -> CacheSnapshot:
        k, v = self.pool.clone_buffers()
        private = None if self._private is None else (self._private[0].clone(), self._private[1], list(self._occupant))
        return CacheSnapshot(k=k, v=v, frame_of_slot=list(self.frame_of_slot), page=self.page.clone(),
                             bank_frames=[None if t is None else t.clone() for t in self.bank_frames], private=private,
                             pinned=dict(self.pinned))

    def restore(self, snap: CacheSnapshot) -> None:
        """Copy a snapshot of this cache back in place (buffers keep their storage)."""
        self.pool.load_buffers(snap.k, snap.v)
        self.frame_of_slot = list(snap.frame_of_slot)
        self.page = snap.page.clone()
        self.batch = self.page.shape[0]
        self.bank_frames = [None if t is None else t.clone() for t in snap.bank_frames]
        self._private = None if snap.private is None else (snap.private[0].clone(), snap.private[1])
        self._occupant = [] if snap.private is None else list(snap.private[2])
        self.pinned = dict(snap.pinned)

    def fork_pages(self, batch: int, private_frames: int) -> int:
        """Pages a :meth:`fork` of ``batch`` samples with ``private_frames`` ring pages needs beyond this cache's."""
        return batch * (private_frames + self.bank_size + self.cfg.shot_pins)

    def fork(self, batch: int, private_frames: int, *, parent_sample: int = 0) -> "KVCache":
        """A batch of ``batch`` samples continuing from sample ``parent_sample`` of this cache (module doc).

        This cache becomes frozen (its pages are shared). The fork's private pages start right after this
        cache's own pages; the pool grows if it lacks them (which invalidates captured CUDA graphs). A second
        fork of the same cache reuses the same private pages: use one fork at a time.
        """
        if private_frames < self.cfg.local_attn_frames:
            raise ValueError(f"a fork's private ring ({private_frames} frames) must hold the local window "
                             f"({self.cfg.local_attn_frames} frames)")
        own_end = int(self.page.max()) + 1 if self._private is None else int(self._private[0].max()) + \
            self._private[1] + self.bank_size + self.cfg.shot_pins
        first = own_end
        self.pool.grow(first + self.fork_pages(batch, private_frames))
        self.frozen = True
        child = KVCache.__new__(KVCache)
        child.cfg, child.reduction, child.sparse_log = self.cfg, self.reduction, None
        child.num_layers, child.num_slots, child.bank_size = self.num_layers, self.num_slots, self.bank_size
        child.batch, child.pool, child.frozen = batch, self.pool, False
        child.frame_of_slot = list(self.frame_of_slot)
        stride = private_frames + self.bank_size + self.cfg.shot_pins
        base = first + stride * torch.arange(batch, dtype=torch.long)
        child._private, child._occupant = (base, private_frames), [None] * private_frames
        child.page = self.page[parent_sample:parent_sample + 1].expand(batch, -1).clone()
        if self.bank_size:
            child.page[:, self.num_slots:] = base[:, None] + private_frames + torch.arange(self.bank_size)
            n = self.bank_len
            if n:
                self.pool.copy_pages(self.page[parent_sample, self.num_slots:self.num_slots + n].expand(batch, -1),
                                     child.page[:, self.num_slots:self.num_slots + n])
        child.bank_frames = [None if t is None else t[parent_sample:parent_sample + 1].expand(batch, -1).clone()
                             for t in self.bank_frames]
        child.shot_starts, child.pinned = list(self.shot_starts), dict(self.pinned)
        return child
