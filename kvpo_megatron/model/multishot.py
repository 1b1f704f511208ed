"""LongLive 2.0's multi-shot attention sinks, as pure functions of the shot schedule (frame indices only).

Facts (NVlabs/LongLive main: ``pipeline/causal_diffusion_inference.py``, ``wan_5b/modules/causal_model.py``
``CausalWanSelfAttention.forward``, ``configs/inference.yaml``): blocks of ``num_frame_per_block = 8`` latent
frames; a KV buffer of ``local_attn_size = 32`` frames that is also the attention span (``max_attention_size =
32 x 880`` tokens at 1280x704), current block included; ``sink_size = 8`` with ``multi_shot_sink: true``, which
also makes the first 8 frames a permanent *global* sink (``global_sink_size = sink_size``); a *shot boundary* is a
block whose prompt starts with ``"The scene transitions. "`` (``utils/dataset.py: DEFAULT_SCENE_CUT_PREFIX``) --
other prompt switches only change the cross-attention text (no KV recache in 2.0). After the commit pass of a
shot's first block, that block (``min(sink_size, 8)`` frames) is *pinned* as the shot sink; the buffer then rolls
around it until it reaches the front next to the global sink, from where it is kept (the previous shot sink loses
its pin and rolls out). RoPE: every shot boundary adds ``multi_shot_rope_offset = 8`` to the temporal position of
all later frames (``rope_temporal_offset = shot_index * phi``); keys are cached after RoPE.

The rules, in frames (``F`` = frames per block, ``G`` = global sink frames ``[0, G)``, ``A`` = attended frames
including the block itself, starts ``c_1 < c_2 < ...`` of shots 1, 2, ... (shot 0 starts at 0)):

* shot sink in effect for the block starting at ``s``: ``S(s) = [c, c + shot_sink_frames)`` where ``c`` is the
  start of the latest shot starting *strictly before* ``s`` (the block that opens a shot still uses the
  previous shot's sink; its own pin takes effect after its commit). For shot 0, ``S = [0, F)`` lies inside G.
* the shot sink is *merged* (attended as a sink) once it is older than the recent window of ``A - G`` frames
  ending with the block: ``c < s + F - (A - G)``; before that it is an ordinary local frame.
* sinks of block ``s``: ``G`` (clipped to frames before ``s``), plus ``S(s)`` when merged.
* unrouted view (:func:`default_read_frames`): sinks + the ``A - |sinks| - F`` most recent non-sink frames before
  ``s``. Single shot: ``8 + 16`` cached frames; a merged shot sink: ``8 + 8 + 8``.
* RoPE position of frame ``f`` (:func:`rope_frame_offset` for a block): ``f + phi * (number of shot starts <= f)``.
* resident frames the cache must keep (:func:`pinned_frames`): ``G`` and ``S(s)`` while block ``s`` is processed,
  whatever the ring does; after a shot's first block is committed, the previous shot sink is no longer pinned and
  is evicted as soon as the ring (``history_frames`` most recent frames) no longer covers it. Nothing else changes.
  ``shot_clean_recache`` (off in the release configs) is not modelled.

KVPO on this layout (``kvpo/multishot_routing.py``): the paper's LongLive-1.3B layout (sink 3 frames = 1 block,
9 local slots = 3 blocks including the current one, last 3 slots = the current block fixed, 6 routed slots =
2 blocks' worth, span 12) maps block for block:

====================  ======================  ===============================================================
                      paper / LongLive-1.3B   LongLive 2.0 (5B, 1280x704, 880 tokens per frame)
====================  ======================  ===============================================================
block                 3 frames                8 frames
sink                  3 (first block)         8 global (first block) + 8 shot sink once merged
local slots (incl.    9 = 3 blocks            24 = 3 blocks (single shot / shot sink not merged yet);
current block)                                16 = 2 blocks while a merged shot sink takes 8 of the span
fixed recent          3 = current block       8 = current block (``num_recent_fixed = 8``)
routed slots          6                       16, or 8 while a shot sink is merged
routable set R        resident non-sink       resident frames older than the block, not in G, not the merged
                      frames older than the   shot sink; frames of earlier shots (and an unmerged or old shot
                      fixed ones              sink) are routable
attention span        12 frames               32 frames
====================  ======================  ===============================================================
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from kvpo_megatron.errors import ConfigError


SCENE_CUT_PREFIX = "The scene transitions. "
"""A prompt starting with this marks a shot boundary (LongLive 2.0's ``DEFAULT_SCENE_CUT_PREFIX``)."""


def is_scene_cut(prompt: str) -> bool:
    return prompt.startswith(SCENE_CUT_PREFIX)


@dataclass(kw_only=True, slots=True)
class MultiShotConfig:
    """LongLive 2.0's cache layout with multi-shot sinks (defaults: ``configs/inference.yaml``). The global sink
    and every shot sink are one block (``sink_size = num_frame_per_block = 8`` in the release), which is the only
    layout modelled here."""

    frames_per_block: int = 8
    """Latent frames per block (``num_frame_per_block``); also the global and the shot sink's length."""
    attended_frames: int = 32
    """Frames attended by a block, itself included (``local_attn_size``; the whole KV buffer upstream)."""
    rope_shot_offset: int = 8
    """Temporal RoPE positions added per shot boundary (``multi_shot_rope_offset``)."""

    def __post_init__(self):
        if self.frames_per_block < 1:
            raise ConfigError(f"multishot.frames_per_block must be >= 1, got {self.frames_per_block}")
        if self.rope_shot_offset < 0:
            raise ConfigError(f"multishot.rope_shot_offset must be >= 0, got {self.rope_shot_offset}")
        if self.attended_frames < 3 * self.frames_per_block:
            raise ConfigError(f"multishot.attended_frames ({self.attended_frames}) must hold the global sink, a shot "
                              f"sink and the block: >= 3 x frames_per_block = {3 * self.frames_per_block}")

    @property
    def global_sink_frames(self) -> int:
        return self.frames_per_block

    @property
    def shot_sink_frames(self) -> int:
        return self.frames_per_block


def check_shot_starts(cfg: MultiShotConfig, shot_starts: Sequence[int]) -> list[int]:
    """Shot boundaries as a validated sorted list: block aligned, > 0, strictly increasing."""
    starts = [int(c) for c in shot_starts]
    bad = [c for c in starts if c <= 0 or c % cfg.frames_per_block]
    if bad or any(a >= b for a, b in zip(starts, starts[1:])):
        raise ConfigError(f"shot starts must be increasing multiples of frames_per_block ({cfg.frames_per_block}) "
                          f"after frame 0, got {starts}")
    return starts


def shot_index(shot_starts: Sequence[int], frame: int) -> int:
    """The shot containing ``frame`` (0 before the first boundary)."""
    return bisect_right(shot_starts, frame)


def rope_frame_offset(cfg: MultiShotConfig, shot_starts: Sequence[int], start: int) -> int:
    """RoPE position of frame ``start`` (a block's first frame; all its frames are in one shot)."""
    return start + cfg.rope_shot_offset * shot_index(shot_starts, start)


def shot_sink(cfg: MultiShotConfig, shot_starts: Sequence[int], start: int) -> list[int]:
    """Frames of the shot sink in effect for the block at ``start`` (latest shot starting before ``start``)."""
    k = bisect_right(shot_starts, start - 1)
    c = 0 if k == 0 else shot_starts[k - 1]
    return list(range(c, min(c + cfg.shot_sink_frames, start)))


def _merged(cfg: MultiShotConfig, sink: list[int], start: int, num_frames: int) -> bool:
    recent_first = start + num_frames - (cfg.attended_frames - cfg.global_sink_frames)
    return bool(sink) and sink[0] >= cfg.global_sink_frames and sink[0] < recent_first


def sink_frames(cfg: MultiShotConfig, shot_starts: Sequence[int], start: int,
                num_frames: int | None = None) -> list[int]:
    """Frames the block at ``start`` attends as sinks: the global sink, plus the shot sink once merged."""
    n = cfg.frames_per_block if num_frames is None else num_frames
    glob = list(range(min(cfg.global_sink_frames, start)))
    sink = shot_sink(cfg, shot_starts, start)
    return glob + (sink if _merged(cfg, sink, start, n) else [])


def default_read_frames(cfg: MultiShotConfig, shot_starts: Sequence[int], start: int,
                        num_frames: int | None = None) -> list[int]:
    """Unrouted view of the block at ``start``: sinks + the most recent non-sink frames, ``attended_frames`` in all
    with the block (multi-shot counterpart of ``CacheConfig.default_read_frames``)."""
    n = cfg.frames_per_block if num_frames is None else num_frames
    sinks = sink_frames(cfg, shot_starts, start, n)
    first = max(cfg.global_sink_frames, start + n - (cfg.attended_frames - len(sinks)))
    return sinks + [f for f in range(first, start) if f not in sinks]


def pinned_frames(cfg: MultiShotConfig, shot_starts: Sequence[int], start: int) -> list[int]:
    """Frames the cache keeps resident (outside the ring) while the block at ``start`` is denoised and committed:
    the global sink and the shot sink in effect, merged or not."""
    glob = list(range(min(cfg.global_sink_frames, start)))
    return glob + [f for f in shot_sink(cfg, shot_starts, start) if f not in glob]


def resident_frames(cfg: MultiShotConfig, shot_starts: Sequence[int], start: int, history_frames: int) -> list[int]:
    """Frames resident when the block at ``start`` begins: its pinned frames and the ring of the
    ``history_frames`` most recent non-global-sink frames (the ring may also hold a pinned frame)."""
    ring = range(max(cfg.global_sink_frames, start - history_frames), start)
    return sorted(set(pinned_frames(cfg, shot_starts, start)) | set(ring))
