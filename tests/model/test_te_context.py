"""The TE attention core's gathered-context buffer (``te_spec.TECachedAttention._with_context``).

The core keeps the [cached; current] K/V it gathered so that the next denoising step of the same block reuses it
without a gather. A commit writes the pages, after which no call can reuse it: the buffer must go then, or every
layer's copy stays allocated through the replay and the update (7.7 GB per GPU on Wan-14B at TP=2). TE is not
installed on the CPU, so the core is built without its TE kernel (``attn``); ``_with_context`` needs none."""
from __future__ import annotations

import torch
from torch import nn

from kvpo_megatron.model import CacheConfig, KVCache
from kvpo_megatron.model.te_spec import TECachedAttention


class ContextOnlyCore(TECachedAttention):
    """The TE core's context handling without its TE kernel."""

    def __init__(self):
        nn.Module.__init__(self)
        self._ctx_key = self._ctx_src = self._ctx = None


def _filled_cache(g):
    cache = KVCache(CacheConfig(), 1)
    for f in range(6):
        cache.layer(0, cache.view([], write_frames=[f])).write(torch.randn(1, 4, 2, 8, generator=g),
                                                              torch.randn(1, 4, 2, 8, generator=g))
    return cache


def test_context_reused_across_steps_and_freed_by_a_commit():
    g = torch.Generator().manual_seed(0)
    cache, core = _filled_cache(g), ContextOnlyCore()
    reads = cache.cfg.default_read_frames(6)
    q, k, v = (torch.randn(1, 12, 2, 8, generator=g) for _ in range(3))
    ck, cv = cache.layer(0, cache.view(reads)).read(q)

    step = cache.view(reads)  # a denoising step: reads, writes nothing
    k1, v1 = core._with_context(cache.layer(0, step), q, k, v)
    assert torch.equal(k1, torch.cat([ck, k], 1)) and torch.equal(v1, torch.cat([cv, v], 1))
    assert core._ctx is not None
    k2, _ = core._with_context(cache.layer(0, step), q, 2 * k, v)  # the next step: the same buffer, no new gather
    assert k2.data_ptr() == k1.data_ptr() and torch.equal(k2, torch.cat([ck, 2 * k], 1))

    commit = cache.view(reads, write_frames=[6, 7, 8])  # the commit reads the same frames, then writes its own
    k3, v3 = core._with_context(cache.layer(0, commit), q, k, v)
    assert torch.equal(k3, torch.cat([ck, k], 1)) and torch.equal(v3, torch.cat([cv, v], 1))
    assert core._ctx is None and core._ctx_key is None  # nothing kept after a write
    k4, _ = core._with_context(cache.layer(0, step), q, k, v)  # the next block gathers afresh
    assert torch.equal(k4, torch.cat([ck, k], 1)) and core._ctx is not None
