"""Few-step flow matching (rectified flow) as distilled Self-Forcing/LongLive generators use it.

Path: ``x_s = (1 - s) x0 + s eps``; the model predicts the velocity ``v = eps - x0`` at timestep ``1000 s``.
Timesteps (default 1000, 750, 500, 250) are warped by ``shift``: ``s' = shift s / (1 + (shift - 1) s)``.

* ``ode`` (the dataclass default): deterministic Euler, ``x_{next} = x + (s_next - s) v`` with a final
  ``s_next = 0``. This is the KVPO paper's variant (deterministic, ODE-native); on Self-Forcing / LongLive /
  MemFlow checkpoints it does *not* reproduce their videos (on a tiny converted LongLive-format checkpoint,
  same noise and prompt, every block ends 1.2-1.4 relative apart from ``renoise``; README "Generators and
  samplers").
* ``renoise``: the sampler these checkpoints were distilled with and their inference code runs
  (Self-Forcing ``pipeline/causal_inference.py``; LongLive and MemFlow copy it): ``x0 = x - s v``, then
  ``x_{next} = (1 - s_next) x0 + s_next eps'`` with fresh noise ``eps'`` (the last step returns ``x0``). The
  streaming engine draws ``eps'`` from a keyed noise source (``sampling/noise.py``). The generator presets
  (``kvpo_megatron/presets.py``) and the example configs select it.
* ``unipc``: the 2nd-order UniPC multistep predictor-corrector on the flow prediction that Wan2.2 and LongLive 2.0
  inference use (NVlabs/LongLive ``pipeline/causal_diffusion_inference.py``: ``FlowUniPCMultistepScheduler``,
  ``set_timesteps(sampling_steps, shift)``), run by diffusers' ``UniPCMultistepScheduler(prediction_type=
  "flow_prediction", use_flow_sigmas=True)`` on our sigmas. Upstream's 4 steps are the unshifted sigmas
  ``linspace(0.999, 0, 5)[:-1]`` (timesteps 999, 749.25, 499.5, 249.75) at shift 5; the model sees the integer
  timesteps the scheduler exposes (``int(1000 s')``: 999, 937, 833, 624) as upstream. Its first step is the Euler
  step; later ones also use earlier model outputs of the same block, so steps run 0..n-1 in order per block
  (a ``step(0)`` starts a new block).

Commit pass: a finished block's clean latents are written into the KV cache by one forward at timestep
``context_noise`` *as given* (not shifted) and without adding noise, as upstream inference does.
Same contract as diffusers' schedulers: ``timesteps`` then ``step``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from kvpo_megatron.errors import ConfigError


class SamplerKind(StrEnum):
    ode = "ode"
    renoise = "renoise"
    unipc = "unipc"


@dataclass(kw_only=True, slots=True)
class SamplerConfig:
    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    """Denoising steps before the shift, in (0, 1000], decreasing."""
    shift: float = 5.0
    """Timestep shift."""
    kind: SamplerKind = SamplerKind.ode
    """``ode`` (deterministic Euler; the KVPO paper's variant), ``renoise`` (x0 prediction + fresh noise: what
    Self-Forcing / LongLive / MemFlow checkpoints need to give their upstream videos; set by the presets) or ``unipc``
    (multistep UniPC: LongLive 2.0)."""
    context_noise: float = 0.0
    """Model timestep of the commit pass that writes a finished block's K/V, used as given (not shifted); the
    clean latents are passed without added noise (upstream inference). 0 = clean."""

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
        self._unipc, self._next_step = None, 0
        if cfg.kind == SamplerKind.unipc:
            self._unipc_timesteps = self._new_unipc().timesteps.tolist()

    def _new_unipc(self):
        from diffusers import UniPCMultistepScheduler

        sched = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=self.cfg.shift, solver_order=2)
        sched.set_timesteps(sigmas=np.array(self.cfg.timesteps) / 1000.0)  # shifted by flow_shift inside
        return sched

    @property
    def num_steps(self) -> int:
        return len(self.cfg.timesteps)

    def timestep(self, i: int) -> float:
        """Model input timestep of step ``i`` (shifted sigma x 1000; ``unipc``: its integer part, as upstream)."""
        if self.cfg.kind == SamplerKind.unipc:
            return float(self._unipc_timesteps[i])
        return float(self.sigmas[i]) * 1000.0

    def context_timestep(self) -> float:
        """Model timestep of the commit pass: ``context_noise`` as given (upstream inference does not shift it)."""
        return float(self.cfg.context_noise)

    @property
    def needs_noise(self) -> bool:
        """Whether :meth:`step` draws fresh noise (``renoise`` with more than one step)."""
        return self.cfg.kind == SamplerKind.renoise and self.num_steps > 1

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int, generator: torch.Generator | None = None, *,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """One solver step from ``x`` (at step ``i``) with velocity ``v``. ``noise``: the re-noising sampler's
        fresh noise for this step (shape of ``x``); drawn from ``generator`` when None."""
        if self.cfg.kind == SamplerKind.unipc:
            return self._unipc_step(x, v, i)
        s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        if self.cfg.kind == SamplerKind.ode or s_next == 0.0:
            return (x.double() + (s_next - s) * v.double()).to(x.dtype)
        x0 = x.double() - s * v.double()
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if noise is None else noise
        return ((1 - s_next) * x0 + s_next * eps.to(x.device).double()).to(x.dtype)

    def _unipc_step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        if i == 0:
            self._unipc = self._new_unipc()
        elif self._unipc is None or i != self._next_step:
            raise RuntimeError(f"sampler.kind=unipc is a multistep solver: step {i} must follow step {i - 1} of the "
                               f"same block (expected step {self._next_step})")
        self._next_step = i + 1
        out = self._unipc.step(v.double(), self._unipc.timesteps[i], x.double(), return_dict=False)[0]
        return out.to(x.dtype)
