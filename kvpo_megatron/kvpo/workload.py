"""What one KVPO prompt group computes, counted from the configuration (benchmarks and the memory model).

For a video of ``F`` latent frames in blocks of ``f`` frames (``n = F / f`` blocks), pivot block ``p``, window
``W`` and ``G`` branches:

* the prefix (blocks ``0..p-1``) is generated once and shared;
* the anchor and every branch generate blocks ``p..n-1``: ``(G + 1) (n - p)`` blocks;
* latent frames denoised per group: ``f (p + (G + 1)(n - p))`` (shared prefix counted once);
* the window is blocks ``p .. min(p + W, n) - 1``; each branch stores one replay tuple per routed solver step
  of each window block: ``G * |window| * routed_steps`` tuples per group, each replayed once with gradients;
* video frames = 4 x latent frames (Wan's VAE: 4 video frames per latent frame after the first).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from kvpo_megatron.kvpo import routing as chr

VIDEO_FRAMES_PER_LATENT = 4


@dataclass(frozen=True, kw_only=True)
class GroupWorkload:
    blocks: int
    pivot: int
    window: int
    """Routed blocks (W, cut at the end of the video)."""
    routed_steps: int
    """Routed solver steps per window block (replay tuples per branch and block)."""
    branches: int
    frames_per_block: int

    @property
    def latent_frames(self) -> int:
        """Latent frames denoised: the shared prefix once, then the anchor's and every branch's suffix."""
        return self.frames_per_block * (self.pivot + (self.branches + 1) * (self.blocks - self.pivot))

    @property
    def video_frames(self) -> int:
        return VIDEO_FRAMES_PER_LATENT * self.latent_frames

    @property
    def tuples(self) -> int:
        """Replay tuples (one gradient block-step each) of all branches."""
        return self.branches * self.window * self.routed_steps

    def to_dict(self) -> dict:
        return {**asdict(self), "latent_frames": self.latent_frames, "video_frames": self.video_frames,
                "tuples": self.tuples}


def default_pivot(cfg) -> int:
    """The middle of the allowed pivot range (the expected work of a sampled pivot); ``cfg``: KVPOTrainConfig."""
    lo, hi = chr.pivot_range(cfg.cache, cfg.routing, cfg.video.num_frames // cfg.cache.frames_per_block)
    return (lo + hi) // 2


def group_workload(cfg, pivot: int) -> GroupWorkload:
    """Work of one prompt group whose pivot is ``pivot`` (``cfg``: a ``KVPOTrainConfig``)."""
    fpb = cfg.cache.frames_per_block
    blocks = cfg.video.num_frames // fpb
    steps = len(cfg.sampler.timesteps)
    return GroupWorkload(blocks=blocks, pivot=pivot, window=min(cfg.routing.window_blocks, blocks - pivot),
                         routed_steps=sum(chr.is_routed_step(cfg.routing, s, steps) for s in range(steps)),
                         branches=cfg.rollout.num_branches, frames_per_block=fpb)
