"""Small builders shared by tests: tiny models, a reference diffusers model, random inputs."""
from __future__ import annotations

import torch

from kvpo_megatron.checkpoint.mappings import convert_state_dict
from kvpo_megatron.model import CausalWanDiT, model_config


def tiny_diffusers(seed: int = 0):
    """A tiny random diffusers WanTransformer3DModel matching the ``tiny`` preset."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=8, in_channels=4,
                                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=192, num_layers=2,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    with torch.no_grad():  # move away from the zero/one inits so every parameter matters
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref.eval()


def tiny_wan22_diffusers(seed: int = 0):
    """A tiny random diffusers WanTransformer3DModel in the ``tiny-wan2.2`` shape (Wan2.2-TI2V-5B's 48 latent
    channels; 6 heads of 16)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=16, in_channels=48,
                                out_channels=48, text_dim=32, freq_dim=32, ffn_dim=448, num_layers=2,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref.eval()


def tiny_full_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsharded) tiny weights in our names, from a random diffusers model."""
    return convert_state_dict(tiny_diffusers(seed).state_dict(), "diffusers", "ours")


def tiny_model(pgs, *, sd=None, spec=None, **overrides) -> CausalWanDiT:
    from kvpo_megatron.checkpoint.sharding import load_full_state_dict

    cfg = model_config("tiny", **overrides)
    m = CausalWanDiT(cfg, spec, pg_collection=pgs)
    load_full_state_dict(m, sd if sd is not None else tiny_full_state_dict())
    return m


def random_peft_lora(ffn_dim: int, *, rank: int, dim: int = 96, layers: int = 2, seed: int = 5) -> dict:
    """A LongLive-style peft LoRA state dict (Wan names) of a tiny model: every block linear of ``layers`` blocks
    (LongLive's ``configure_lora_for_model`` targets), A and B random (~0.1)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"{a}.{x}": (dim, dim) for a in ("self_attn", "cross_attn") for x in "qkvo"}
    shapes |= {"ffn.0": (ffn_dim, dim), "ffn.2": (dim, ffn_dim)}
    sd = {}
    for n in range(layers):
        for mod, (out, inp) in shapes.items():
            sd[f"base_model.model.blocks.{n}.{mod}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.1
            sd[f"base_model.model.blocks.{n}.{mod}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    return sd


def with_peft_lora(ref, lora: dict, *, rank: int, alpha: float):
    """peft's (unmerged) LoRA on a copy of a diffusers Wan model, ``lora`` in Wan names (:func:`random_peft_lora`):
    the reference for an imported LoRA."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from kvpo_megatron.checkpoint.mappings import rename

    model = copy.deepcopy(ref)
    sd = {}
    for k, v in lora.items():
        mod, half = k.removeprefix("base_model.model.").split(".lora_")
        sd[f"{rename(mod + '.weight', 'wan', 'diffusers')[:-len('.weight')]}.lora_{half}"] = v
    targets = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)"
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), model)
    assert not set_peft_model_state_dict(model, sd).unexpected_keys
    return model.eval()


def wan_state_dict(ref) -> dict[str, torch.Tensor]:
    """A diffusers Wan model's weights under the original Wan names (what Wan / LongLive checkpoints hold)."""
    return {k: v.clone() for k, v in convert_state_dict(ref.state_dict(), "diffusers", "wan").items()}


def max_output_error(model_a, model_b, ours: bool) -> float:
    """Max abs difference of ``model_b``'s output (ours when ``ours``, else a diffusers model) from the diffusers
    ``model_a``'s, on fixed tiny inputs (2 samples, 3 frames of 8x8, timesteps 937.5 and 250)."""
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor([937.5, 250.0])
    ctx = torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        want = model_a(x, t, ctx, return_dict=False)[0]
        got = model_b(x, t, text=model_b.encode_text(ctx)) if ours else model_b(x, t, ctx, return_dict=False)[0]
    return (got - want).abs().max().item()


def cached_replay_backward(model, ctx: torch.Tensor, noise: torch.Tensor, *, device="cuda") -> torch.Tensor:
    """Commit frames 0-8 of ``noise`` [b, c, >=15, h, w] to a cache (no grad), then one replay-style forward at
    frames 9-11 under that cache and a backward of its dot product with frames 12-14. Returns the output; the
    parameters' ``.grad`` hold the gradients."""
    from kvpo_megatron.model import CacheConfig
    from kvpo_megatron.sampling import FlowMatchSampler, SamplerConfig, StreamingGenerator

    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), CacheConfig(history_frames=9))
    cache = gen.new_cache()
    with torch.no_grad():
        text = model.encode_text(ctx)
        for s in range(0, 9, 3):
            gen.commit_block(cache, noise[:, :, s:s + 3], s, text)
    view = cache.view(CacheConfig().default_read_frames(9), device=device)
    out = model(noise[:, :, 9:12], torch.tensor([500.0], device=device), text=model.encode_text(ctx), frame_offset=9,
                cache=cache, view=view)
    (out.float() * noise[:, :, 12:15]).sum().backward()
    return out
