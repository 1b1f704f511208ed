"""3D rotary position embedding of Wan2.1, at absolute frame positions.

The head dimension ``d`` is split into frame / height / width parts of sizes
``d - 4*(d//6)``, ``2*(d//6)``, ``2*(d//6)``; each part rotates consecutive channel pairs
(``x[2i], x[2i+1]``) by ``pos * theta**(-2i/part)``, exactly as Wan and diffusers do.
Streaming passes ``frame_offset`` so a block's keys carry their absolute frame index, which is what
lets the KV cache store keys after RoPE and CHR reuse them anywhere.
"""
from __future__ import annotations

import torch
from torch import nn


def _axis_freqs(part: int, max_pos: int, theta: float) -> torch.Tensor:
    """[max_pos, part/2] angles in float64."""
    inv = 1.0 / theta ** (torch.arange(0, part, 2, dtype=torch.float64) / part)
    return torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)


class Rope3D(nn.Module):
    """Builds per-token (cos, sin) tables for a (frames, height, width) token grid."""

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0):
        super().__init__()
        hw = 2 * (head_dim // 6)
        self.parts = (head_dim - 2 * hw, hw, hw)
        angles = [_axis_freqs(p, max_positions, theta) for p in self.parts]
        for name, a in zip("fhw", angles):
            self.register_buffer(f"angles_{name}", a, persistent=False)
        self.max_positions = max_positions

    def forward(self, frame_offset: int | torch.Tensor, frames: int, height: int, width: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [frames*height*width, head_dim/2] float64, token order (f, h, w).

        ``frame_offset`` may be a 0-dim integer tensor on the buffers' device: the tables are then gathered on the
        device (no host value), so a captured CUDA graph serves every frame offset."""
        if isinstance(frame_offset, torch.Tensor):
            pos = frame_offset + torch.arange(frames, device=self.angles_f.device)
            af = self.angles_f.index_select(0, pos)
        else:
            if frame_offset + frames > self.max_positions:
                raise ValueError(f"frame position {frame_offset + frames} exceeds rope_max_positions "
                                 f"{self.max_positions}")
            af = self.angles_f[frame_offset:frame_offset + frames]
        af = af.view(frames, 1, 1, -1).expand(frames, height, width, -1)
        ah = self.angles_h[:height].view(1, height, 1, -1).expand(frames, height, width, -1)
        aw = self.angles_w[:width].view(1, 1, width, -1).expand(frames, height, width, -1)
        ang = torch.cat([af, ah, aw], dim=-1).reshape(frames * height * width, -1)
        return ang.cos(), ang.sin()  # float64; apply_rope computes in float32 (or float64 for fp32 inputs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs. x: [b, L, h, d]; cos/sin: [L, d/2] (or broadcastable)."""
    # fp32 inputs rotate in float64 like diffusers' reference; low-precision inputs in float32.
    xf = x.to(torch.float64 if x.dtype == torch.float32 else torch.float32).unflatten(-1, (-1, 2))
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)
