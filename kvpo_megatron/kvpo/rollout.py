"""KVPO rollout: one shared prefix, then the unrouted anchor and G CHR-routed branches advancing as one batch.

1. The prefix (blocks before the pivot) is generated once (batch 1); its cache is frozen and is the fork state.
2. The anchor and the branches (in chunks of ``rollout.batch_size`` samples) continue from a fork of it: each
   sample reads the prefix's pages and writes its own (``model/kv_cache.py``). Blocks in the window
   ``[pivot, pivot+W)`` attend, per branch, CHR-routed windows on their routed solver steps (the anchor stays
   unrouted, so it equals plain generation), and every routed step's ``(x_{b,s}, t_s, v_target)`` is stored as
   a replay tuple. Right after a routed block is denoised -- while each branch's own unrouted context is live
   in the cache -- its tuples are *scored* (``replay.score_block``): replayed without grad under the unrouted
   view, in the training form of the model (TVE_old, i.e. pi_old) and with adapters disabled (TVE_ref).
3. Randomness is keyed: initial noise by (seed, iteration, prompt, branch), the re-noising sampler's fresh noise
   by (seed, iteration, prompt, block, step) -- shared by every sample unless ``rollout.shared_step_noise`` is
   off -- and routes by (seed, iteration, prompt, branch, block). Batch layout changes nothing.

``generation`` (a context factory, e.g. merged LoRA) wraps the no-grad generation; ``scoring`` wraps the
scoring forwards (the unmerged training form, so pi_old is evaluated at exactly the replay's parameters).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from kvpo_megatron.kvpo import routing as chr
from kvpo_megatron.kvpo.config import CommitPass, RolloutConfig, RoutingConfig, split_evenly
from kvpo_megatron.kvpo.replay import score_block
from kvpo_megatron.kvpo.types import BranchRollout, PromptContext, ReplayTuple, RolloutGroup
from kvpo_megatron.sampling.noise import StepNoise, keyed_randn
from kvpo_megatron.sampling.streaming import BlockPlan, PromptSwitch, StreamingGenerator, active_at

Ctx = Callable[[], ContextManager]


def encode_prompts(model, contexts: list[PromptContext]) -> list[PromptSwitch]:
    """Cross-attention K/V of every prompt under the model's current state (adapters on or off)."""
    return [PromptSwitch(c.start_frame, model.encode_text(c.context), c.shot_boundary) for c in contexts]


def private_frames_needed(gen: StreamingGenerator, routing: RoutingConfig, pivot: int, window: list[int],
                          switch_frames: list[int]) -> int:
    """Private ring pages per sample of a rollout fork: every frame generated since the pivot is routable until
    the window ends (W blocks); a LongLive recache inside the window also rewrites the local frames before it."""
    cc = gen.cache_cfg
    fpb = cc.frames_per_block
    need = max(cc.local_attn_frames, len(window) * fpb)
    lo, hi = pivot * fpb, (pivot + len(window)) * fpb
    if gen.recache_on_switch and any(lo < s < hi for s in switch_frames):
        need += cc.local_attn_frames - fpb
    return need


def kv_bytes_per_frame(gen: StreamingGenerator, latent_hw: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of one frame's K and V over all layers on this rank (heads/tokens sharded over TP x CP)."""
    mc = gen.model.config
    tokens = mc.tokens_per_frame(*latent_hw)
    shards = mc.tensor_model_parallel_size * mc.context_parallel_size
    return 2 * mc.num_layers * tokens * mc.hidden_size * torch.finfo(dtype).bits // 8 // shards


class Rollout:
    def __init__(self, gen: StreamingGenerator, routing: RoutingConfig, cfg: RolloutConfig, *, seed: int,
                 reference: Ctx | None = None, scoring: Ctx | None = None, generation: Ctx | None = None):
        self.gen, self.routing, self.cfg, self.seed = gen, routing, cfg, seed
        self.reference = reference or contextlib.nullcontext
        self.scoring = scoring or contextlib.nullcontext
        self.generation = generation or contextlib.nullcontext
        self.cache_cfg = gen.cache_cfg
        chr.routed_slots(self.cache_cfg, routing)  # the fixed slots fit the cache's local window

    def noise(self, shape, *, iteration: int, prompt: int, branch: int) -> torch.Tensor:
        return keyed_randn(shape, self.seed, iteration, prompt, branch + 1, 0x401)

    def step_noise(self, *, iteration: int, prompt: int) -> StepNoise:
        """The re-noising sampler's fresh noise of one prompt's rollout (shared by all samples)."""
        return StepNoise(self.seed, iteration, prompt)

    def batch_size(self, num_samples: int, *, latent_hw, dtype, device, private_frames: int) -> int:
        """Samples advanced together: ``rollout.batch_size``, or the most whose KV pages fit the budget (GPU)."""
        if self.cfg.batch_size is not None:
            return min(self.cfg.batch_size, num_samples)
        if device is None or torch.device(device).type != "cuda":
            return num_samples
        per_frame = kv_bytes_per_frame(self.gen, latent_hw, dtype)
        bank = 0 if self.cache_cfg.memory_bank is None else self.cache_cfg.memory_bank.bank_size
        prefix = (self.cache_cfg.num_sink_frames + self.cache_cfg.history_frames + bank) * per_frame
        per_sample = (private_frames + bank) * per_frame
        fit = int((self.cfg.kv_budget_gb * 1e9 - prefix) // per_sample)
        return max(1, min(num_samples, fit))

    @torch.no_grad()
    def run(self, contexts: list[PromptContext], shape: tuple[int, ...], *, iteration: int, prompt_index: int,
            pivot: int | None = None, branch_ids: list[int] | None = None, device=None,
            dtype: torch.dtype | None = None, slot: int = 0, anchor: bool = True) -> RolloutGroup:
        """Roll out one prompt group. ``branch_ids`` selects which branches this rank runs and ``anchor`` whether it
        runs the anchor (branches over DP: ``kvpo/branch_schedule.py``); ``slot``: the group's position in the
        iteration (groups replayed later keep their own KV pages)."""
        gen, fpb = self.gen, self.cache_cfg.frames_per_block
        nblocks = shape[2] // fpb
        f0, s0 = gen.forward_count, gen.sample_forwards
        with self.generation():
            prompts = encode_prompts(gen.model, contexts)
        with self.scoring():
            score_prompts = encode_prompts(gen.model, contexts)
        with self.reference():  # per call (not instance state): rollouts may run on several threads
            ref_prompts = encode_prompts(gen.model, contexts)
        if pivot is None:
            pivot = chr.sample_pivot(self.cache_cfg, self.routing, nblocks, seed=self.seed, iteration=iteration,
                                     prompt=prompt_index)
        window = list(range(pivot, min(nblocks, pivot + self.routing.window_blocks)))
        ids = list(range(self.cfg.num_branches)) if branch_ids is None else list(branch_ids)
        samples = ([-1] if anchor else []) + ids
        private = private_frames_needed(gen, self.routing, pivot, window, [c.start_frame for c in contexts[1:]])
        dtype = dtype or next(gen.model.parameters()).dtype
        bs = self.batch_size(len(samples), latent_hw=tuple(shape[3:]), dtype=dtype, device=device,
                             private_frames=private)
        noise = self.noise(shape, iteration=iteration, prompt=prompt_index, branch=-1).to(device)
        step_noise = self.step_noise(iteration=iteration, prompt=prompt_index)
        prefix = gen.new_cache(1, fork_batch=bs, private_frames=private, pool_key=slot)
        latents = torch.zeros_like(noise)
        with self.generation():
            gen.run(prefix, latents, noise, prompts, range(pivot), step_noise=step_noise)
        shots = prefix.shot_starts
        pool = chr.routable_set(self.cache_cfg, self.routing, pivot * fpb, prefix.resident_frames(), shots)
        if anchor and len(pool) < chr.num_routed(self.cache_cfg, self.routing, pivot * fpb, shots):  # shorter routed
            chunks = [[-1]] + split_evenly(ids, bs)  # views: the anchor in its own batch
        else:
            chunks = split_evenly(samples, bs)
        out: dict[int, BranchRollout] = {}
        for chunk in chunks:
            cache = prefix.fork(len(chunk), private)
            lat = latents.expand(len(chunk), *latents.shape[1:]).clone()
            noises = [noise if (g < 0 or self.cfg.shared_noise) else
                      self.noise(shape, iteration=iteration, prompt=prompt_index, branch=g).to(device) for g in chunk]
            results = [BranchRollout(branch=g, latents=lat[i:i + 1]) for i, g in enumerate(chunk)]
            plan = _ChunkPlan(self, cache, chunk, results, window, score_prompts, ref_prompts, iteration, prompt_index)
            sn = step_noise if self.cfg.shared_step_noise else step_noise.for_samples(chunk)
            with self.generation():
                gen.run(cache, lat, torch.cat(noises), prompts, range(pivot, nblocks), plan_for=plan.block,
                        step_noise=sn)
            out.update({r.branch: r for r in results})
        return RolloutGroup(iteration=iteration, prompt_index=prompt_index, pivot=pivot, window=window,
                            contexts=contexts, prompts=prompts, anchor=out.get(-1), branches=[out[g] for g in ids],
                            fork_state=prefix, private_frames=private, forwards=gen.forward_count - f0,
                            sample_forwards=gen.sample_forwards - s0)


class _ChunkPlan:
    """Per-block plans of one batch of samples (the anchor is -1): CHR views, tuples, scoring, commit views."""

    def __init__(self, ro: Rollout, cache, chunk: list[int], results: list[BranchRollout], window: list[int],
                 score_prompts, ref_prompts, iteration: int, prompt_index: int):
        self.ro, self.cache, self.chunk, self.results, self.window = ro, cache, chunk, results, set(window)
        self.score_prompts, self.ref_prompts = score_prompts, ref_prompts
        self.iteration, self.prompt_index = iteration, prompt_index

    def block(self, b: int) -> BlockPlan | None:
        if b not in self.window:
            return None
        ro, cc, routing = self.ro, self.ro.cache_cfg, self.ro.routing
        fpb, n_steps = cc.frames_per_block, ro.gen.sampler.num_steps
        s = b * fpb
        default, shots = self.cache.default_read_frames(s, fpb), self.cache.shot_starts
        branches = [g for g in self.chunk if g >= 0]
        routes = chr.sample_routes(cc, routing, s, self.cache.resident_frames(), num_branches=max(branches, default=0) + 1,
                                   seed=ro.seed, iteration=self.iteration, prompt=self.prompt_index, block=b,
                                   shots=shots)
        views = [default if g < 0 else chr.routed_read_frames(cc, routing, s, routes[g], shots) for g in self.chunk]
        for r, g in zip(self.results, self.chunk):
            if g >= 0:
                r.routes[b] = routes[g]
        per_sample = views if any(v != default for v in views) else default
        commit = per_sample if routing.commit_pass == CommitPass.routed else default
        for r, v in zip(self.results, views):
            r.commit_frames[b] = v if routing.commit_pass == CommitPass.routed else default
        new: list[tuple[int, ReplayTuple]] = []

        def read_frames(step: int):
            return per_sample if chr.is_routed_step(routing, step, n_steps) else default

        def on_step(step, x, t, v):
            if chr.is_routed_step(routing, step, n_steps):
                for i, g in enumerate(self.chunk):
                    if g >= 0:
                        new.append((i, ReplayTuple(block=b, step=step, start=s, x=x[i:i + 1].clone(), timestep=t,
                                                   v_target=v[i:i + 1].clone())))

        def after_denoise(cache, block, text):
            if not new:
                return
            rows, tuples = [i for i, _ in new], [t for _, t in new]
            view = cache.view(default, device=tuples[0].x.device).for_samples(rows)
            with ro.scoring():
                old = score_block(ro.gen, cache, view, tuples, active_at(self.score_prompts, s).text)
            with ro.reference():
                ref = score_block(ro.gen, cache, view, tuples, active_at(self.ref_prompts, s).text)
            for (i, tup), o, rf in zip(new, old.tolist(), ref.tolist()):
                res = self.results[i]
                res.tuples.append(tup)
                res.tve_old += o
                res.tve_ref += rf

        return BlockPlan(read_frames=read_frames, commit_frames=commit, on_step=on_step, after_denoise=after_denoise)
