"""Wan2.2-TI2V-5B (LongLive 2.0's base) as a ``CausalWanDiT`` preset, at the tiny ``tiny-wan2.2`` shape:
parity with diffusers' ``WanTransformer3DModel`` (scalar and Wan2.2's per-token timesteps), streaming ==
block-causal full forward, LoRA (merged == unmerged, only adapters train), and the 5B preset's numbers."""
from __future__ import annotations

import torch

from kvpo_megatron.checkpoint.mappings import convert_state_dict
from kvpo_megatron.model import CacheConfig, CausalWanDiT, block_causal_mask, model_config
from kvpo_megatron.sampling import FlowMatchSampler, SamplerConfig, StreamingGenerator
from tests.helpers import tiny_wan22_diffusers

LATENT = (6, 8)  # 3 x 4 = 12 tokens per latent frame


def tiny_wan22(pgs, seed: int = 0, **overrides) -> tuple[CausalWanDiT, object]:
    from kvpo_megatron.checkpoint.sharding import load_full_state_dict

    ref = tiny_wan22_diffusers(seed)
    model = CausalWanDiT(model_config("tiny-wan2.2", **overrides), pg_collection=pgs)
    load_full_state_dict(model, convert_state_dict(ref.state_dict(), "diffusers", "ours"))
    return model.eval(), ref


def test_preset_is_wan22_ti2v_5b():
    """Numbers from Wan-Video/Wan2.2 wan/configs/wan_ti2v_5B.py (dim, ffn_dim, num_heads, num_layers, freq_dim,
    patch) and its config.json (in_dim = out_dim = 48, text_len 512, text_dim 4096)."""
    cfg = model_config("wan2.2-5b")
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_layers) == (3072, 14336, 24, 30)
    assert (cfg.in_channels, cfg.out_channels, cfg.patch_size, cfg.head_dim) == (48, 48, (1, 2, 2), 128)
    assert (cfg.freq_dim, cfg.text_dim, cfg.text_len, cfg.layernorm_epsilon) == (256, 4096, 512, 1e-6)
    assert cfg.tokens_per_frame(44, 80) == 880  # 1280x704 through the 16x VAE: 44 x 80 latents, 22 x 40 tokens
    with torch.device("meta"):
        n = sum(p.numel() for p in CausalWanDiT(model_config("wan2.2-5b", perform_initialization=False)).parameters())
    assert 4.99e9 < n < 5.01e9, n


def test_bidirectional_parity_with_diffusers(pgs):
    model, ref = tiny_wan22(pgs, sinusoid_fp64=False)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 48, 4, *LATENT, generator=g), torch.randn(2, 16, 32, generator=g)
    t = torch.tensor([999.0, 624.0])
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = model(x, t, text=model.encode_text(ctx))
    assert got.shape == want.shape == x.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err


def test_per_token_timesteps_of_ti2v_are_per_frame_timesteps(pgs):
    """Wan2.2 TI2V feeds diffusers ``timestep [b, tokens]`` (``expand_timesteps``: the image-conditioned first
    frame at t=0); constant within each latent frame, it equals our per-frame ``timestep [b, F]``."""
    model, ref = tiny_wan22(pgs, sinusoid_fp64=False)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(1, 48, 4, *LATENT, generator=g), torch.randn(1, 16, 32, generator=g)
    per_frame = torch.tensor([[0.0, 833.0, 833.0, 833.0]])
    tokens = model.config.tokens_per_frame(*LATENT)
    with torch.no_grad():
        want = ref(x, per_frame.repeat_interleave(tokens, 1), ctx, return_dict=False)[0]
        got = model(x, per_frame, text=model.encode_text(ctx))
        scalar = model(x, torch.tensor([833.0]), text=model.encode_text(ctx))
    assert (got - want).abs().max().item() <= 1e-5
    assert (scalar - want).abs().max().item() > 1e-3  # the clean first frame really changes the output


def test_streaming_equals_block_causal_full_sequence(pgs):
    """Commit passes over the LongLive2 layout scaled down (blocks of 2, sink 2, local 4) == one block-causal
    forward, and a denoise step over the committed cache == the teacher-forced full sequence."""
    model, _ = tiny_wan22(pgs)
    cc = CacheConfig(frames_per_block=2, num_sink_frames=2, local_attn_frames=4, history_frames=8)
    g = torch.Generator().manual_seed(5)
    x, noisy = torch.randn(1, 48, 6, *LATENT, generator=g), torch.randn(1, 48, 2, *LATENT, generator=g)
    text = model.encode_text(torch.randn(1, 16, 32, generator=g))
    tokens = model.config.tokens_per_frame(*LATENT)
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), cc)
    with torch.no_grad():
        full = model(x, torch.tensor([0.0]), text=text, attn_mask=block_causal_mask(6, tokens, 2))
        cache = gen.new_cache()
        outs = [model(x[:, :, s:s + 2], torch.tensor([0.0]), text=text, frame_offset=s, cache=cache,
                      view=cache.view(cc.default_read_frames(s), write_frames=range(s, s + 2))) for s in (0, 2, 4)]
        stream = model(noisy, torch.tensor([937.0]), text=text, frame_offset=6, cache=cache,
                       view=cache.view(cc.default_read_frames(6)))
        seq = torch.cat([x, noisy], 2)
        tf = model(seq, torch.tensor([[0.0] * 6 + [937.0] * 2]), text=text,
                   attn_mask=block_causal_mask(8, tokens, 2))[:, :, 6:]
    assert cc.default_read_frames(6) == [0, 1, 4, 5]  # sink + local: 6 frames span 2 + 4 (incl. the block)
    assert (torch.cat(outs, 2) - full).abs().max().item() <= 1e-5
    assert (stream - tf).abs().max().item() > 0  # not trivially equal ...
    # ... the full sequence also sees frames 2, 3 (outside the window): compare with a mask that hides them
    mask = block_causal_mask(8, tokens, 2)
    frame = torch.arange(8).repeat_interleave(tokens)
    mask[(frame >= 6)[:, None] & ((frame == 2) | (frame == 3))[None, :]] = False
    with torch.no_grad():
        tf = model(seq, torch.tensor([[0.0] * 6 + [937.0] * 2]), text=text, attn_mask=mask)[:, :, 6:]
    assert (stream - tf).abs().max().item() <= 1e-5


def test_lora_on_wan22_shape(pgs):
    """LoRA on every block linear: zero-init B leaves the output unchanged, merged == unmerged after a step,
    and only the adapters receive gradients."""
    from kvpo_megatron.lora import LoRAConfig, apply_lora, lora_parameters, merge_lora, unmerge_lora

    model, _ = tiny_wan22(pgs)
    g = torch.Generator().manual_seed(6)
    x, ctx = torch.randn(1, 48, 2, *LATENT, generator=g), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        base = model(x, torch.tensor([500.0]), text=model.encode_text(ctx))
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    names = [n for n, _ in lora_parameters(model)]
    assert len(names) == 2 * 2 * 10  # 2 blocks x (q,k,v,o self + cross, ffn_fc1, ffn_fc2) x (A, B)
    with torch.no_grad():
        assert (model(x, torch.tensor([500.0]), text=model.encode_text(ctx)) - base).abs().max() == 0
        for _, p in lora_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    out = model(x, torch.tensor([500.0]), text=model.encode_text(ctx))
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(names)
    with torch.no_grad():
        merge_lora(model)
        merged = model(x, torch.tensor([500.0]), text=model.encode_text(ctx))
        unmerge_lora(model)
    assert (merged - out.detach()).abs().max().item() <= 1e-5
    assert (out.detach() - base).abs().max().item() > 1e-4
