"""Causal History Routing (CHR): branch-specific local windows built from older cached frames.

For a block starting at frame ``s`` with ``F`` frames and a local window of ``L`` slots (which includes the
block itself), the unrouted context is ``sink + [s+F-L, s)``. Under CHR the last ``n_fix`` slots of the
window stay (frames ``[s+F-n_fix, s)`` before the block, plus the block itself), and the other ``L - n_fix``
slots are refilled, per branch, by sampling without replacement from the routable set

    R = { resident non-sink frames f : f < s + F - n_fix }   (older than the fixed ones).

The attended frames are ``[sink ; routed (sorted) ; fixed recent]`` (+ the block's own tokens).
Edge cases: ``|R| == 0`` raises; ``0 < |R| < L - n_fix`` routes all of ``R`` (a shorter window; every branch
then sees the same set). The default pivot range starts at the first block with ``|R| > L - n_fix`` so
branches can differ. Indices are a pure function of (seed, iteration, prompt, branch, block): every rank of
a model-parallel group routes identically without communication.
"""
from __future__ import annotations

import numpy as np

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.kvpo import multishot_routing as ms
from kvpo_megatron.kvpo.config import RoutedSteps, RoutingConfig, RoutingSampler
from kvpo_megatron.model.kv_cache import CacheConfig


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


def routed_slots(cache: CacheConfig, routing: RoutingConfig) -> int:
    """``L - n_fix``: slots of the local window that CHR refills (before shot-sink rules); ``ConfigError`` when the
    fixed slots do not fit the window."""
    if routing.num_recent_fixed > cache.local_attn_frames:
        raise ConfigError(f"routing.num_recent_fixed ({routing.num_recent_fixed}) must be <= cache.local_attn_frames "
                          f"({cache.local_attn_frames}), the routed window")
    return cache.local_attn_frames - routing.num_recent_fixed


def fixed_recent_frames(cache: CacheConfig, routing: RoutingConfig, start: int) -> list[int]:
    """Fixed slots before the current block (empty when n_fix == frames_per_block)."""
    end = start + cache.frames_per_block
    return list(range(max(cache.num_sink_frames, end - routing.num_recent_fixed), start))


def routable_set(cache: CacheConfig, routing: RoutingConfig, start: int, resident: list[int],
                 shots: list[int] = ()) -> list[int]:
    """R for a block starting at ``start``, given the frames resident in the cache (``shots``: the video's shot
    starts under ``cache.shot_sinks``, whose rules are in ``kvpo/multishot_routing.py``)."""
    if cache.shot_sinks:
        return ms.routable_set(cache.multishot(), shots, start, resident, routing.num_recent_fixed)
    limit = start + cache.frames_per_block - routing.num_recent_fixed
    return [f for f in resident if cache.num_sink_frames <= f < min(limit, start)]


def num_routed(cache: CacheConfig, routing: RoutingConfig, start: int, shots: list[int] = ()) -> int:
    """Routed slots of the block at ``start``."""
    if cache.shot_sinks:
        return ms.num_routed_slots(cache.multishot(), shots, start, routing.num_recent_fixed)
    return routed_slots(cache, routing)


def sample_routes(cache: CacheConfig, routing: RoutingConfig, start: int, resident: list[int], *, num_branches: int,
                  seed: int, iteration: int, prompt: int, block: int, shots: list[int] = ()) -> list[list[int]]:
    """Routed frames (sorted) of every branch for one block."""
    pool = routable_set(cache, routing, start, resident, shots)
    if not pool:
        raise ConfigError(f"CHR at block {block} (frame {start}): the routable set is empty "
                          "(pivot too early; raise routing.pivot_min_block)")
    k = min(num_routed(cache, routing, start, shots), len(pool))
    if routing.sampler == RoutingSampler.dispersed:
        perm = _rng(seed, iteration, prompt, block, 0xD15).permutation(pool)
        return [sorted(int(perm[(g * k + j) % len(pool)]) for j in range(k)) for g in range(num_branches)]
    return [sorted(int(f) for f in _rng(seed, iteration, prompt, block, g).choice(pool, size=k, replace=False))
            for g in range(num_branches)]


def routed_read_frames(cache: CacheConfig, routing: RoutingConfig, start: int, routed: list[int],
                       shots: list[int] = ()) -> list[int]:
    """The attended cached frames of a routed block: sink + routed + fixed recent."""
    if cache.shot_sinks:
        return ms.routed_read_frames(cache.multishot(), shots, start, routed, routing.num_recent_fixed)
    sink = list(range(min(cache.num_sink_frames, start)))
    return sink + list(routed) + fixed_recent_frames(cache, routing, start)


def is_routed_step(routing: RoutingConfig, step: int, num_steps: int) -> bool:
    if routing.steps == RoutedSteps.all:
        return True
    return step < max(1, num_steps // 2)


def pivot_range(cache: CacheConfig, routing: RoutingConfig, num_blocks: int) -> tuple[int, int]:
    """Allowed pivot blocks (inclusive)."""
    fpb, k = cache.frames_per_block, routed_slots(cache, routing)
    lo = routing.pivot_min_block
    if lo is None:
        lo = next((b for b in range(num_blocks) if len(routable_set(
            cache, routing, b * fpb, list(range(b * fpb)))) > k), None)
        if lo is None:
            raise ConfigError(f"no block of this {num_blocks}-block video has more than {k} routable "
                              "frames; make the video longer or set routing.pivot_min_block")
    hi = num_blocks - 1 if routing.pivot_max_block is None else routing.pivot_max_block
    if not 0 <= lo <= hi < num_blocks:
        raise ConfigError(f"pivot range [{lo}, {hi}] is empty or outside the video's {num_blocks} blocks")
    return lo, hi


def sample_pivot(cache: CacheConfig, routing: RoutingConfig, num_blocks: int, *, seed: int, iteration: int,
                 prompt: int) -> int:
    lo, hi = pivot_range(cache, routing, num_blocks)
    return int(_rng(seed, iteration, prompt, 0x9107).integers(lo, hi + 1))
