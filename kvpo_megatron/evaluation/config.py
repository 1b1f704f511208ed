"""Configuration of ``tools/evaluate.py``: the two settings (held-out prompts) and what is compared.

The model, sampler, cache, decoder and reward come from the training configuration (``KVPOTrainConfig``: the
first training checkpoint's saved config, or ``--config``/``--preset``/the tiny default); this section only says
what to generate and which weights to compare.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kvpo_megatron.errors import ConfigError

_DATA = Path(__file__).resolve().parent.parent / "data"
TINY_EVAL_SHORT = str(_DATA / "tiny_eval_prompts.txt")
TINY_EVAL_LONG = str(_DATA / "tiny_eval_long.jsonl")


class WeightsChoice(StrEnum):
    raw = "raw"  # a training checkpoint's trained LoRA
    ema = "ema"  # its EMA (kvpo/ema.py)
    both = "both"  # one column each


@dataclass(kw_only=True, slots=True)
class EvalSetting:
    """One generation setting over a held-out prompt file."""

    prompts: str
    """``.txt`` (one prompt per line: single-prompt videos) or ``.jsonl`` (``{"prompts": [...],
    "switch_frames": [...]}`` per line: multi-prompt videos with switches)."""
    num_frames: int | None = None
    """Latent frames per video (None: ``video.num_frames`` of the training config times ``length_factor``)."""
    length_factor: int = 1
    """Used when ``num_frames`` is None: videos ``length_factor`` times the training length."""
    num_segments: int | None = None
    """JSONL: prompts per video (None: as in the file)."""
    switch_interval: int | None = None
    """JSONL without switch_frames: latent frames between switches (None: equal segments, block aligned)."""
    max_prompts: int | None = None
    """Use only the first this many prompts (None: all)."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("eval.<setting>.prompts must name a prompt file")
        for name in ("num_frames", "num_segments", "switch_interval", "max_prompts"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"eval.<setting>.{name} must be a positive integer or null, got {v!r}")
        if isinstance(self.length_factor, bool) or not isinstance(self.length_factor, int) or self.length_factor < 1:
            raise ConfigError(f"eval.<setting>.length_factor must be a positive integer, got {self.length_factor!r}")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    short: EvalSetting | None = field(default_factory=lambda: EvalSetting(prompts=TINY_EVAL_SHORT))
    """Single-prompt short videos (None: skipped)."""
    long: EvalSetting | None = field(default_factory=lambda: EvalSetting(prompts=TINY_EVAL_LONG, length_factor=2))
    """Multi-prompt long videos with prompt switches (None: skipped)."""
    weights: WeightsChoice = WeightsChoice.both
    """Training checkpoints: ``raw``, ``ema`` or ``both`` (``both`` skips EMA where a checkpoint has none)."""
    base: bool = True
    """Also evaluate the base model (adapters off)."""
    seed: int = 0
    """Noise seed; every model gets the same noise for a given prompt (paired comparison)."""
    fps: int = 16
    """Frame rate of the written mp4s."""
    progress: bool = True

    def __post_init__(self) -> None:
        try:
            self.weights = WeightsChoice(self.weights)
        except ValueError:
            raise ConfigError(f"eval.weights must be one of {[w.value for w in WeightsChoice]}, got {self.weights!r}")
        for name in ("short", "long"):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, EvalSetting(**v))
        if self.short is None and self.long is None:
            raise ConfigError("eval.short and eval.long are both null: nothing to evaluate")
        if not isinstance(self.fps, int) or self.fps < 1:
            raise ConfigError(f"eval.fps must be a positive integer, got {self.fps!r}")

    def settings(self) -> dict[str, EvalSetting]:
        return {n: s for n, s in (("short", self.short), ("long", self.long)) if s is not None}
