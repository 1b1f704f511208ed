"""Reward contract: components score videos ``[B, T, 3, H, W]`` (uint8 or [0, 1] float) against prompts -> ``[B]``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from kvpo_megatron.errors import ConfigError


@runtime_checkable
class RewardComponent(Protocol):
    name: str

    def score(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """frames [B, T, 3, H, W] in [0, 1] (uint8 accepted), one prompt per video -> scores [B] float32."""
        ...


@dataclass(kw_only=True)
class RewardOutput:
    components: dict[str, torch.Tensor]
    """Component name -> [B] float32 scores, already normalised per the component's own convention."""
    weights: dict[str, float]
    """Component name -> weight in ``total``."""

    @property
    def total(self) -> torch.Tensor:
        """Weighted sum ``sum_k w_k r_k`` -> [B]."""
        names = list(self.components)
        if not names:
            raise ConfigError("RewardOutput has no components")
        out = torch.zeros_like(self.components[names[0]], dtype=torch.float32)
        for name in names:
            out = out + self.weights[name] * self.components[name].float()
        return out

    def to(self, device: str | torch.device) -> "RewardOutput":
        return RewardOutput(components={k: v.to(device) for k, v in self.components.items()},
                            weights=dict(self.weights))


def as_unit_frames(frames: torch.Tensor, *, where: str = "reward") -> torch.Tensor:
    """Validate ``[B, T, 3, H, W]`` and return float32 frames in [0, 1] (uint8 is divided by 255)."""
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ConfigError(f"{where}: frames must be [B, T, 3, H, W], got shape {tuple(frames.shape)}")
    if frames.shape[1] < 1:
        raise ConfigError(f"{where}: frames have no time steps (T=0)")
    if frames.dtype == torch.uint8:
        return frames.float() / 255.0
    if not frames.is_floating_point():
        raise ConfigError(f"{where}: frames dtype {frames.dtype} is neither uint8 nor floating point")
    return frames.float().clamp(0.0, 1.0)


def luma(frames: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma of ``[..., 3, H, W]`` frames -> ``[..., H, W]``."""
    r, g, b = frames.unbind(dim=-3)
    return 0.299 * r + 0.587 * g + 0.114 * b


def check_prompts(frames: torch.Tensor, prompts: list[str], *, where: str) -> None:
    if len(prompts) != frames.shape[0]:
        raise ConfigError(f"{where}: {len(prompts)} prompts for {frames.shape[0]} videos")
