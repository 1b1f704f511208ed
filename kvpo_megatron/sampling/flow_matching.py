"""Few-step flow matching (rectified flow) as distilled Self-Forcing/LongLive generators use it.

Path: ``x_s = (1 - s) x0 + s eps``; the model predicts the velocity ``v = eps - x0`` at timestep ``1000 s``.
Timesteps (default 1000, 750, 500, 250) are warped by ``shift``: ``s' = shift s / (1 + (shift - 1) s)``.

* ``ode`` (the dataclass default): deterministic Euler, ``x_{next} = x + (s_next - s) v`` with a final
  ``s_next = 0``. This is the KVPO paper's variant (an "ODE-native" rollout); on Self-Forcing / LongLive /
  MemFlow checkpoints it does *not* reproduce their videos (on a tiny converted LongLive-format checkpoint,
  same noise and prompt, every block ends 1.2-1.4 relative apart from ``renoise``; README "Samplers").
* ``renoise``: the sampler these checkpoints were distilled with and their inference code runs
  (Self-Forcing ``pipeline/causal_inference.py``; LongLive and MemFlow copy it): ``x0 = x - s v``, then
  ``x_{next} = (1 - s_next) x0 + s_next eps'`` with fresh noise ``eps'`` (the last step returns ``x0``). The
  generator presets (``kvpo_megatron/presets.py``) and the example configs select it.
Same contract as diffusers' schedulers: ``timesteps`` then ``step``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from kvpo_megatron.errors import ConfigError


class SamplerKind(StrEnum):
    ode = "ode"
    renoise = "renoise"


@dataclass(kw_only=True, slots=True)
class SamplerConfig:
    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    """Denoising steps before the shift, in (0, 1000], decreasing."""
    shift: float = 5.0
    """Timestep shift."""
    kind: SamplerKind = SamplerKind.ode
    """``ode`` (deterministic Euler; the KVPO paper's variant) or ``renoise`` (x0 prediction + fresh noise: what
    Self-Forcing / LongLive / MemFlow checkpoints need to give their upstream videos; set by the presets)."""
    context_noise: float = 0.0
    """Timestep of the commit pass that writes a finished block's K/V (0 = clean)."""

    def __post_init__(self):
        self.timesteps = tuple(float(t) for t in self.timesteps)
        try:
            self.kind = SamplerKind(self.kind)
        except ValueError:
            raise ConfigError(f"sampler.kind must be one of {[k.value for k in SamplerKind]}, got {self.kind!r}")
        if not self.timesteps or any(not 0 < t <= 1000 for t in self.timesteps) or \
                any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ConfigError(f"sampler.timesteps must be decreasing values in (0, 1000], got {self.timesteps}")
        if self.shift <= 0:
            raise ConfigError(f"sampler.shift must be > 0, got {self.shift}")
        if not 0 <= self.context_noise < 1000:
            raise ConfigError(f"sampler.context_noise must be in [0, 1000), got {self.context_noise}")


def shift_sigma(s: torch.Tensor | float, shift: float):
    return shift * s / (1 + (shift - 1) * s)


class FlowMatchSampler:
    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg
        s = torch.tensor(cfg.timesteps, dtype=torch.float64) / 1000.0
        self.sigmas = torch.cat([shift_sigma(s, cfg.shift), torch.zeros(1, dtype=torch.float64)])
        self.context_sigma = float(shift_sigma(torch.tensor(cfg.context_noise / 1000.0), cfg.shift))

    @property
    def num_steps(self) -> int:
        return len(self.cfg.timesteps)

    def timestep(self, i: int) -> float:
        """Model input timestep of step ``i`` (shifted sigma x 1000)."""
        return float(self.sigmas[i]) * 1000.0

    def context_timestep(self) -> float:
        return self.context_sigma * 1000.0

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int, generator: torch.Generator | None = None) -> torch.Tensor:
        s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if self.cfg.kind == SamplerKind.ode or s_next == 0.0:
            return (x.double() + (s_next - s) * v.double()).to(x.dtype)
        x0 = x.double() - s * v.double()
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return ((1 - s_next) * x0 + s_next * eps.double()).to(x.dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
        return ((1 - sigma) * x0.double() + sigma * eps.double()).to(x0.dtype)
