"""CausalWanDiT: parity with diffusers, streaming == block-causal full sequence, window roll, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model import CacheConfig, block_causal_mask, model_config
from kvpo_megatron.model.embeddings import sinusoidal_embedding
from kvpo_megatron.sampling import FlowMatchSampler, SamplerConfig, StreamingGenerator
from tests.helpers import tiny_diffusers, tiny_model


def test_bidirectional_parity_with_diffusers(pgs):
    ref = tiny_diffusers()
    from kvpo_megatron.checkpoint.mappings import convert_state_dict
    model = tiny_model(pgs, sd=convert_state_dict(ref.state_dict(), "diffusers", "ours"), sinusoid_fp64=False)
    x, ctx = torch.randn(2, 4, 6, 8, 8), torch.randn(2, 16, 32)
    t = torch.tensor([937.5, 250.0])
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = model(x, t, text=model.encode_text(ctx))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_wan_sinusoid_is_float64_formula():
    # Wan's sinusoidal_embedding_1d, written out: outer(t, 10000^(-arange(half)/half)) in float64, [cos, sin].
    t = torch.tensor([0.0, 250.0, 937.5])
    half = 16
    ang = torch.outer(t.double(), torch.pow(10000.0, -torch.arange(half, dtype=torch.float64).div(half)))
    want = torch.cat([ang.cos(), ang.sin()], 1).float()
    assert torch.allclose(sinusoidal_embedding(t, 32, fp64=True), want, atol=1e-6)
    assert (sinusoidal_embedding(t, 32, fp64=False) - want).abs().max() > 1e-7  # the two conventions differ


def _setup(pgs, frames=12):
    model = tiny_model(pgs).eval()
    ctx = torch.randn(1, 16, 32)
    return model, model.encode_text(ctx), torch.randn(1, 4, frames, 8, 8)


def test_streaming_commit_equals_block_causal_full_sequence(pgs):
    """Inside the window (sink 3 + local 9 = 12 frames), streaming equals one block-causal forward."""
    model, text, x = _setup(pgs, frames=12)
    t = torch.tensor([500.0])
    with torch.no_grad():
        full = model(x, t, text=text, attn_mask=block_causal_mask(12, 16, 3))
        cache = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), CacheConfig()).new_cache()
        outs = []
        for s in range(0, 12, 3):
            view = cache.view(CacheConfig().default_read_frames(s), write_frames=range(s, s + 3))
            outs.append(model(x[:, :, s:s + 3], t, text=text, frame_offset=s, cache=cache, view=view))
    assert (torch.cat(outs, 2) - full).abs().max().item() <= 1e-5


def test_streaming_denoise_equals_teacher_forced_full_sequence(pgs):
    """A noisy block attending to committed clean blocks == full sequence with per-frame timesteps."""
    model, text, clean = _setup(pgs, frames=12)
    noisy = torch.randn(1, 4, 3, 8, 8)
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), CacheConfig())
    with torch.no_grad():
        cache = gen.new_cache()
        for s in range(0, 9, 3):
            gen.commit_block(cache, clean[:, :, s:s + 3], s, text)
        view = cache.view(CacheConfig().default_read_frames(9))
        stream = model(noisy, torch.tensor([750.0]), text=text, frame_offset=9, cache=cache, view=view)
        seq = torch.cat([clean[:, :, :9], noisy], 2)
        ts = torch.tensor([[0.0] * 9 + [750.0] * 3])
        full = model(seq, ts, text=text, attn_mask=block_causal_mask(12, 16, 3))[:, :, 9:]
    assert (stream - full).abs().max().item() <= 1e-5


def test_window_roll_attends_sink_plus_recent_local(pgs):
    model, text, _ = _setup(pgs)
    cfg = CacheConfig(history_frames=12)
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig(timesteps=(1000.0, 500.0))), cfg)
    from kvpo_megatron.sampling import PromptSwitch
    cache = gen.new_cache()
    seen = []
    orig = cache.view

    def spy(read_frames, write_frames=(), device=None):
        seen.append((tuple(read_frames), tuple(write_frames)))
        return orig(read_frames, write_frames, device)

    cache.view = spy
    with torch.no_grad():
        gen.generate(torch.randn(1, 4, 30, 8, 8), [PromptSwitch(0, text)], cache=cache)
    for read, write in seen:
        start = write[0] if write else None
        if start is None:
            continue
        expect = [f for f in range(3) if f < start] + list(range(max(3, start - 6), start))
        assert list(read) == expect, (start, read)
    block_18 = [r for r, w in seen if w and w[0] == 18][0]
    assert block_18 == (0, 1, 2, 12, 13, 14, 15, 16, 17)
    # history 12: frames older than 30-12 are dropped, the sink stays
    assert cache.resident_frames() == [0, 1, 2] + list(range(18, 30))
    assert gen.forward_count == 10 * 3  # 2 solver steps + 1 commit per block


def test_cache_snapshot_restore_is_bitwise_and_per_sample_gather(pgs):
    model, text, x = _setup(pgs, frames=9)
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), CacheConfig())
    cache = gen.new_cache()
    with torch.no_grad():
        for s in range(0, 9, 3):
            gen.commit_block(cache, x[:, :, s:s + 3], s, text)
    snap = cache.snapshot()
    k_before = cache.k[1].clone()
    with torch.no_grad():
        gen.commit_block(cache, torch.randn(1, 4, 3, 8, 8), 9, text)
    assert not torch.equal(cache.k[1], k_before)
    cache.restore(snap)
    assert torch.equal(cache.k[1], k_before) and cache.resident_frames() == list(range(9))
    # a batch of 2 whose samples hold different frames: per-sample views read each sample's own pages
    two = gen.new_cache(2)
    with torch.no_grad():
        for s in range(0, 9, 3):
            gen.commit_block(two, torch.cat([x[:, :, s:s + 3], -x[:, :, s:s + 3]]), s, text)
    view = two.view([[0, 4], [5, 1]])
    kk, _ = two.gather(0, view.read_slots)
    k0, _ = two.frame_kv(0, [0, 4, 5, 1])  # [2, 4, T, h, d]
    assert torch.equal(kk[0, :16], k0[0, 0]) and torch.equal(kk[0, 16:], k0[0, 1])
    assert torch.equal(kk[1, :16], k0[1, 2]) and torch.equal(kk[1, 16:], k0[1, 3])
    assert not torch.equal(k0[0], k0[1])


def test_forked_batch_shares_the_prefix_and_writes_private_pages(pgs):
    """A fork reads the frozen parent's pages (stored once), writes its own: each sample of the fork equals a
    plain continuation of the prefix; the parent never changes; a reused private page is no longer resident."""
    model, text, x = _setup(pgs, frames=30)
    cfg = CacheConfig(history_frames=12)
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), cfg)
    prefix = gen.new_cache(1, fork_batch=3, private_frames=9)
    with torch.no_grad():
        for s in range(0, 12, 3):
            gen.commit_block(prefix, x[:, :, s:s + 3], s, text)
    before = [t.clone() for t in prefix.k]
    bytes_prefix = prefix.nbytes()
    fork = prefix.fork(3, 9)
    assert prefix.frozen and fork.nbytes() == bytes_prefix  # one pool: no copy of the prefix
    with pytest.raises(RuntimeError, match="frozen"):
        prefix.view([0], write_frames=[12])
    cont = [x, -x, 2 * x]
    with torch.no_grad():
        for s in range(12, 30, 3):
            gen.commit_block(fork, torch.cat([c[:, :, s:s + 3] for c in cont]), s, text)
    for t, b in zip(prefix.k, before):  # the parent's pages are untouched
        assert torch.equal(t[:prefix.page.numel()], b[:prefix.page.numel()])
    for i, c in enumerate(cont):  # sample i == a cache that committed the prefix then c
        ref = gen.new_cache(1)
        with torch.no_grad():
            for s in range(0, 30, 3):
                gen.commit_block(ref, (x if s < 12 else c)[:, :, s:s + 3], s, text)
        frames = cfg.default_read_frames(30)
        assert torch.equal(fork.frame_kv(1, frames)[0][i], ref.frame_kv(1, frames)[0][0])
    # history 12 keeps frames 18..29; the private ring of 9 holds only 21..29: 18..20 are gone
    assert fork.resident_frames() == [0, 1, 2] + list(range(21, 30))
    with pytest.raises(ValueError, match="must hold the local window"):
        prefix.fork(2, 6)


def test_bad_inputs_name_the_problem(pgs):
    with pytest.raises(ConfigError, match="num_attention_heads \\(12\\) is not divisible by tensor_model_parallel_size \\(5\\)"):
        model_config("tiny", tensor_model_parallel_size=5)
    with pytest.raises(ConfigError, match="unknown model preset"):
        model_config("wan-7b")
    with pytest.raises(ConfigError, match="unknown model config key"):
        model_config("tiny", hidden_sise=3)
    model = tiny_model(pgs)
    text = model.encode_text(torch.randn(1, 16, 32))
    with pytest.raises(ConfigError, match="latents must be \\[batch, 4, frames, height, width\\]"):
        model(torch.randn(1, 3, 3, 8, 8), torch.tensor([1.0]), text=text)
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        model(torch.randn(1, 4, 3, 7, 8), torch.tensor([1.0]), text=text)
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), CacheConfig())
    with pytest.raises(ConfigError, match="number of latent frames \\(10\\) is not a multiple of frames_per_block \\(3\\)"):
        gen.check_video(torch.randn(1, 4, 10, 8, 8))
    with pytest.raises(ConfigError, match="text context must be"):
        model.encode_text(torch.randn(1, 16, 31))


def test_sampler_shift_and_steps():
    s = FlowMatchSampler(SamplerConfig())
    # s' = 5 s / (1 + 4 s): 1 -> 1, 0.75 -> 0.9375, 0.5 -> 0.8333, 0.25 -> 0.625
    assert [round(s.timestep(i), 4) for i in range(4)] == [1000.0, 937.5, 833.3333, 625.0]
    x, v = torch.ones(3), torch.full((3,), 2.0)
    assert torch.allclose(s.step(x, v, 1), x + (0.8333333333 - 0.9375) * v)
    assert torch.allclose(s.step(x, v, 3), x - 0.625 * v)  # last step lands on x0 = x - s v
    r = FlowMatchSampler(SamplerConfig(kind="renoise"))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, generator=torch.Generator().manual_seed(0))
    x0 = x - 0.9375 * v
    assert torch.allclose(r.step(x, v, 1, g), (1 - 0.8333333333) * x0 + 0.8333333333 * eps, atol=1e-6)
    with pytest.raises(ConfigError, match="sampler.kind"):
        SamplerConfig(kind="sde")
    assert math.isclose(FlowMatchSampler(SamplerConfig(context_noise=0)).context_timestep(), 0.0)
