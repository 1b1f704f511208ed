"""KVPO method settings: one dataclass per concept, each field with the method's default."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kvpo_megatron.errors import ConfigError


class RoutingSampler(StrEnum):
    uniform = "uniform"  # each branch samples its routed frames independently, uniformly without replacement
    dispersed = "dispersed"  # branches take consecutive chunks of one shared permutation: minimal overlap


class RoutedSteps(StrEnum):
    first_half = "first_half"  # only the first half of a routed block's solver steps see the routed window
    all = "all"


class CommitPass(StrEnum):
    unrouted = "unrouted"  # the t=0 pass writing a routed block's clean K/V sees the normal cache
    routed = "routed"


class Baseline(StrEnum):
    anchor = "anchor"  # A_k = (r_k - r_anchor) / (std over branches and anchor + 1e-6)
    group_mean = "group_mean"  # A_k = (r_k - mean_k r) / (std over branches + 1e-6)


@dataclass(kw_only=True, slots=True)
class RoutingConfig:
    """Causal History Routing (CHR). The routed window is the cache's local window (``cache.local_attn_frames``
    slots, the block included); ``kvpo/routing.py`` ``routed_slots`` gives how many of them are routed."""

    num_recent_fixed: int = 3
    """Last slots of the window kept as they are (3 = exactly the current block; LongLive release: 4)."""
    sampler: RoutingSampler = RoutingSampler.uniform
    """How branches pick their routed frames."""
    window_blocks: int = 5
    """W: blocks routed from the pivot on."""
    steps: RoutedSteps = RoutedSteps.first_half
    """Which solver steps of a routed block are routed."""
    commit_pass: CommitPass = CommitPass.unrouted
    """Context seen by the pass that writes a routed block's K/V."""
    pivot_min_block: int | None = None
    """First allowed pivot block; None = the first block whose routable set exceeds the routed slots."""
    pivot_max_block: int | None = None
    """Last allowed pivot block; None = the last block of the video."""

    def __post_init__(self):
        if self.num_recent_fixed < 1:
            raise ConfigError(f"routing.num_recent_fixed must be >= 1, got {self.num_recent_fixed}")
        if self.window_blocks < 1:
            raise ConfigError(f"routing.window_blocks must be >= 1, got {self.window_blocks}")


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    num_branches: int = 8
    """G: routed branches per prompt (plus one unrouted anchor)."""
    shared_noise: bool = True
    """All branches reuse the anchor's per-block initial noise, so routing is the only difference."""
    shared_step_noise: bool = True
    """Re-noising sampler: the fresh noise of each (block, step) is shared by the anchor and every branch (keyed by
    seed, iteration, prompt, block, step); False gives each branch its own draws."""
    batch_size: int | None = None
    """Samples (anchor + branches) advanced together as one batch after the pivot; None = automatic (all of them
    when their KV pages fit ``kv_budget_gb``, else the largest count that fits). The samples are split into the
    fewest batches of at most this size, of sizes differing by at most one (``split_evenly``)."""
    kv_budget_gb: float = 24.0
    """Device memory the rollout's KV pages may take (shared prefix + every batched sample's private frames);
    sets the automatic ``batch_size`` on a GPU."""
    merge_lora: bool = True
    """Fold the adapters into the weights for the no-grad generation (no extra matmuls); scoring and replay use
    the unmerged trainable form, and the replay's context rebuild the merged one, so pi_old is evaluated exactly
    as the replay evaluates pi_theta at the same parameters."""

    def __post_init__(self):
        if self.num_branches < 2:
            raise ConfigError(f"rollout.num_branches must be >= 2, got {self.num_branches}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"rollout.batch_size must be a positive integer or null, got {self.batch_size!r}")
        if not self.kv_budget_gb > 0:
            raise ConfigError(f"rollout.kv_budget_gb must be > 0, got {self.kv_budget_gb!r}")


def split_evenly(items: list, most: int) -> list[list]:
    """``items`` in order, in the fewest chunks of at most ``most`` whose sizes differ by at most one (the rollout's
    sample batches: 4 samples at most 3 give 2 + 2, not 3 + 1, whose lone sample runs at a poor GEMM size)."""
    if most < 1:
        raise ValueError(f"chunks need a positive size, got {most}")
    n = -(-len(items) // most)
    q, r = divmod(len(items), max(n, 1))
    out, i = [], 0
    for j in range(n):
        size = q + (j < r)
        out.append(items[i:i + size])
        i += size
    return out


class Recompute(StrEnum):
    auto = "auto"  # recompute each block's activations in the backward when the replay batch would not fit
    none = "none"  # keep every activation
    blocks = "blocks"  # always recompute per DiT block (activation checkpointing)


@dataclass(kw_only=True, slots=True)
class ReplayConfig:
    """The gradient phase (coefficient replay)."""

    batch_size: int | None = None
    """(branch, step) tuples of one block replayed together in one forward + backward; None = automatic (as many
    as ``memory_budget_gb`` holds on a GPU; every tuple of the block on the CPU). Branches are replayed in chunks of
    ``batch_size // tuples per branch and block`` (at least one), so with 2 routed steps per block an odd size
    leaves a slot unused (3 runs batches of 2)."""
    recompute: Recompute = Recompute.auto
    """Per-block activation recompute in the replay's backward."""
    memory_budget_gb: float = 24.0
    """Device memory the replay's activations may take; sets the automatic batch size and recompute (with
    ``rollout.kv_budget_gb`` and the model, what bounds an iteration's peak). Larger batches run faster: wan-1.3b
    at 480x832 on an H200 (~17 GB per tuple), 147 frames, G=8, W=5, TE + compile + graphs: the default gives 1
    tuple per batch (replay 48.3 s, peak 52.9 GB; 2026-11-29), 60 gives 2 (30.7 s, 69.6 GB), 80 gives 4 (20.4 s,
    99.5 GB; 17.8 s with ``model.overrides.split_attention=cudnn``); ``tools/BENCHMARKS.md``. The default keeps an
    80 GB GPU's peak in bounds."""

    def __post_init__(self):
        try:
            self.recompute = Recompute(self.recompute)
        except ValueError:
            raise ConfigError(f"replay.recompute must be one of {[r.value for r in Recompute]}, got {self.recompute!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"replay.batch_size must be a positive integer or null, got {self.batch_size!r}")
        if not self.memory_budget_gb > 0:
            raise ConfigError(f"replay.memory_budget_gb must be > 0, got {self.memory_budget_gb!r}")


@dataclass(kw_only=True, slots=True)
class ObjectiveConfig:
    tau: float = 1.0
    """Gibbs temperature: pi(k) = softmax_k(-TVE_k / tau)."""
    eps_low: float = 0.1
    """Lower clip: ratios below 1 - eps_low are clipped."""
    eps_high: float = 0.2
    """Upper clip: ratios above 1 + eps_high are clipped."""
    adv_clip: float = 2.5
    """Advantages are clipped to [-adv_clip, adv_clip]."""
    baseline: Baseline = Baseline.anchor
    """Advantage baseline."""
    beta: float = 10.0
    """KL weight."""
    guard: bool = True
    """Skip the update when no branch reward exceeds the anchor reward."""

    def __post_init__(self):
        if self.tau <= 0:
            raise ConfigError(f"objective.tau must be > 0, got {self.tau}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ConfigError(f"objective.eps_low must be in [0,1) and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
