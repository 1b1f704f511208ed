"""Built-in reward components that need no weights: deterministic, smooth functions of the frames.

They ignore the prompt (so they also work per segment) and exist so the tiny default and the tests have a
reward a small model can learn. Each docstring gives the formula; ``x`` is the video in [0, 1], ``[T, 3, H, W]``.
"""
from __future__ import annotations

import torch

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.rewards.base import as_unit_frames, luma


class BrightnessReward:
    """``-(mean(luma(x)) - target)^2 / max(target, 1 - target)^2`` in [-1, 0]: 0 at the target brightness."""

    def __init__(self, *, target: float = 0.5, name: str = "brightness") -> None:
        if not 0.0 <= target <= 1.0:
            raise ConfigError(f"brightness.target={target}: must be in [0, 1]")
        self.name = name
        self.target = target

    def score(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = as_unit_frames(frames, where=self.name)
        m = luma(x).mean(dim=(1, 2, 3))
        return -((m - self.target) ** 2) / max(self.target, 1.0 - self.target) ** 2


class ColorTargetReward:
    """``-||mean_rgb(x) - target||^2 / 3`` in [-1, 0]: 0 when the mean colour equals ``target`` (RGB in [0, 1])."""

    def __init__(self, *, target: tuple[float, float, float] = (0.8, 0.3, 0.2), name: str = "color_target") -> None:
        if len(target) != 3 or not all(0.0 <= c <= 1.0 for c in target):
            raise ConfigError(f"color_target.target={target}: must be 3 values in [0, 1]")
        self.name = name
        self.target = torch.tensor(target, dtype=torch.float32)

    def score(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = as_unit_frames(frames, where=self.name)
        mean_rgb = x.mean(dim=(1, 3, 4))  # [B, 3]
        return -((mean_rgb - self.target.to(x.device)) ** 2).mean(dim=1)


class ColorfulnessReward:
    """Hasler & Suesstrunk colourfulness per frame, averaged over time:
    ``sqrt(std(rg)^2 + std(yb)^2 + eps) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2 + eps)``, ``rg = R - G``,
    ``yb = (R + G) / 2 - B`` (``eps`` keeps it smooth at grey frames)."""

    def __init__(self, *, name: str = "colorfulness", eps: float = 1e-6) -> None:
        self.name = name
        self.eps = eps

    def score(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = as_unit_frames(frames, where=self.name)
        r, g, b = x.unbind(dim=2)  # [B, T, H, W]
        rg, yb = r - g, 0.5 * (r + g) - b
        std = (rg.var(dim=(2, 3), unbiased=False) + yb.var(dim=(2, 3), unbiased=False) + self.eps).sqrt()
        mean = (rg.mean(dim=(2, 3)) ** 2 + yb.mean(dim=(2, 3)) ** 2 + self.eps).sqrt()
        return (std + 0.3 * mean).mean(dim=1)


def _frame_diff(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of consecutive frames -> [B] (0 for a single frame)."""
    if x.shape[1] < 2:
        return torch.zeros(x.shape[0], device=x.device)
    return (x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


class TemporalConsistencyReward:
    """``-mean_t |x_{t+1} - x_t|``: 0 for a still video, lower for flicker (0 when T = 1)."""

    def __init__(self, *, name: str = "temporal_consistency") -> None:
        self.name = name

    def score(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -_frame_diff(as_unit_frames(frames, where=self.name))


class MotionReward:
    """Motion magnitude ``d = mean_t |x_{t+1} - x_t|``. Without a target the score is ``d`` (more motion is
    better); with ``target`` it is ``-(d - target)^2`` (motion close to the target is better)."""

    def __init__(self, *, target: float | None = None, name: str = "motion") -> None:
        if target is not None and not 0.0 <= target <= 1.0:
            raise ConfigError(f"motion.target={target}: must be in [0, 1]")
        self.name = name
        self.target = target

    def score(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        d = _frame_diff(as_unit_frames(frames, where=self.name))
        return d if self.target is None else -((d - self.target) ** 2)


BUILTIN_COMPONENTS = {
    "brightness": BrightnessReward,
    "color_target": ColorTargetReward,
    "colorfulness": ColorfulnessReward,
    "temporal_consistency": TemporalConsistencyReward,
    "motion": MotionReward,
}
