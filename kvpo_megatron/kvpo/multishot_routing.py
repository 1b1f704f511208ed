"""Causal History Routing on LongLive 2.0's multi-shot cache layout (``model/multishot.py``; the table there maps
the paper's 3 sink + 9 local slots onto it).

For the block at ``s`` (``F`` frames, ``A`` attended frames, ``n_fix`` fixed recent slots including the block):

* sinks: ``multishot.sink_frames`` (global sink; plus the shot sink once merged) -- never routed;
* local slots: ``A - |sinks|`` (24, or 16 with a merged shot sink), of which the last ``n_fix`` stay: frames
  ``[s + F - n_fix, s)`` plus the block itself (with ``n_fix = F = 8``: only the block);
* routed slots: ``A - |sinks| - n_fix`` (16, or 8), filled per branch from

      R = { f resident : f not a sink of the block, f < s + F - n_fix }

  (resident = ``multishot.resident_frames``: the pinned sinks and the ring of ``history_frames``);
* routed view: ``sinks + sorted(routed) + fixed recent`` (+ the block's own tokens).

Branch sampling itself is the single-shot one (``kvpo/routing.py``) over this pool and slot count.
"""
from __future__ import annotations

from collections.abc import Sequence

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model.multishot import MultiShotConfig, sink_frames


def _check_fixed(cfg: MultiShotConfig, num_recent_fixed: int) -> None:
    if not cfg.frames_per_block <= num_recent_fixed <= cfg.attended_frames - 2 * cfg.frames_per_block:
        raise ConfigError(f"routing.num_recent_fixed ({num_recent_fixed}) must keep the current block "
                          f"({cfg.frames_per_block}) and leave room for the sinks: <= "
                          f"{cfg.attended_frames - 2 * cfg.frames_per_block}")


def fixed_recent_frames(cfg: MultiShotConfig, start: int, num_recent_fixed: int) -> list[int]:
    """Fixed slots before the block (empty when ``num_recent_fixed == frames_per_block``)."""
    _check_fixed(cfg, num_recent_fixed)
    return list(range(max(cfg.global_sink_frames, start + cfg.frames_per_block - num_recent_fixed), start))


def num_routed_slots(cfg: MultiShotConfig, shot_starts: Sequence[int], start: int, num_recent_fixed: int) -> int:
    """Routed slots of the block at ``start``: local slots ``A - |sinks|`` minus the fixed ones."""
    _check_fixed(cfg, num_recent_fixed)
    return cfg.attended_frames - len(sink_frames(cfg, shot_starts, start)) - num_recent_fixed


def routable_set(cfg: MultiShotConfig, shot_starts: Sequence[int], start: int, resident: Sequence[int],
                 num_recent_fixed: int) -> list[int]:
    """R for the block at ``start``: resident non-sink frames older than the fixed recent ones."""
    _check_fixed(cfg, num_recent_fixed)
    sinks = set(sink_frames(cfg, shot_starts, start))
    limit = min(start, start + cfg.frames_per_block - num_recent_fixed)
    return [f for f in sorted(resident) if f not in sinks and cfg.global_sink_frames <= f < limit]


def routed_read_frames(cfg: MultiShotConfig, shot_starts: Sequence[int], start: int, routed: Sequence[int],
                       num_recent_fixed: int) -> list[int]:
    """The attended cached frames of a routed block: sinks + routed (sorted) + fixed recent."""
    n = num_routed_slots(cfg, shot_starts, start, num_recent_fixed)
    if len(routed) > n:
        raise ConfigError(f"block at frame {start}: {len(routed)} routed frames for {n} routed slots")
    return sink_frames(cfg, shot_starts, start) + sorted(routed) + fixed_recent_frames(cfg, start, num_recent_fixed)
