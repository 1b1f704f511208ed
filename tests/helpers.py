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
