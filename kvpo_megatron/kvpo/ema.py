"""Exponential moving average (EMA) of the trainable LoRA weights.

After every optimizer step that updates the weights (skipped steps leave it alone, as in the KVPO release)::

    ema_w <- decay * ema_w + (1 - decay) * w          (float32; ema_w starts as the initial w)

Each rank keeps the EMA of its own parameter shards, so it is TP-sharded exactly like the LoRA (and identical
over DP, like the parameters). Training checkpoints store it under ``ema.<name>`` sharded like ``model.<name>``
(``checkpoint/training.py``); ``checkpoint/training_adapter.py`` reads it back as an adapter, and the trainer
also writes ``final_adapter_ema/`` at the end.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from kvpo_megatron.errors import ConfigError


@dataclass(kw_only=True, slots=True)
class EMAConfig:
    decay: float = 0.999
    """EMA decay per optimizer step (the KVPO release's ``ema_decay``); 0 disables the EMA."""

    def __post_init__(self) -> None:
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"ema.decay must be a number in [0, 1) (0 disables the EMA), got {self.decay!r}")

    @property
    def enabled(self) -> bool:
        return self.decay > 0


class ParameterEMA:
    """float32 EMA ("shadow") of named parameters, on the parameters' devices.

    ``named``: (name, parameter) pairs, e.g. ``lora.lora_parameters(model)``; names key the shadow tensors.
    """

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float):
        if not named:
            raise ConfigError("EMA: no parameters to average")
        self.decay = float(decay)
        self.params = dict(named)
        self.shadow: dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current parameters."""
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the current parameters (e.g. resuming from a checkpoint without EMA)."""
        for n, p in self.params.items():
            self.shadow[n].copy_(p.detach().float())

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters hold the EMA weights inside the block, and their own values again (bitwise) after it."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])
