"""Typed hand-offs between the KVPO rollout, the replay and the trainer (shapes in comments).

``C`` latent channels, ``F`` frames per block, ``F_total`` frames of the video, ``H``/``W`` latent size,
``Lt`` text tokens, ``G`` branches of this rank, ``G_all`` branches of the prompt (all DP ranks with
``parallel.branches_over_dp``, else ``G``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpo_megatron.kvpo.objective import LossTerms
from kvpo_megatron.model.kv_cache import KVCache
from kvpo_megatron.sampling.streaming import PromptSwitch


@dataclass(kw_only=True)
class PromptContext:
    """Prompt embeddings [1, Lt, text_dim] applying from latent frame ``start_frame`` on."""

    start_frame: int
    context: torch.Tensor
    shot_boundary: bool = False
    """A new shot starts here (LongLive 2.0's scene cut; ``cache.shot_sinks``)."""


@dataclass(kw_only=True)
class ReplayTuple:
    """One routed (block, solver step) of a branch: what the replay re-runs under the unrouted context."""

    block: int
    step: int
    start: int
    """First frame of the block."""
    x: torch.Tensor
    """[1, C, F, H, W] noisy latents fed to the model at this step."""
    timestep: float
    v_target: torch.Tensor
    """[1, C, F, H, W] rollout (routed) velocity."""


@dataclass(kw_only=True)
class BranchRollout:
    branch: int
    """Branch index; -1 for the anchor."""
    latents: torch.Tensor
    """[1, C, F_total, H, W] clean latents of the whole video."""
    routes: dict[int, list[int]] = field(default_factory=dict)
    """block -> routed frames (sorted)."""
    commit_frames: dict[int, list[int]] = field(default_factory=dict)
    """block -> frames read by that block's commit pass (for an exact context rebuild)."""
    tuples: list[ReplayTuple] = field(default_factory=list)
    tve_old: float = 0.0
    """TVE with the rollout's weights (defines pi_old)."""
    tve_ref: float = 0.0
    """TVE with adapters disabled (defines pi_ref)."""


@dataclass(kw_only=True)
class RolloutGroup:
    """One prompt's rollout on this rank: shared prefix, anchor, the rank's branches."""

    iteration: int
    prompt_index: int
    pivot: int
    window: list[int]
    """Routed blocks [pivot, pivot + W) (clipped to the video)."""
    contexts: list[PromptContext]
    prompts: list[PromptSwitch]
    """The prompt schedule encoded with the rollout's weights (no grad)."""
    anchor: BranchRollout | None
    """None on the DP ranks that do not roll it out (branches over DP: ``kvpo/branch_schedule.py``)."""
    branches: list[BranchRollout]
    fork_state: KVCache
    """The frozen prefix cache (every frame before the pivot); forks of it rebuild a branch's context."""
    private_frames: int
    """Private ring pages per sample the rollout's fork needed (post-pivot frames still read)."""
    forwards: int
    """Model forward calls issued by the rollout (prefix once + batched anchor/branches + scoring)."""
    sample_forwards: int
    """Forwards times their batch size."""


@dataclass(kw_only=True)
class GroupResult:
    """One prompt group scored, with its objective's coefficients (the trainer's per-group hand-off)."""

    group: RolloutGroup
    rewards: dict[str, torch.Tensor]
    """Reward component -> [G_all] per branch."""
    anchor: dict[str, float]
    """Reward component -> the anchor's."""
    total: torch.Tensor
    """[G_all] weighted sum of the components."""
    anchor_total: float
    adv: torch.Tensor
    """[G_all] advantages."""
    coeffs: torch.Tensor
    """[G] dLoss/dTVE of this rank's branches (zeros when the guard skipped the group)."""
    terms: LossTerms
    """The objective's terms at the rollout's parameters (loss, PPO, KL, ratios, clip fraction, entropy)."""
    tve: torch.Tensor
    """[G_all] TVE_old."""
    passed_guard: bool
    all_coeffs: torch.Tensor | None = None
    """[G_all] dLoss/dTVE of every branch of the prompt (zeros when the guard skipped the group)."""
    tve_replay: torch.Tensor | None = None
    """[G_all] TVE of the branches this rank replayed (at pi_old's parameters; 0 for the others), when it ran."""
    replayed: list[int] = field(default_factory=list)
    """Branch ids this rank replayed with grad (with branches over DP not always the ones it rolled out)."""
