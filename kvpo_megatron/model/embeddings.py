"""Input/output pieces of Wan2.1 outside the blocks: patch embedding, timestep and text embeddings, head.

They are small and replicated on every tensor-parallel rank (plain ``nn`` modules).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvpo_megatron.model.config import WanConfig


def sinusoidal_embedding(t: torch.Tensor, dim: int, fp64: bool = True) -> torch.Tensor:
    """[cos(t*w_i), sin(t*w_i)], w_i = 10000^(-i/(dim/2)). t: [...] -> [..., dim] float32.

    ``fp64=True`` is Wan's ``sinusoidal_embedding_1d`` (float64, what Wan/Self-Forcing checkpoints were trained
    with); ``fp64=False`` is diffusers' ``get_timestep_embedding`` (float32 angles). They differ by ~1e-5.
    """
    half = dim // 2
    dt = torch.float64 if fp64 else torch.float32
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dt, device=t.device) / half)
    ang = t.to(dt)[..., None] * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1).float()


class PatchEmbedding(nn.Conv3d):
    """Conv3d with kernel = stride = patch (Wan's parameters), computed as one matmul over the patches.

    Same result as the convolution up to summation order, and the same for every batch size (oneDNN's
    convolution rounds differently for different batches), so a batch of samples equals each sample alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, C, F, H, W] -> [b, dim, F/pt, H/ph, W/pw]."""
        b, c, f, h, w = x.shape
        pt, ph, pw = self.kernel_size
        p = x.view(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        y = F.linear(p.reshape(b, -1, c * pt * ph * pw), self.weight.flatten(1), self.bias)  # [b, N, dim]
        return y.transpose(1, 2).reshape(b, -1, f // pt, h // ph, w // pw)


def patch_embedding(cfg: WanConfig) -> nn.Conv3d:
    """Conv3d with kernel = stride = patch."""
    return PatchEmbedding(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)


def time_embedding(cfg: WanConfig) -> nn.Sequential:
    """Sinusoid (freq_dim) -> Linear -> SiLU -> Linear: e [.., dim]."""
    return nn.Sequential(nn.Linear(cfg.freq_dim, cfg.hidden_size), nn.SiLU(), nn.Linear(cfg.hidden_size, cfg.hidden_size))


def time_projection(cfg: WanConfig) -> nn.Sequential:
    """e -> SiLU -> Linear(dim, 6*dim): the per-block adaLN parameters e0."""
    return nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size))


def text_embedding(cfg: WanConfig) -> nn.Sequential:
    """text_dim -> dim MLP with GELU(tanh)."""
    return nn.Sequential(nn.Linear(cfg.text_dim, cfg.hidden_size), nn.GELU(approximate="tanh"),
                         nn.Linear(cfg.hidden_size, cfg.hidden_size))


class Head(nn.Module):
    """LayerNorm (no affine) + 2-way modulation (shift, scale) + linear to patch*out_channels."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm = nn.LayerNorm(d, eps=cfg.layernorm_epsilon, elementwise_affine=False)
        self.head = nn.Linear(d, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [b, F, T, d]; e: [b, F, d] (per-frame time embedding)."""
        mod = self.modulation[:, None] + e[:, :, None, :]  # [b, F, 2, d]
        shift, scale = mod[:, :, 0:1], mod[:, :, 1:2]  # [b, F, 1, d] each
        y = (self.norm(x.float()) * (1 + scale) + shift).type_as(x)
        return self.head(y)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int):
    """[b, F*h*w, pt*ph*pw*C] -> [b, C, F*pt, h*ph, w*pw]."""
    b = tokens.shape[0]
    f, h, w = grid
    pt, ph, pw = patch
    x = tokens.reshape(b, f, h, w, pt, ph, pw, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
