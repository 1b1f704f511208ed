"""Keyed noise: every random draw of a stream is a pure function of a key, so runs can be replayed exactly.

The re-noising sampler draws fresh noise at every (block, step). KVPO needs that noise to be the same for the
anchor and every branch by default (branches then differ by routing alone), and reproducible from
(seed, iteration, prompt, block, step) whatever the batch layout; a switch gives each branch its own draws.
"""
from __future__ import annotations

import numpy as np
import torch


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``key`` (any ints)."""
    seed = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def keyed_randn(shape, *key: int) -> torch.Tensor:
    """Standard normal float32 CPU tensor of ``shape`` drawn from ``keyed_generator(*key)``."""
    return torch.randn(shape, generator=keyed_generator(*key))


class StepNoise:
    """Fresh noise of the re-noising sampler for each (block, step) of a batch of samples.

    ``key``: the stream's key (e.g. seed, iteration, prompt). ``samples``: one id per batch row when every sample
    draws its own noise (keyed by its id); None shares one draw among all rows.
    """

    def __init__(self, *key: int, samples: list[int] | None = None):
        self.key, self.samples = tuple(int(k) for k in key), samples

    def for_samples(self, samples: list[int] | None) -> "StepNoise":
        return StepNoise(*self.key, samples=samples)

    def __call__(self, block: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """Noise shaped like ``like`` ([b, C, F, H, W]) on its device and dtype."""
        b, rest = like.shape[0], tuple(like.shape[1:])
        if self.samples is None:
            eps = keyed_randn((1, *rest), *self.key, block, step, 0x5EED).expand(b, *rest)
        else:
            if len(self.samples) != b:
                raise ValueError(f"StepNoise has {len(self.samples)} sample ids for a batch of {b}")
            eps = torch.cat([keyed_randn((1, *rest), *self.key, block, step, 0x5EED, s + 1) for s in self.samples])
        return eps.to(device=like.device, dtype=like.dtype)
