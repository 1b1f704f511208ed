"""The KVPO training job's configuration tree and the embedded tiny default.

``KVPOTrainConfig()`` holds the method's defaults (the paper's LongLive setting: G=8, W=5, lr 1e-5, ...).
``TINY_DEFAULT`` overrides only what a 2-core CPU needs to show learning in minutes (tiny model, short video,
G=4, W=2, a larger learning rate, a built-in reward); it is what ``examples/train_kvpo.py`` runs with no
``--config``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvpo_megatron.checkpoint.training import CheckpointConfig
from kvpo_megatron.conditioning.text_encoder import TextEncoderConfig
from kvpo_megatron.conditioning.vae import DecoderConfig
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.generation import VideoConfig
from kvpo_megatron.kvpo.config import ObjectiveConfig, ReplayConfig, RolloutConfig, RoutingConfig
from kvpo_megatron.kvpo.ema import EMAConfig
from kvpo_megatron.kvpo.routing import routed_slots
from kvpo_megatron.kvpo.samples import LoggingConfig
from kvpo_megatron.lora import LoRAConfig
from kvpo_megatron.model.build import ModelSection
from kvpo_megatron.model.kv_cache import CacheConfig
from kvpo_megatron.parallel.state import ParallelConfig
from kvpo_megatron.rewards.composite import RewardConfig
from kvpo_megatron.sampling import SamplerConfig

TINY_PROMPTS = str(Path(__file__).resolve().parent.parent / "data" / "tiny_prompts.txt")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    lr: float = 1e-5
    """AdamW learning rate (constant after warmup)."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    """Global grad-norm clip."""
    warmup_steps: int = 5
    """Linear warmup steps."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    """AdamW epsilon."""

    def __post_init__(self):
        if not self.lr >= 0:
            raise ConfigError(f"optim.lr must be >= 0, got {self.lr}")
        if not self.grad_clip > 0:
            raise ConfigError(f"optim.grad_clip must be > 0 (a grad-norm bound), got {self.grad_clip}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    prompts: str = TINY_PROMPTS
    """Prompt file: plain text (one per line) or JSONL multi-prompt sequences."""
    prompts_per_rank: int = 1
    """Prompt groups per DP rank per iteration."""
    num_segments: int | None = None
    """JSONL: prompts per sequence (None = as in the file)."""
    switch_interval: int | None = None
    """JSONL: latent frames between prompt switches (paper long setting: 147)."""


@dataclass(kw_only=True, slots=True)
class TrainLoopConfig:
    iterations: int = 100
    seed: int = 0
    out_dir: str = "runs/kvpo"
    """Metrics (metrics.jsonl, tensorboard/), reward_curve.png, checkpoints and the final adapter go here."""
    max_consecutive_skips: int = 5
    """Stop with an error after this many consecutive non-finite (NaN/Inf) updates."""
    progress: bool = True
    rollout_archive: str | None = None
    """Optional zarr directory receiving every iteration's latents, rewards, advantages, TVEs and routes."""
    overlap: bool = False
    """Pipeline the prompt groups of an iteration: rollout of group j+1 overlaps reward, coefficients and replay
    of group j (separate CUDA stream / worker thread; exact, see kvpo/pipeline.py). Needs TP=CP=1, the local
    spec and sampler.context_noise=0; per-phase spans go to out_dir/timeline.jsonl."""
    overwrite: bool = False
    """A fresh run (nothing to resume) into an ``out_dir`` holding another run's files deletes them (metrics,
    TensorBoard, plot, final adapter; and, with ``checkpoint.resume=never``, that run's checkpoints) instead of
    refusing to start."""

    def __post_init__(self):
        if self.iterations < 1:
            raise ConfigError(f"train.iterations must be >= 1, got {self.iterations}")
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"train.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        if not self.out_dir:
            raise ConfigError("train.out_dir must be a directory path, got an empty string")


@dataclass(kw_only=True)
class KVPOTrainConfig:
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="wan-1.3b"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    video: VideoConfig = field(default_factory=lambda: VideoConfig(num_frames=21, latent_height=60, latent_width=104))
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the LoRA weights (saved in checkpoints, ``final_adapter_ema/``)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Sample videos during training, Weights & Biases."""
    recache_on_switch: bool = True
    """LongLive recache of the local window at prompt switches."""

    def __post_init__(self):
        if self.video.num_frames % self.cache.frames_per_block:
            raise ConfigError(f"video.num_frames ({self.video.num_frames}) is not a multiple of "
                              f"cache.frames_per_block ({self.cache.frames_per_block})")
        routed_slots(self.cache, self.routing)  # the fixed slots fit the cache's local window
        if self.routing.num_recent_fixed < self.cache.frames_per_block:
            raise ConfigError(f"routing.num_recent_fixed ({self.routing.num_recent_fixed}) must keep at least the "
                              f"current block ({self.cache.frames_per_block} frames)")


# Why these values: a random tiny DiT barely depends on its attended context at megatron's default init
# (std 0.02: branches differ by ~4e-5 relative), so the tiny default initialises linears with std 0.3
# (~5e-3 relative divergence); 18 latent frames is the shortest video whose pivot (block 4, |R| = 9 > 6)
# leaves a 2-block window. So that the run shows the method and not only the direction of the update:
# routing every solver step (routing.steps=all) doubles the branches' divergence (TVE ~1e-2, spread ~5e-3), and
# tau = 3e-3 sets the Gibbs temperature on that scale (the method's tau = 1 against TVEs of 1e-2 is a uniform
# policy: entropy ln G at every iteration, KL < 2e-4). At this temperature the KL to the adapter-free reference
# is O(0.1-10) once the LoRA moves, so beta = 0.1 (the method's 10 would hold the tiny model at the reference for
# the whole 30 iterations) and Adam at lr 3e-3 (1e-2 collapses the model's context dependence, so the policy
# turns uniform again within ~10 iterations). EMA decay 0.9 averages over the ~10 last steps of a 30-step run.
TINY_DEFAULT: dict = {
    "model": {"preset": "tiny", "overrides": {"init_method_std": 0.3}},
    "video": {"num_frames": 18, "latent_height": 8, "latent_width": 8},
    "routing": {"window_blocks": 2, "steps": "all"},
    "rollout": {"num_branches": 4},
    "objective": {"tau": 3e-3, "beta": 0.1},
    "lora": {"rank": 8, "alpha": 8.0},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "decoder": {"kind": "preview", "latent_channels": 4},
    "reward": {"components": [{"kind": "brightness", "weight": 1.0, "params": {"target": 1.0}}]},
    "train": {"iterations": 30, "out_dir": "runs/kvpo_tiny"},
    "ema": {"decay": 0.9},
    "logging": {"sample_every": 10},
}


# ------------------------------------------------------------------------------------------ resume
RESUMABLE = ("optim.", "objective.", "checkpoint.", "parallel.", "train.iterations", "train.progress",
             "train.max_consecutive_skips", "train.out_dir", "train.overwrite", "train.rollout_archive",
             "train.overlap", "ema.", "logging.", "model.compile", "model.cuda_graphs", "model.te_compile",
             "model.overrides.split_attention")
"""Fields (dotted prefixes) that may differ from the checkpoint's config on resume: optimizer hyper-parameters
(applied to the restored optimizer and schedule), the objective's, checkpointing, the parallel layout
(checkpoints reshard), the loop's length/logging, the EMA's decay (the restored average continues with the new
one), sample videos / W&B, and the execution features that choose kernels, not the model (compile, CUDA graphs,
``te_compile``, the split attention's kernels). A field the checkpoint's config lacks (added since) counts as
its default. Every other field (model, LoRA, video, cache, sampler,
routing, rollout, reward, text, decoder, data, seed) must match: a resume refuses a change there."""


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def resume_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """Differences between a checkpoint's config and this run's (both ``to_dict`` trees), as lines
    ``field: old -> new``, split into (allowed on resume, refused)."""
    a, b = _flatten(saved), _flatten(now)
    allowed, refused = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            line = f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
            (allowed if key.startswith(RESUMABLE) else refused).append(line)
    return allowed, refused
