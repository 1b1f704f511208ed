"""Model configuration: megatron-core's ``TransformerConfig`` extended with Wan fields, plus presets.

``WanConfig`` is the only place model hyper-parameters live. Named presets (``tiny``, ``tiny-wan2.2``,
``wan-1.3b``, ``wan-14b``, ``wan2.2-5b``) are functions returning fresh configs; YAML/CLI values only override
fields.

Wan2.2-TI2V-5B (LongLive 2.0's base) is the Wan2.1 DiT at other sizes: the same blocks, parameter names, per-frame
adaLN modulation, 3D RoPE split and timestep sinusoid; what differs is only the numbers -- dim 3072, ffn 14336,
24 heads of 128, 30 layers, 48 latent channels in and out (the Wan2.2 VAE's z_dim; 16x spatial, 4x temporal
compression) with the same (1, 2, 2) patch. Sources: Wan-Video/Wan2.2 ``wan/configs/wan_ti2v_5B.py``,
NVlabs/LongLive ``wan_5b/configs/wan_ti2v_5B.py``, diffusers ``scripts/convert_wan_to_diffusers.py``
(``Wan2.2-TI2V-5B``). Its per-token timesteps (diffusers ``expand_timesteps``: ``[batch, tokens]``, first frame at
0 for image conditioning) are constant within a latent frame, i.e. our per-frame ``timestep [b, F]``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

import torch
from megatron.core.transformer import TransformerConfig

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model.split_attention import FUSED_CHOICES
from kvpo_megatron.parallel.layout import check_heads


class LayerSpecKind(StrEnum):
    """Which layer spec builds the blocks."""

    local = "local"  # plain torch attention + megatron tensor_parallel linears (CPU and GPU)
    te = "te"  # TransformerEngine linears/attention (GPU only; see model/te_spec.py)


@dataclass(kw_only=True)
class WanConfig(TransformerConfig):
    """Wan2.1 / Wan2.2 DiT. ``hidden_size`` is Wan's ``dim``, ``ffn_hidden_size`` its ``ffn_dim``,
    ``layernorm_epsilon`` its ``eps``. Parallel sizes come from ``TransformerConfig``."""

    in_channels: int = 16
    """Latent channels in."""
    out_channels: int = 16
    """Latent channels out."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Conv3d patch (frames, height, width)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    text_dim: int = 4096
    """Width of the text encoder's embeddings (umT5-XXL: 4096)."""
    text_len: int = 512
    """Text tokens per prompt (padded/truncated)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_max_positions: int = 1024
    """Largest frame/height/width position RoPE tables cover."""
    sinusoid_fp64: bool = True
    """Timestep sinusoid in float64 (original Wan) or float32 (diffusers); they differ by ~1e-5."""
    spec: LayerSpecKind = LayerSpecKind.local
    """Layer spec: ``local`` or ``te``."""
    split_attention: str = "auto"
    """Kernels of the two parts of the replay's split attention (``model/split_attention.py``, every spec):
    ``auto`` | ``flash`` | ``cudnn`` | ``torch``."""

    def __post_init__(self) -> None:
        self.spec = LayerSpecKind(self.spec)
        if self.split_attention not in FUSED_CHOICES:
            raise ConfigError(f"model.overrides.split_attention must be one of {list(FUSED_CHOICES)}, "
                              f"got {self.split_attention!r}")
        self.patch_size = tuple(self.patch_size)
        for name in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers", "in_channels",
                     "out_channels", "freq_dim", "text_dim", "text_len"):
            if getattr(self, name) is None or getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"model.num_attention_heads ({self.num_attention_heads})")
        tp = self.tensor_model_parallel_size
        check_heads(self.num_attention_heads, tp=tp, heads_name="model.num_attention_heads")
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"model.ffn_hidden_size ({self.ffn_hidden_size}) is not divisible by "
                              f"tensor_model_parallel_size ({tp})")
        if self.head_dim < 6 or self.head_dim % 2:
            raise ConfigError(f"head dim hidden_size/num_attention_heads = {self.head_dim} must be even and >= 6 "
                              "(3D RoPE splits it over frame/height/width)")
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        _, ph, pw = self.patch_size
        return (latent_height // ph) * (latent_width // pw)


def _base(**kw) -> dict:
    base = dict(use_cpu_initialization=True, gradient_accumulation_fusion=False, layernorm_epsilon=1e-6,
                add_bias_linear=True, params_dtype=torch.float32, bf16=False)
    base.update(kw)
    return base


PRESETS: dict[str, dict] = {
    # ~0.25M parameters; 12 heads so TP in {1,2,3,4,6,12} and TP*CP=4 divide; head_dim 8.
    "tiny": _base(num_layers=2, hidden_size=96, ffn_hidden_size=192, num_attention_heads=12, freq_dim=32,
                  text_dim=32, text_len=16, in_channels=4, out_channels=4),
    # Wan2.2-TI2V-5B shaped: 48 latent channels, head_dim 16 (RoPE parts 8/4/4 like 5B's 44/42/42), 6 heads so
    # TP in {1,2,3,6}; ffn/dim ratio of 5B (14336/3072 = 4.67).
    "tiny-wan2.2": _base(num_layers=2, hidden_size=96, ffn_hidden_size=448, num_attention_heads=6, freq_dim=32,
                         text_dim=32, text_len=16, in_channels=48, out_channels=48),
    "wan-1.3b": _base(num_layers=30, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12, freq_dim=256,
                      text_dim=4096, text_len=512, in_channels=16, out_channels=16),
    "wan-14b": _base(num_layers=40, hidden_size=5120, ffn_hidden_size=13824, num_attention_heads=40, freq_dim=256,
                     text_dim=4096, text_len=512, in_channels=16, out_channels=16),
    # Wan2.2-TI2V-5B (LongLive 2.0): ~5.0B parameters; latents [48, F, H/16, W/16] (1280x704 -> 44x80, 880 tokens).
    "wan2.2-5b": _base(num_layers=30, hidden_size=3072, ffn_hidden_size=14336, num_attention_heads=24, freq_dim=256,
                       text_dim=4096, text_len=512, in_channels=48, out_channels=48),
}


def model_config(name: str, **overrides) -> WanConfig:
    """Build the named preset, with field overrides (unknown fields raise ``ConfigError``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown model config key(s) {unknown}")
    return WanConfig(**{**PRESETS[name], **overrides})
