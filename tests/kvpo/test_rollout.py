"""CHR rollout and replay: attended frames, anchor == plain generation, routed steps, window, forward counts,
edge cases, and the coefficient replay gradient == direct autograd of the full loss."""
from __future__ import annotations

import pytest
import torch

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.kvpo import routing as chr
from kvpo_megatron.kvpo.config import ObjectiveConfig, RolloutConfig, RoutingConfig, split_evenly
from kvpo_megatron.kvpo.objective import gibbs_log_policy, kvpo_loss, tve_coefficients, tve_term
from kvpo_megatron.kvpo.replay import replay_gradients
from kvpo_megatron.kvpo.rollout import Rollout, encode_prompts
from kvpo_megatron.kvpo.types import PromptContext
from kvpo_megatron.model import CacheConfig
from kvpo_megatron.model.kv_cache import KVCache
from kvpo_megatron.sampling.streaming import active_at
from kvpo_megatron.sampling import FlowMatchSampler, PromptSwitch, SamplerConfig, StreamingGenerator
from tests.helpers import tiny_model

SHAPE = (1, 4, 24, 8, 8)  # 8 blocks of 3 frames


def _setup(pgs, routing=None, G=3, **cache_kw):
    model = tiny_model(pgs, init_method_std=0.1).eval()
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), CacheConfig(**cache_kw))
    ro = Rollout(gen, routing or RoutingConfig(window_blocks=2), RolloutConfig(num_branches=G), seed=3)
    ctx = [PromptContext(start_frame=0, context=torch.randn(1, 16, 32))]
    return model, gen, ro, ctx


class ViewSpy:
    """Records (read frames of each sample, write_frames) of every view built on any KV cache."""

    def __init__(self, monkeypatch):
        self.seen = []
        orig_view = KVCache.view

        def view(cache, read_frames, write_frames=(), device=None, **kw):
            per_sample = len(read_frames) > 0 and isinstance(read_frames[0], (list, tuple))
            for fr in (read_frames if per_sample else [read_frames]):
                self.seen.append((tuple(fr), tuple(write_frames)))
            return orig_view(cache, read_frames, write_frames, device, **kw)
        monkeypatch.setattr(KVCache, "view", view)


def test_routed_blocks_attend_sink_routed_and_fixed(pgs, monkeypatch):
    model, gen, ro, ctx = _setup(pgs)
    spy = ViewSpy(monkeypatch)
    grp = ro.run(ctx, SHAPE, iteration=0, prompt_index=0, pivot=5)
    assert grp.window == [5, 6]
    for br in grp.branches:
        for b, routed in br.routes.items():
            s = 3 * b
            assert len(routed) == 6 and len(set(routed)) == 6
            assert all(3 <= f < s for f in routed)  # never a sink frame, never the current block
            assert chr.routed_read_frames(ro.cache_cfg, ro.routing, s, routed) == [0, 1, 2] + routed
    used = {r for r, w in spy.seen if not w}
    for br in grp.branches:  # every branch's routed windows were really attended by forwards
        for b, routed in br.routes.items():
            assert tuple([0, 1, 2] + routed) in used
    # first half of 4 steps routed: the branch's tuples are steps 0 and 1 of each window block
    for br in grp.branches:
        assert sorted({(t.block, t.step) for t in br.tuples}) == [(5, 0), (5, 1), (6, 0), (6, 1)]
        assert br.commit_frames[5] == CacheConfig().default_read_frames(15)  # commit pass unrouted


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_anchor_is_plain_generation_and_prefix_computed_once(pgs, batch_size):
    """The anchor equals plain generation bit for bit whatever the batch layout (samples advance together, each
    reading the shared prefix's pages), and the prefix runs once."""
    model, gen, ro, ctx = _setup(pgs)
    ro.cfg.batch_size = batch_size
    n0, s0 = gen.forward_count, gen.sample_forwards
    grp = ro.run(ctx, SHAPE, iteration=1, prompt_index=2, pivot=4)
    n_steps, G, blocks = 4, 3, 8
    prefix = 4 * (n_steps + 1)
    rest = (blocks - 4) * (n_steps + 1) * (G + 1)
    scoring = 2 * G * 2 * 2  # (current + reference) x branches x window blocks x routed steps
    assert grp.sample_forwards == gen.sample_forwards - s0 == prefix + rest + scoring
    chunks = {None: [[-1, 0, 1, 2]], 1: [[-1], [0], [1], [2]], 3: [[-1, 0], [1, 2]]}[batch_size]  # even batches
    per_chunk = [(blocks - 4) * (n_steps + 1) + (2 * 2 if max(c) >= 0 else 0) for c in chunks]  # + scoring calls
    assert grp.forwards == gen.forward_count - n0 == prefix + sum(per_chunk)
    noise = ro.noise(SHAPE, iteration=1, prompt=2, branch=-1)
    with torch.no_grad():
        plain = gen.generate(noise, [PromptSwitch(0, model.encode_text(ctx[0].context))])
    assert torch.equal(plain, grp.anchor.latents)
    for br in grp.branches:  # shared prefix, divergence only from the pivot
        assert torch.equal(br.latents[:, :, :12], plain[:, :, :12])
        assert not torch.equal(br.latents[:, :, 12:], plain[:, :, 12:])


def test_split_evenly_fewest_batches_sizes_within_one():
    assert split_evenly(list(range(4)), 3) == [[0, 1], [2, 3]]
    assert split_evenly(list(range(9)), 8) == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert split_evenly(list(range(9)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert split_evenly(list(range(5)), 5) == [list(range(5))]
    assert split_evenly([], 3) == []
    for n in range(1, 12):
        for most in range(1, 12):
            got = split_evenly(list(range(n)), most)
            sizes = [len(c) for c in got]
            assert sum(got, []) == list(range(n)) and max(sizes) <= most and max(sizes) - min(sizes) <= 1
            assert len(got) == -(-n // most)


def test_renoise_shares_step_noise_and_identical_routes_give_identical_branches(pgs, monkeypatch):
    """Re-noising sampler: the keyed fresh noise of each (block, step) is shared by the anchor and every branch, so
    the anchor equals plain generation driven by the same keyed noise, and branches whose routes coincide are
    identical; with ``shared_step_noise`` off they differ."""
    model = tiny_model(pgs, init_method_std=0.1).eval()
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig(kind="renoise")), CacheConfig())
    ctx = [PromptContext(start_frame=0, context=torch.randn(1, 16, 32))]
    ro = Rollout(gen, RoutingConfig(window_blocks=2, sampler="dispersed"), RolloutConfig(num_branches=3), seed=3)
    same = chr.sample_routes  # every branch gets branch 0's routes
    monkeypatch.setattr(chr, "sample_routes", lambda *a, **k: [same(*a, **k)[0]] * k["num_branches"])
    grp = ro.run(ctx, SHAPE, iteration=1, prompt_index=2, pivot=4)
    noise = ro.noise(SHAPE, iteration=1, prompt=2, branch=-1)
    with torch.no_grad():
        plain = gen.generate(noise, [PromptSwitch(0, model.encode_text(ctx[0].context))],
                             step_noise=ro.step_noise(iteration=1, prompt=2))
    assert torch.equal(plain, grp.anchor.latents)
    b = grp.branches
    assert torch.equal(b[0].latents, b[1].latents) and torch.equal(b[1].latents, b[2].latents)
    assert not torch.equal(b[0].latents, plain)
    ro.cfg.shared_step_noise = False
    own = ro.run(ctx, SHAPE, iteration=1, prompt_index=2, pivot=4).branches
    assert torch.equal(own[0].latents[:, :, :12], b[0].latents[:, :, :12])
    assert not torch.equal(own[0].latents, own[1].latents)


def test_routing_steps_all_window_and_recent_fixed_4(pgs):
    routing = RoutingConfig(window_blocks=1, steps="all", num_recent_fixed=4)
    model, gen, ro, ctx = _setup(pgs, routing)
    grp = ro.run(ctx, SHAPE, iteration=0, prompt_index=0, pivot=6)
    for br in grp.branches:
        assert list(br.routes) == [6]
        assert sorted({t.step for t in br.tuples}) == [0, 1, 2, 3]
        routed = br.routes[6]
        assert len(routed) == 5 and all(3 <= f < 17 for f in routed)  # fixed: frame 17 + current block
        assert chr.routed_read_frames(ro.cache_cfg, routing, 18, routed) == [0, 1, 2, *routed, 17]


def test_routes_are_pure_functions_and_dispersed_overlap():
    cache, routing = CacheConfig(), RoutingConfig()
    resident = list(range(30))
    kw = dict(num_branches=4, seed=1, iteration=2, prompt=3, block=10)
    a = chr.sample_routes(cache, routing, 30, resident, **kw)
    assert a == chr.sample_routes(cache, routing, 30, resident, **kw)
    assert len({tuple(r) for r in a}) > 1
    assert a != chr.sample_routes(cache, routing, 30, resident, **{**kw, "iteration": 3})
    d = chr.sample_routes(cache, RoutingConfig(sampler="dispersed"), 30, resident, **kw)
    # 27 routable frames, 4 branches x 6: dispersed branches are pairwise disjoint
    assert all(not set(d[i]) & set(d[j]) for i in range(4) for j in range(i + 1, 4))


def test_edge_cases_small_and_empty_routable_set():
    cache, routing = CacheConfig(), RoutingConfig()
    small = chr.sample_routes(cache, routing, 9, list(range(9)), num_branches=2, seed=0, iteration=0, prompt=0, block=3)
    assert small == [[3, 4, 5, 6, 7, 8]] * 2  # |R| = 6 = routed slots: all of R
    tiny = chr.sample_routes(cache, routing, 6, list(range(6)), num_branches=1, seed=0, iteration=0, prompt=0, block=2)
    assert tiny == [[3, 4, 5]]  # |R| < routed slots: the whole of R, a shorter window
    with pytest.raises(ConfigError, match="routable set is empty"):
        chr.sample_routes(cache, routing, 3, list(range(3)), num_branches=1, seed=0, iteration=0, prompt=0, block=1)
    assert chr.pivot_range(cache, routing, 8) == (4, 7)  # first block with |R| > 6 starts at frame 12
    for it in range(20):
        assert 4 <= chr.sample_pivot(cache, routing, 8, seed=0, iteration=it, prompt=0) <= 7
    with pytest.raises(ConfigError, match="no block"):
        chr.pivot_range(cache, routing, 3)


def _direct_loss(gen, grp, adv, cfg):
    """The loss with every branch's graph alive (reference for the coefficient method): per branch, a batch-1
    fork of the prefix, each tuple replayed with grad, then the branch's stored block committed."""
    tves = []
    fpb = gen.cache_cfg.frames_per_block
    for br in grp.branches:
        cache = grp.fork_state.fork(1, grp.private_frames)
        tve = 0.0
        for b in grp.window:
            s = b * fpb
            with torch.no_grad():
                gen.enter_block(cache, br.latents, b, grp.prompts)
            for tup in (t for t in br.tuples if t.block == b):
                text = active_at(encode_prompts(gen.model, grp.contexts), tup.start).text
                view = cache.view(gen.cache_cfg.default_read_frames(s, fpb))
                v = gen.forward(tup.x, tup.timestep, s, text, cache, view)
                tve = tve + tve_term(tup.v_target, v).sum()
            with torch.no_grad():
                gen.commit_block(cache, br.latents[:, :, s:s + fpb], s, active_at(grp.prompts, s).text,
                                 read_frames=br.commit_frames[b])
        tves.append(tve)
    tve = torch.stack(tves)
    old = torch.tensor([b.tve_old for b in grp.branches])
    return kvpo_loss(tve, old, old, adv, cfg).total, tve


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_coefficient_replay_equals_direct_autograd_and_replays_rollout_tve(pgs, batch_size):
    model, gen, ro, ctx = _setup(pgs)
    grp = ro.run(ctx, SHAPE, iteration=0, prompt_index=0, pivot=5)
    cfg = ObjectiveConfig(tau=1e-4)
    adv = torch.tensor([1.0, 0.2, -1.0])
    params = [p for p in model.parameters()]
    loss, tve = _direct_loss(gen, grp, adv, cfg)
    assert torch.allclose(tve.double(), torch.tensor([b.tve_old for b in grp.branches], dtype=torch.float64),
                          rtol=1e-5)  # replay == rollout scores
    want = torch.autograd.grad(loss, params, allow_unused=True)
    old = torch.tensor([b.tve_old for b in grp.branches])
    coeffs, _ = tve_coefficients(old, old, old, adv, cfg)
    model.zero_grad()
    replay_gradients(gen, grp, coeffs, batch_size=batch_size)
    for p, w in zip(params, want):
        w = torch.zeros_like(p) if w is None else w
        g = torch.zeros_like(p) if p.grad is None else p.grad
        assert (g - w).norm() <= 1e-5 * (w.norm() + 1e-12), ((g - w).norm(), w.norm())
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0


def test_one_step_raises_pi_of_positive_branch(pgs):
    model, gen, ro, ctx = _setup(pgs)
    grp = ro.run(ctx, SHAPE, iteration=0, prompt_index=0, pivot=5)
    old = torch.tensor([b.tve_old for b in grp.branches])
    cfg = ObjectiveConfig(tau=float(old.max() - old.min()), beta=0.0)  # an unsaturated policy
    adv = torch.tensor([1.5, 0.0, -1.5])
    coeffs, _ = tve_coefficients(old, old, old, adv, cfg)
    model.zero_grad()
    replay_gradients(gen, grp, coeffs)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.step()
    with torch.no_grad():
        _, new = _direct_loss(gen, grp, adv, cfg)
    p_old, p_new = gibbs_log_policy(old, cfg.tau).exp(), gibbs_log_policy(new.float(), cfg.tau).exp()
    assert p_new[0] > p_old[0] and p_new[2] < p_old[2], (p_old, p_new)
