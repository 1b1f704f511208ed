"""Composite reward: a weighted sum of named components, scored per prompt segment and averaged over segments.

Scores stay per component in ``RewardOutput.components`` so the KVPO objective can normalise advantages per
component; ``RewardOutput.total`` is the weighted sum.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from kvpo_megatron.dtypes import check_dtype_name, torch_dtype
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.rewards.base import RewardComponent, RewardOutput
from kvpo_megatron.rewards.builtin import BUILTIN_COMPONENTS
from kvpo_megatron.rewards.hpsv3 import HPSv3Reward
from kvpo_megatron.rewards.videoalign import VideoAlignReward

logger = logging.getLogger(__name__)


class RewardKind(StrEnum):
    BRIGHTNESS = "brightness"
    COLOR_TARGET = "color_target"
    COLORFULNESS = "colorfulness"
    TEMPORAL_CONSISTENCY = "temporal_consistency"
    MOTION = "motion"
    HPSV3 = "hpsv3"
    VIDEOALIGN = "videoalign"


MODEL_KINDS = (RewardKind.HPSV3, RewardKind.VIDEOALIGN)
MODEL_PARAMS = {
    RewardKind.HPSV3: {"batch_size", "frame_stride", "min_pixels", "max_pixels"},
    RewardKind.VIDEOALIGN: {"batch_size", "fps", "video_fps", "min_pixels", "max_pixels", "mq_grayscale",
                            "normalization", "prompt_template_file"},
}


@dataclass(kw_only=True, slots=True)
class RewardComponentConfig:
    kind: RewardKind
    """brightness | color_target | colorfulness | temporal_consistency | motion | hpsv3 | videoalign."""
    weight: float = 1.0
    """Weight in the total reward."""
    name: str | None = None
    """Component name in RewardOutput (default: the kind; videoalign_<dimension> for VideoAlign)."""
    dimension: str | None = None
    """videoalign: VQ | MQ | TA (one entry per dimension; entries with the same model share it)."""
    path: str | None = None
    """hpsv3: HPSv3.safetensors; videoalign: the VideoReward checkpoint folder."""
    base_path: str | None = None
    """hpsv3: Qwen2-VL-7B-Instruct folder; videoalign: Qwen2-VL-2B-Instruct folder."""
    device: str = "cpu"
    dtype: str = "bfloat16"
    """Model weight dtype (bfloat16 on GPU; float32 for CPU tests)."""
    offload: bool = False
    """Keep the model on CPU between calls, moving it to ``device`` only while scoring."""
    params: dict[str, Any] = field(default_factory=dict)
    """Built-ins: constructor kwargs (e.g. target). Models: see MODEL_PARAMS (e.g. fps, mq_grayscale)."""

    def __post_init__(self) -> None:
        try:
            self.kind = RewardKind(self.kind)
        except ValueError:
            raise ConfigError(f"rewards.kind={self.kind!r}: expected one of {[k.value for k in RewardKind]}")
        if not math.isfinite(self.weight):
            raise ConfigError(f"rewards[{self.kind}].weight={self.weight}: must be finite")
        check_dtype_name(self.dtype, f"rewards[{self.kind}].dtype")
        if self.kind in MODEL_KINDS:
            for fld in ("path", "base_path"):
                if not getattr(self, fld):
                    raise ConfigError(f"rewards[{self.kind}].{fld} is required (model weights for {self.kind})")
            bad = set(self.params) - MODEL_PARAMS[self.kind]
            if bad:
                raise ConfigError(f"rewards[{self.kind}].params: unknown {sorted(bad)}; "
                                  f"accepted {sorted(MODEL_PARAMS[self.kind])}")
        if self.kind == RewardKind.VIDEOALIGN and self.dimension not in ("VQ", "MQ", "TA"):
            raise ConfigError(f"rewards[videoalign].dimension={self.dimension!r}: expected VQ | MQ | TA")
        if self.name is None:
            self.name = f"videoalign_{self.dimension.lower()}" if self.kind == RewardKind.VIDEOALIGN else str(self.kind)


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    components: list[RewardComponentConfig] = field(
        default_factory=lambda: [RewardComponentConfig(kind=RewardKind.BRIGHTNESS)])
    """Reward components with weights; dict entries (from YAML) are converted."""

    def __post_init__(self) -> None:
        if not self.components:
            raise ConfigError("rewards.components is empty: name at least one reward component")
        self.components = [c if isinstance(c, RewardComponentConfig) else RewardComponentConfig(**c)
                           for c in self.components]
        names = [c.name for c in self.components]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"rewards.components: duplicate component names {dup}; set 'name' to tell them apart")


def spans_from_switch_frames(switch_frames: list[int], *, num_latent_frames: int,
                             num_frames: int) -> list[tuple[int, int]]:
    """Latent switch indices -> decoded-frame spans ``[start, end)``.

    ``T == F``: identity (preview decoder). ``T == 1 + r (F - 1)``: Wan's causal VAE (latent 0 -> frame 0,
    latent ``s >= 1`` -> frames ``1 + r (s - 1) .. r s``). ``T == r F``: ``r`` frames per latent.
    """
    f, t = num_latent_frames, num_frames
    if t == f:
        starts = list(switch_frames)
    elif f > 1 and (t - 1) % (f - 1) == 0:
        r = (t - 1) // (f - 1)
        starts = [1 + r * (s - 1) for s in switch_frames]
    elif t % f == 0:
        starts = [(t // f) * s for s in switch_frames]
    else:
        raise ConfigError(f"cannot map latent frames to video frames: F={f} latent, T={t} decoded")
    bounds = [0, *starts, t]
    return list(zip(bounds[:-1], bounds[1:]))


class CompositeReward:
    """``components``: name -> (component, weight). Call with frames ``[B, T, 3, H, W]`` and either one prompt per
    video, or per-video prompt lists with ``segments`` (per video, one ``[start, end)`` frame span per prompt)."""

    def __init__(self, components: dict[str, tuple[RewardComponent, float]]) -> None:
        if not components:
            raise ConfigError("CompositeReward needs at least one component")
        for name, (_, w) in components.items():
            if not math.isfinite(float(w)):
                raise ConfigError(f"reward component {name!r}: weight {w} is not finite")
        self.components = dict(components)
        self.weights = {name: float(w) for name, (_, w) in components.items()}

    def _plan(self, frames, prompts, segments) -> list[list[tuple[int, int, str]]]:
        b, t = frames.shape[:2]
        if len(prompts) != b:
            raise ConfigError(f"reward: {len(prompts)} prompt entries for {b} videos")
        per_video = [[p] if isinstance(p, str) else list(p) for p in prompts]
        if segments is None:
            for i, ps in enumerate(per_video):
                if len(ps) != 1:
                    raise ConfigError(f"reward: video {i} has {len(ps)} prompts but no segments were given")
            return [[(0, t, ps[0])] for ps in per_video]
        if len(segments) != b:
            raise ConfigError(f"reward: {len(segments)} segment lists for {b} videos")
        plan = []
        for i, (ps, spans) in enumerate(zip(per_video, segments)):
            if len(spans) != len(ps) or not spans:
                raise ConfigError(f"reward: video {i} has {len(spans)} segments but {len(ps)} prompts")
            for s, e in spans:
                if not 0 <= s < e <= t:
                    raise ConfigError(f"reward: video {i} segment [{s}, {e}) is empty or outside 0..{t} frames")
            plan.append([(s, e, p) for (s, e), p in zip(spans, ps)])
        return plan

    def __call__(self, frames: torch.Tensor, prompts: list[str] | list[list[str]],
                 segments: list[list[tuple[int, int]]] | None = None) -> RewardOutput:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ConfigError(f"reward: frames must be [B, T, 3, H, W], got shape {tuple(frames.shape)}")
        plan = self._plan(frames, prompts, segments)
        b = frames.shape[0]
        sums = {name: torch.zeros(b) for name in self.components}
        counts = torch.zeros(b)
        groups: dict[tuple[int, int], list[tuple[int, str]]] = {}
        for i, spans in enumerate(plan):
            for s, e, p in spans:
                groups.setdefault((s, e), []).append((i, p))
                counts[i] += 1
        for (s, e), members in groups.items():
            idx = [i for i, _ in members]
            sub = frames[:, s:e] if idx == list(range(b)) else frames[idx, s:e]  # one tensor shared by components
            texts = [p for _, p in members]
            for name, (comp, _) in self.components.items():
                scores = comp.score(sub, texts).detach().float().cpu()
                if scores.shape != (len(idx),):
                    raise ConfigError(f"reward component {name!r} returned shape {tuple(scores.shape)}, "
                                      f"expected ({len(idx)},)")
                sums[name][idx] += scores
        for comp, _ in self.components.values():
            if hasattr(comp, "release"):
                comp.release()
        return RewardOutput(components={n: v / counts for n, v in sums.items()}, weights=dict(self.weights))


def _model_kwargs(c: RewardComponentConfig) -> dict[str, Any]:
    """videoalign ``prompt_template_file``: your VideoAlign release's ``prompt_template.py`` (or the template
    text); without it the template is looked for beside the checkpoint (``rewards/videoalign_template.py``)."""
    kw = dict(c.params)
    if "normalization" in kw:
        kw["normalization"] = {d: tuple(v) for d, v in kw["normalization"].items()}
    return dict(kw, device=c.device, dtype=torch_dtype(c.dtype), offload=c.offload)


def build_reward(cfg: RewardConfig) -> CompositeReward:
    """Build every component (models sharing path/base/device/params are loaded once)."""
    models: dict[tuple, Any] = {}
    components: dict[str, tuple[RewardComponent, float]] = {}
    for c in cfg.components:
        if c.kind in MODEL_KINDS:
            key = (c.kind, c.path, c.base_path, c.device, c.dtype, c.offload, repr(sorted(c.params.items())))
            if key not in models:
                cls = HPSv3Reward if c.kind == RewardKind.HPSV3 else VideoAlignReward
                models[key] = cls.from_pretrained(c.path, base_path=c.base_path, **_model_kwargs(c))
            model = models[key]
            if c.kind == RewardKind.HPSV3:
                if any(m is model for m, _ in components.values()):
                    raise ConfigError(f"rewards: the HPSv3 model at {c.path} is listed twice")
                model.name = c.name
                comp = model
            else:
                comp = model.component(c.dimension, name=c.name)
        else:
            cls = BUILTIN_COMPONENTS[str(c.kind)]
            try:
                comp = cls(name=c.name, **c.params)
            except TypeError as e:
                raise ConfigError(f"rewards[{c.kind}].params={c.params}: {e}") from None
        components[c.name] = (comp, c.weight)
    logger.info("reward components: %s", {n: w for n, (_, w) in components.items()})
    return CompositeReward(components)
