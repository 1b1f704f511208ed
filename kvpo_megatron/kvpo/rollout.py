"""KVPO rollout: one shared prefix, an unrouted anchor, and G CHR-routed branches.

1. The prefix (blocks before the pivot) is generated once; its cache is snapshotted (the fork state).
2. The anchor restores the fork state and generates the rest unrouted (== plain generation, bit for bit).
3. Each branch restores the fork state and generates the rest; blocks in the window ``[pivot, pivot+W)`` attend
   to CHR-routed windows on their routed solver steps, and every routed step's ``(x_{b,s}, t_s, v_target)`` is
   stored as a replay tuple. Right after a routed block is denoised — while the branch's own unrouted context
   is live in the cache — its tuples are *scored*: replayed without grad under the unrouted view, with the
   current weights (TVE_old, i.e. pi_old) and with adapters disabled (TVE_ref). See ARCHITECTURE.md
   "Replay without holding every branch's graph".
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import numpy as np
import torch

from kvpo_megatron.kvpo import routing as chr
from kvpo_megatron.kvpo.config import CommitPass, RolloutConfig, RoutingConfig
from kvpo_megatron.kvpo.objective import tve_term
from kvpo_megatron.model.kv_cache import CacheSnapshot, KVCache
from kvpo_megatron.sampling import PromptSwitch, StreamingGenerator


@dataclass(kw_only=True)
class ReplayTuple:
    block: int
    step: int
    start: int
    """First frame of the block."""
    x: torch.Tensor
    """[1, C, F, H, W] noisy latents fed to the model at this step."""
    timestep: float
    v_target: torch.Tensor
    """Rollout (routed) velocity."""


@dataclass(kw_only=True)
class BranchRollout:
    branch: int
    """Branch index; -1 for the anchor."""
    latents: torch.Tensor
    """[1, C, F_total, H, W] clean latents of the whole video."""
    routes: dict[int, list[int]] = field(default_factory=dict)
    """block -> routed frames."""
    commit_frames: dict[int, list[int]] = field(default_factory=dict)
    """block -> frames read by that block's commit pass (for an exact context rebuild)."""
    tuples: list[ReplayTuple] = field(default_factory=list)
    tve_old: float = 0.0
    """TVE with the rollout's weights (defines pi_old)."""
    tve_ref: float = 0.0
    """TVE with adapters disabled (defines pi_ref)."""


@dataclass(kw_only=True)
class PromptContext:
    """Prompt embeddings [1, Lt, text_dim] applying from latent frame ``start_frame`` on."""

    start_frame: int
    context: torch.Tensor


def encode_prompts(model, contexts: list[PromptContext]) -> list[PromptSwitch]:
    """Cross-attention K/V of every prompt under the model's current state (adapters on or off)."""
    return [PromptSwitch(c.start_frame, model.encode_text(c.context)) for c in contexts]


@dataclass(kw_only=True)
class RolloutGroup:
    iteration: int
    prompt_index: int
    pivot: int
    window: list[int]
    contexts: list[PromptContext]
    prompts: list[PromptSwitch]
    anchor: BranchRollout
    branches: list[BranchRollout]
    fork_state: CacheSnapshot
    forwards: int
    """Model forwards issued by the rollout (prefix once + anchor + branches + scoring)."""



def active_at(schedule: list, frame: int):
    """The entry of a prompt schedule (``PromptSwitch`` or ``PromptContext``, sorted by ``start_frame``) in force
    at latent frame ``frame``."""
    cur = schedule[0]
    for p in schedule:
        if p.start_frame <= frame:
            cur = p
    return cur


def text_at(prompts: list[PromptSwitch], frame: int):
    return active_at(prompts, frame).text


class BlockDriver:
    """Drives the streaming loop block by block (prompt switches, commits) for rollout and replay alike."""

    def __init__(self, gen: StreamingGenerator, prompts: list[PromptSwitch]):
        self.gen, self.prompts = gen, prompts
        self.fpb = gen.cache_cfg.frames_per_block

    def enter(self, cache: KVCache, latents: torch.Tensor, block: int):
        """Text of ``block``; performs the LongLive recache when a prompt switch starts here."""
        s = block * self.fpb
        if s > 0 and self.gen.recache_on_switch and any(p.start_frame == s for p in self.prompts):
            self.gen.recache(cache, latents, s, text_at(self.prompts, s))
        return text_at(self.prompts, s)

    def commit(self, cache: KVCache, latents: torch.Tensor, block: int, read_frames: list[int] | None):
        s = block * self.fpb
        self.gen.commit_block(cache, latents[:, :, s:s + self.fpb], s, text_at(self.prompts, s),
                              read_frames=read_frames)


class Rollout:
    def __init__(self, gen: StreamingGenerator, routing: RoutingConfig, cfg: RolloutConfig, *, seed: int,
                 reference: Callable[[], ContextManager] | None = None):
        self.gen, self.routing, self.cfg, self.seed = gen, routing, cfg, seed
        self.reference = reference or contextlib.nullcontext
        self.cache_cfg = gen.cache_cfg

    def noise(self, shape, *, iteration: int, prompt: int, branch: int) -> torch.Tensor:
        key = np.random.SeedSequence([self.seed, iteration, prompt, branch + 1, 0x401]).generate_state(1)[0]
        return torch.randn(shape, generator=torch.Generator().manual_seed(int(key)))

    @torch.no_grad()
    def run(self, contexts: list[PromptContext], shape: tuple[int, ...], *, iteration: int, prompt_index: int,
            pivot: int | None = None, branch_ids: list[int] | None = None, device=None) -> RolloutGroup:
        """Roll out one prompt group. ``branch_ids`` selects which branches this rank runs (branches over DP)."""
        fpb = self.cache_cfg.frames_per_block
        nblocks = shape[2] // fpb
        prompts = encode_prompts(self.gen.model, contexts)
        with self.reference():  # per call (not instance state): rollouts may run on several threads
            ref_prompts = encode_prompts(self.gen.model, contexts)
        if pivot is None:
            pivot = chr.sample_pivot(self.cache_cfg, self.routing, nblocks, seed=self.seed, iteration=iteration,
                                     prompt=prompt_index)
        window = list(range(pivot, min(nblocks, pivot + self.routing.window_blocks)))
        count0 = self.gen.forward_count
        noise = self.noise(shape, iteration=iteration, prompt=prompt_index, branch=-1).to(device)
        driver = BlockDriver(self.gen, prompts)
        cache = self.gen.new_cache()
        prefix = torch.zeros_like(noise)
        for b in range(pivot):
            self._plain_block(cache, driver, prefix, noise, b)
        fork = cache.snapshot()
        anchor = BranchRollout(branch=-1, latents=prefix.clone())
        cache.restore(fork)
        for b in range(pivot, nblocks):
            self._plain_block(cache, driver, anchor.latents, noise, b)
        branches = []
        for g in (range(self.cfg.num_branches) if branch_ids is None else branch_ids):
            bnoise = noise if self.cfg.shared_noise else \
                self.noise(shape, iteration=iteration, prompt=prompt_index, branch=g).to(device)
            cache.restore(fork)
            branches.append(self._branch(cache, driver, prefix.clone(), bnoise, g, pivot, window, nblocks,
                                         iteration=iteration, prompt_index=prompt_index, ref_prompts=ref_prompts))
        return RolloutGroup(iteration=iteration, prompt_index=prompt_index, pivot=pivot, window=window,
                            contexts=contexts, prompts=prompts, anchor=anchor, branches=branches, fork_state=fork,
                            forwards=self.gen.forward_count - count0)

    def _plain_block(self, cache, driver: BlockDriver, latents, noise, b):
        s = b * driver.fpb
        text = driver.enter(cache, latents, b)
        latents[:, :, s:s + driver.fpb] = self.gen.denoise_block(cache, noise[:, :, s:s + driver.fpb], s, text)
        driver.commit(cache, latents, b, None)

    def _branch(self, cache: KVCache, driver: BlockDriver, latents, noise, g, pivot, window, nblocks, *,
                iteration, prompt_index, ref_prompts: list[PromptSwitch]) -> BranchRollout:
        out = BranchRollout(branch=g, latents=latents)
        fpb, n_steps = driver.fpb, self.gen.sampler.num_steps
        for b in range(pivot, nblocks):
            if b not in window:
                self._plain_block(cache, driver, latents, noise, b)
                continue
            s = b * fpb
            text = driver.enter(cache, latents, b)
            routed = chr.sample_routes(self.cache_cfg, self.routing, s, cache.resident_frames(),
                                       num_branches=g + 1, seed=self.seed, iteration=iteration,
                                       prompt=prompt_index, block=b)[g]
            routed_view = chr.routed_read_frames(self.cache_cfg, self.routing, s, routed)
            default_view = self.cache_cfg.default_read_frames(s, fpb)
            out.routes[b] = routed

            def frames_for(step):
                return routed_view if chr.is_routed_step(self.routing, step, n_steps) else default_view

            def record(step, x, t, v):
                if chr.is_routed_step(self.routing, step, n_steps):
                    out.tuples.append(ReplayTuple(block=b, step=step, start=s, x=x.clone(), timestep=t,
                                                  v_target=v.clone()))

            latents[:, :, s:s + fpb] = self.gen.denoise_block(cache, noise[:, :, s:s + fpb], s, text,
                                                              read_frames_for_step=frames_for, on_step=record)
            block_tuples = [t for t in out.tuples if t.block == b]
            out.tve_old += float(score_tuples(self.gen, cache, block_tuples, text).sum())
            with self.reference():
                ref_text = text_at(ref_prompts, s)
                out.tve_ref += float(score_tuples(self.gen, cache, block_tuples, ref_text).sum())
            commit = routed_view if self.routing.commit_pass == CommitPass.routed else default_view
            out.commit_frames[b] = commit
            driver.commit(cache, latents, b, commit)
        return out


def replay_velocity(gen: StreamingGenerator, cache: KVCache, tup: ReplayTuple, text) -> torch.Tensor:
    """v_replay: the model on the tuple's latents under the unrouted view of ``cache`` (no write)."""
    view = cache.view(gen.cache_cfg.default_read_frames(tup.start, tup.x.shape[2]), device=tup.x.device)
    return gen._forward(tup.x, tup.timestep, tup.start, text, cache, view)


def score_tuples(gen: StreamingGenerator, cache: KVCache, tuples: list[ReplayTuple], text) -> torch.Tensor:
    """Per-tuple TVE terms without grad: [n]."""
    with torch.no_grad():
        terms = [tve_term(t.v_target, replay_velocity(gen, cache, t, text)) for t in tuples]
    return torch.cat(terms) if terms else torch.zeros(0)
