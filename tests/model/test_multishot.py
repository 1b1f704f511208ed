"""LongLive 2.0 multi-shot sinks (``model/multishot.py``) against a frame-level simulation of the upstream rolling
KV buffer, and CHR on that layout (``kvpo/multishot_routing.py``).

The simulation follows NVlabs/LongLive main ``CausalWanSelfAttention.forward`` (KV-cache branch) and
``CausalDiffusionInferencePipeline`` in frame units: a buffer of ``local_attn_size`` frames; a block's first forward
rolls it (keeping the leading ``effective_sink``: global + pinned when the pinned block sits right after the global
sink, else global; a floating pinned block shifts left with the roll) and appends the block; the attended keys are
the whole buffer (span = buffer size); after the commit of a shot's first block, that block is pinned.
"""
from __future__ import annotations

import random

import pytest

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.kvpo import multishot_routing as chr2
from kvpo_megatron.model import multishot as ms


def upstream_views(fpb: int, size: int, num_blocks: int, shot_starts: list[int]) -> dict[int, list[int]]:
    """Frames attended (besides the block itself) by each block, from the simulated upstream buffer."""
    sink = fpb  # sink_size = global_sink_size = one block; pinned length = min(sink_size, block)
    buf: list[int] = []
    pinned_start, pinned_len = -1, 0
    views = {}
    for b in range(num_blocks):
        s = b * fpb
        has_pinned = pinned_start >= 0 and pinned_len > 0
        if has_pinned and pinned_start == sink:
            eff = sink + pinned_len
        elif has_pinned:
            eff = sink
        else:
            eff = sink  # max(global_sink, sink_size)
        if len(buf) + fpb > size:  # roll: evict after the protected prefix
            evict = len(buf) + fpb - size
            buf = buf[:eff] + buf[eff + evict:]
            if has_pinned and pinned_start >= eff:
                pinned_start -= evict
        buf = buf + list(range(s, s + fpb))
        views[s] = sorted(buf[:-fpb])  # window_start = max(0, len - size) = 0: the whole buffer is attended
        if s in shot_starts:  # scene cut: pin this block after its commit pass
            pinned_start, pinned_len = len(buf) - fpb, min(sink, fpb)
    return views


@pytest.mark.parametrize("fpb,span", [(8, 32), (2, 8), (3, 12), (4, 20)])
def test_default_view_equals_upstream_rolling_buffer(fpb, span):
    cfg = ms.MultiShotConfig(frames_per_block=fpb, attended_frames=span)
    rng = random.Random(fpb * 100 + span)
    schedules = [[], [fpb], [2 * fpb], [3 * fpb, 4 * fpb], [5 * fpb, 13 * fpb, 14 * fpb, 20 * fpb]]
    schedules += [sorted(rng.sample(range(fpb, 30 * fpb, fpb), rng.randint(1, 8))) for _ in range(30)]
    for starts in schedules:
        want = upstream_views(fpb, span, 30, starts)
        for s, frames in want.items():
            got = ms.default_read_frames(cfg, starts, s)
            assert sorted(got) == frames, (fpb, span, starts, s, got, frames)
            assert len(got) == len(set(got)) <= span - fpb


def test_release_layout_rules():
    cfg = ms.MultiShotConfig()  # blocks of 8, span 32, phi 8
    starts = [40, 64]  # shots start at blocks 5 and 8
    assert ms.default_read_frames(cfg, [], 48) == list(range(8)) + list(range(32, 48))  # sink 8 + local 16
    # block 6 (frame 48): shot 1's sink (40..47) is the previous block: an ordinary local frame
    assert ms.sink_frames(cfg, starts, 48) == list(range(8))
    assert ms.default_read_frames(cfg, starts, 56) == list(range(8)) + list(range(40, 56))
    # block 8 opens shot 2 but still uses shot 1's sink, not yet merged (40 >= 64 + 8 - 24)
    assert ms.shot_sink(cfg, starts, 64) == list(range(40, 48))
    # block 10 (frame 80): shot 2's sink 64..71 is within the recent 24 frames (56..79): no merge
    assert ms.sink_frames(cfg, starts, 80) == list(range(8))
    # block 11 (frame 88): merged -> sinks 8 + 8, local 8 (the previous block)
    assert ms.sink_frames(cfg, starts, 88) == list(range(8)) + list(range(64, 72))
    assert ms.default_read_frames(cfg, starts, 88) == list(range(8)) + list(range(64, 72)) + list(range(80, 88))
    assert ms.pinned_frames(cfg, starts, 88) == list(range(8)) + list(range(64, 72))
    assert ms.pinned_frames(cfg, starts, 64) == list(range(8)) + list(range(40, 48))  # old sink until 64 commits
    # RoPE: +8 per shot boundary at or before the block
    assert [ms.rope_frame_offset(cfg, starts, s) for s in (0, 32, 40, 56, 64, 88)] == [0, 32, 48, 64, 80, 104]
    # a long shot keeps its sink resident beyond any ring
    res = ms.resident_frames(cfg, starts, 400, history_frames=24)
    assert res == list(range(8)) + list(range(64, 72)) + list(range(376, 400))


def test_views_are_resident_with_a_short_ring():
    cfg = ms.MultiShotConfig()
    for starts in ([], [40], [8, 16, 24], [24, 200, 208]):
        for s in range(0, 320, 8):
            res = set(ms.resident_frames(cfg, starts, s, history_frames=16))
            assert set(ms.default_read_frames(cfg, starts, s)) <= res, (starts, s)


def test_chr_on_multishot_layout():
    cfg = ms.MultiShotConfig()
    starts = [40]
    resident = ms.resident_frames(cfg, starts, 96, history_frames=40)  # 0..7, 40..47 (pinned), 56..95
    assert resident == list(range(8)) + list(range(40, 48)) + list(range(56, 96))
    # block 12 (frame 96): shot sink merged (40 < 96 + 8 - 24) -> 16 sink frames, 16 local slots, 8 routed
    assert chr2.num_routed_slots(cfg, starts, 96, num_recent_fixed=8) == 8
    pool = chr2.routable_set(cfg, starts, 96, resident, num_recent_fixed=8)
    assert pool == list(range(56, 96))  # neither the global sink nor the merged shot sink
    view = chr2.routed_read_frames(cfg, starts, 96, [60, 57, 90, 71, 66, 80, 59, 88], num_recent_fixed=8)
    assert view == list(range(8)) + list(range(40, 48)) + [57, 59, 60, 66, 71, 80, 88, 90]
    assert len(view) + 8 == cfg.attended_frames
    # single shot: 24 local slots, 16 routed; the unrouted view is the routed view with the 16 most recent frames
    assert chr2.num_routed_slots(cfg, [], 96, num_recent_fixed=8) == 16
    assert chr2.routed_read_frames(cfg, [], 96, list(range(80, 96)), 8) == ms.default_read_frames(cfg, [], 96)
    # with the shot sink not yet merged it is routable like any local frame
    assert 40 in chr2.routable_set(cfg, starts, 56, ms.resident_frames(cfg, starts, 56, 40), 8)
    assert chr2.fixed_recent_frames(cfg, 96, 16) == list(range(88, 96))
    with pytest.raises(ConfigError, match="routed frames for 8 routed slots"):
        chr2.routed_read_frames(cfg, starts, 96, list(range(56, 65)), 8)
    with pytest.raises(ConfigError, match="num_recent_fixed .* must keep the current block"):
        chr2.routable_set(cfg, starts, 96, resident, 4)


def test_bad_multishot_config():
    with pytest.raises(ConfigError, match="attended_frames .* >= 3 x frames_per_block = 24"):
        ms.MultiShotConfig(attended_frames=16)
    with pytest.raises(ConfigError, match="shot starts must be increasing multiples of frames_per_block"):
        ms.check_shot_starts(ms.MultiShotConfig(), [8, 12])
    with pytest.raises(ConfigError, match="shot starts must be increasing"):
        ms.check_shot_starts(ms.MultiShotConfig(), [16, 8])
    assert ms.check_shot_starts(ms.MultiShotConfig(), (8, 64)) == [8, 64]


# ---- the rules wired into the cache and the streaming engine ------------------------------------------------
@pytest.mark.parametrize("starts", [[], [12], [12, 27], [9, 21, 36]])
def test_engine_with_shot_sinks_attends_the_upstream_buffer(pgs, monkeypatch, starts):
    """A streaming video with shot sinks: every block attends exactly what the simulated upstream buffer holds,
    RoPE positions advance by the shot offset, and the pinned shot sink keeps its committed K/V after the ring
    has moved past it."""
    import torch

    from kvpo_megatron.model import CacheConfig, KVCache
    from kvpo_megatron.sampling import FlowMatchSampler, PromptSwitch, SamplerConfig, StreamingGenerator
    from tests.helpers import tiny_model

    model = tiny_model(pgs).eval()
    cc = CacheConfig(frames_per_block=3, num_sink_frames=3, local_attn_frames=9, history_frames=9, shot_sinks=True,
                     shot_rope_offset=5)
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig(timesteps=(1000.0, 500.0))), cc)
    nblocks = 15
    seen, offsets, orig_view, orig_fwd = [], [], KVCache.view, type(model).forward

    def view(cache, read_frames, write_frames=(), device=None, **kw):
        seen.append((list(read_frames), list(write_frames)))
        return orig_view(cache, read_frames, write_frames, device, **kw)

    def forward(m, x, t, **kw):
        offsets.append(kw["frame_offset"])
        return orig_fwd(m, x, t, **kw)
    monkeypatch.setattr(KVCache, "view", view)
    monkeypatch.setattr(type(model), "forward", forward)
    texts = [model.encode_text(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(i))) for i in range(4)]
    prompts = [PromptSwitch(0, texts[0])] + [PromptSwitch(s, texts[i + 1], True) for i, s in enumerate(starts)]
    cache = gen.new_cache()
    committed = {}
    with torch.no_grad():
        out = torch.empty(1, 4, 3 * nblocks, 8, 8)
        noise = torch.randn_like(out)
        for b in range(nblocks):
            gen.run(cache, out, noise, prompts, [b])
            committed.update({f: cache.frame_kv(0, [f])[0].clone() for f in range(3 * b, 3 * b + 3)})
            for f, slot in cache.pinned.items():  # a pinned frame holds exactly what its commit wrote
                assert torch.equal(cache.frame_kv(0, [f])[0], committed[f])
    want = upstream_views(3, 12, nblocks, starts)
    denoise = [r for r, w in seen if not w]  # one view per block (its solver steps share it)
    assert {3 * b: sorted(denoise[b]) for b in range(nblocks)} == want
    rope = offsets[::3]  # 2 steps + 1 commit per block
    assert rope == [3 * b + 5 * sum(s <= 3 * b for s in starts) for b in range(nblocks)]
    if starts:
        assert cache.pinned  # the last shot's first block is pinned


def test_kvpo_rollout_and_replay_across_a_shot_boundary(pgs):
    """CHR on the shot-sink layout: the anchor equals plain generation, routed views never route a sink, and the
    replay (forks of the frozen prefix, batched) recomputes the rollout's TVE_old."""
    import torch

    from kvpo_megatron.kvpo.config import RolloutConfig, RoutingConfig
    from kvpo_megatron.kvpo.replay import replay_gradients
    from kvpo_megatron.kvpo.rollout import Rollout
    from kvpo_megatron.kvpo.types import PromptContext
    from kvpo_megatron.model import CacheConfig
    from kvpo_megatron.sampling import FlowMatchSampler, PromptSwitch, SamplerConfig, StreamingGenerator
    from tests.helpers import tiny_model

    model = tiny_model(pgs, init_method_std=0.1).eval()
    cc = CacheConfig(frames_per_block=3, num_sink_frames=3, local_attn_frames=9, history_frames=12, shot_sinks=True)
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), cc)
    ro = Rollout(gen, RoutingConfig(window_blocks=3, num_recent_fixed=3),
                 RolloutConfig(num_branches=3), seed=4)
    g = torch.Generator().manual_seed(2)
    ctx = [PromptContext(start_frame=0, context=torch.randn(1, 16, 32, generator=g)),
           PromptContext(start_frame=15, context=torch.randn(1, 16, 32, generator=g), shot_boundary=True)]
    shape = (1, 4, 36, 8, 8)
    grp = ro.run(ctx, shape, iteration=0, prompt_index=0, pivot=5)  # window: blocks 5, 6, 7 (frames 15..23)
    assert grp.fork_state.shot_starts == [15]
    noise = ro.noise(shape, iteration=0, prompt=0, branch=-1)
    with torch.no_grad():
        plain = gen.generate(noise, [PromptSwitch(c.start_frame, model.encode_text(c.context), c.shot_boundary)
                                     for c in ctx])
    assert torch.equal(plain, grp.anchor.latents)
    for br in grp.branches:
        for b, routed in br.routes.items():  # never a sink of the block (global, or the merged shot sink)
            sinks = ms.sink_frames(cc.multishot(), [15], 3 * b)
            assert routed and not set(routed) & set(sinks) and all(3 <= f < 3 * b for f in routed)
    old = torch.tensor([b.tve_old for b in grp.branches], dtype=torch.float64)
    model.zero_grad()
    got = torch.tensor(replay_gradients(gen, grp, torch.tensor([1.0, -0.5, 0.25]), batch_size=2),
                       dtype=torch.float64)
    assert torch.allclose(got, old, rtol=1e-5) and (old > 0).all()
