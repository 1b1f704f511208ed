"""The streaming engine: the one block-by-block loop every caller drives.

For each block of ``frames_per_block`` latent frames (:meth:`StreamingGenerator.run`):
  0. enter: at a prompt switch, take the new prompt (and, with ``recache_on_switch``, recompute the local
     window's K/V under it: LongLive);
  1. denoise: for every solver step, one forward of the block's noisy latents against the block's view
     (default: sink + the local frames before it) -> velocity -> sampler step; or take the block's clean
     latents as given (the replay's context rebuild);
  2. after-denoise hook (KVPO scores/replays a routed block's tuples here, while its unrouted context is live);
  3. commit: one forward of the clean block at ``context_noise`` that writes its K/V into the cache (head
     skipped), then MemFlow's bank update.
A :class:`BlockPlan` changes what a block attends (CHR routing: per step, per sample), which frames its commit
reads, and hooks into steps. Plain generation (:meth:`generate`), the KVPO rollout (anchor + branches as one
batch over a forked cache), the replay's context rebuild and the benchmarks all call :meth:`run`.

Every model call goes through :meth:`forward`, i.e. through the model's *runner* (``accelerate.py``: eager, or
CUDA-graph replays keyed by shapes), so the fast path is the same code for every caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.flops import ForwardRecord, record_flops
from kvpo_megatron.lora import lora_layers, lora_state
from kvpo_megatron.model.attention import TextKV
from kvpo_megatron.model.kv_cache import AttentionView, CacheConfig, KVCache
from kvpo_megatron.model.memory_bank import LOCAL, ScoreReduction, update_after_commit
from kvpo_megatron.parallel.bank_reduction import score_reduction_for
from kvpo_megatron.sampling.flow_matching import FlowMatchSampler
from kvpo_megatron.sampling.noise import StepNoise

StepHook = Callable[[int, torch.Tensor, float, torch.Tensor], None]  # (step, x_t [b..], timestep, velocity [b..])
ReadFrames = Callable[[int], list[int] | list[list[int]]]  # step -> frames to attend (or one list per sample)
AfterDenoise = Callable[[KVCache, int, TextKV], None]  # (cache, block, text) before the block's commit


@dataclass
class PromptSwitch:
    """Prompt ``text`` applies from latent frame ``start_frame`` (block aligned) on."""

    start_frame: int
    text: TextKV
    shot_boundary: bool = False
    """A new shot starts here (LongLive 2.0's scene cut; used with ``cache.shot_sinks``)."""


def shot_starts(prompts: list) -> list[int]:
    """Frames where a new shot starts (prompt entries with ``shot_boundary``, after frame 0)."""
    return [p.start_frame for p in prompts if getattr(p, "shot_boundary", False) and p.start_frame > 0]


@dataclass(kw_only=True)
class BlockPlan:
    """How one block departs from plain generation (every field None = plain)."""

    read_frames: ReadFrames | None = None
    """Frames each solver step attends (CHR), per step; None = the default view."""
    commit_frames: list[int] | list[list[int]] | None = None
    """Frames the commit pass attends; None = the default view."""
    on_step: StepHook | None = None
    """Called after each solver step's forward (KVPO stores replay tuples)."""
    after_denoise: AfterDenoise | None = None
    """Called between denoise and commit."""
    given: bool = False
    """Skip the denoising: the block's clean latents are already in ``latents`` (context rebuild)."""


def active_at(schedule: list, frame: int):
    """The entry of a prompt schedule (anything with ``start_frame``, sorted) in force at latent frame ``frame``."""
    cur = schedule[0]
    for p in schedule:
        if p.start_frame <= frame:
            cur = p
    return cur


def eager_runner(model, x, t, *, text, frame_offset, cache, view, compute_output):
    """The default runner: one eager model call (a prompt encoded once serves the whole batch)."""
    return model(x, t, text=text.expand(x.shape[0]), frame_offset=frame_offset, cache=cache, view=view,
                 compute_output=compute_output)


class StreamingGenerator:
    """The streaming engine over one model (see the module docstring)."""

    def __init__(self, model, sampler: FlowMatchSampler, cache_cfg: CacheConfig, *, recache_on_switch: bool = False,
                 bank_reduction: ScoreReduction | None = None, runner=None):
        """``bank_reduction``: completes MemFlow's bank scores over the ranks sharding the cache; None builds it
        from the model's process groups (``parallel/bank_reduction.py``). Caches get it once, at construction
        (:meth:`new_cache`; forks inherit it). ``runner``: how a forward is executed (``accelerate.build_runner``);
        None = eager."""
        self.model, self.sampler, self.cache_cfg = model, sampler, cache_cfg
        self.recache_on_switch = recache_on_switch
        if bank_reduction is None:
            bank_reduction = LOCAL if cache_cfg.memory_bank is None else score_reduction_for(model)
        self.bank_reduction = bank_reduction
        self.runner = runner or eager_runner
        self._pools: dict = {}  # a runner with ``reuse_pool`` (CUDA graphs) keeps page pools across rollouts
        self.forward_count = 0
        """Model forwards issued (one per call, whatever the batch)."""
        self.sample_forwards = 0
        """Forwards times their batch size (block forwards of single samples)."""
        self.flops = 0.0
        """Model FLOPs of every forward issued (+ its backward for forwards with gradients; ``flops.py``)."""
        self.forward_log: list | None = None
        """Set to a list to record a ``flops.ForwardRecord`` of every forward."""

    # ---- caches ------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, *, fork_batch: int = 0, private_frames: int = 0, pool_key=0) -> KVCache:
        """A root cache of ``batch`` samples; ``fork_batch``/``private_frames`` reserve pages for a later fork.

        With a runner that reuses pools (CUDA graphs), caches of the same ``pool_key`` share one page pool (the
        graphs captured over it stay valid): give caches that must coexist (several prompt groups of one
        iteration, whose prefixes the replay reads after all rollouts) different keys."""
        spare = 0
        if fork_batch:
            bank = 0 if self.cache_cfg.memory_bank is None else self.cache_cfg.memory_bank.bank_size
            spare = fork_batch * (private_frames + bank)
        reuse = getattr(self.runner, "reuse_pool", False)
        cache = KVCache(self.cache_cfg, self.model.config.num_layers, reduction=self.bank_reduction, batch=batch,
                        spare_pages=spare, pool=self._pools.get(pool_key) if reuse else None)
        if reuse:
            self._pools[pool_key] = cache.pool
        return cache

    # ---- the one model call ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: float | torch.Tensor, start: int, text: TextKV, cache: KVCache,
                view: AttentionView, compute_output: bool = True) -> torch.Tensor | None:
        """Velocity of ``x`` ([b, C, F, H, W]) at timestep ``t`` (a float, or one per sample [b]) under ``view``."""
        b = x.shape[0]
        self.forward_count += 1
        self.sample_forwards += b
        if hasattr(self.model.config, "patch_size"):  # a Wan config (test doubles of the model have none)
            rec = self._record(x, view, compute_output)
            self.flops += record_flops(self.model.config, rec)
            if self.forward_log is not None:
                self.forward_log.append(rec)
        if isinstance(t, torch.Tensor):
            ts = t.to(device=x.device, dtype=torch.float32)
        else:
            ts = torch.full((b,), float(t), dtype=torch.float32, device=x.device)
        return self.runner(self.model, x, ts, text=text, frame_offset=cache.rope_offset(start), cache=cache,
                           view=view, compute_output=compute_output)

    def _record(self, x, view: AttentionView, compute_output: bool) -> ForwardRecord:
        cfg = self.model.config
        pt, ph, pw = cfg.patch_size
        layer = next((m for _, m in lora_layers(self.model)), None)
        grad = torch.is_grad_enabled()
        # forwards with gradients train the (active, unmerged) adapters; reading the state there could race with a
        # rollout thread switching adapters (train.overlap)
        rank = layer.r["default"] if layer is not None and (grad or lora_state(self.model) == "active") else 0
        n_read = view.read_slots.shape[-1] - view.sparse_candidates + view.sparse_top_k
        return ForwardRecord(batch=x.shape[0], frames=x.shape[2] // pt, tokens_per_frame=(x.shape[3] // ph) *
                             (x.shape[4] // pw), cached_frames=n_read, head=compute_output, grad=grad,
                             lora_rank=rank)

    # ---- one block ---------------------------------------------------------------------------
    def denoise_block(self, cache: KVCache, noise: torch.Tensor, start: int, text: TextKV, *,
                      read_frames_for_step: ReadFrames | None = None, on_step: StepHook | None = None,
                      generator: torch.Generator | None = None, step_noise: StepNoise | None = None) -> torch.Tensor:
        """Denoise one block ([b, C, F, H, W]) starting at frame ``start``; returns the clean latents."""
        x = noise
        default = cache.default_read_frames(start, noise.shape[2])
        view_of: dict = {}
        block = start // self.cache_cfg.frames_per_block
        for i in range(self.sampler.num_steps):
            frames = default if read_frames_for_step is None else read_frames_for_step(i)
            key = repr(frames)
            if key not in view_of:  # steps reading the same frames share one view
                view_of[key] = cache.view(frames, device=x.device)
            t = self.sampler.timestep(i)
            v = self.forward(x, t, start, text, cache, view_of[key])
            if on_step is not None:
                on_step(i, x, t, v)
            eps = step_noise(block, i, x) if step_noise is not None and self.sampler.needs_noise else None
            x = self.sampler.step(x, v, i, generator, noise=eps)
        return x

    def commit_block(self, cache: KVCache, x0: torch.Tensor, start: int, text: TextKV, *,
                     read_frames: list[int] | list[list[int]] | None = None, record_bank: bool = True,
                     generator: torch.Generator | None = None) -> None:
        """Write the block's clean K/V (at the unshifted ``context_noise`` timestep) into the cache; then update the
        memory bank (scored against ``text``) unless ``record_bank`` is False (recomputing an earlier block)."""
        nf = x0.shape[2]
        frames = cache.default_read_frames(start, nf) if read_frames is None else read_frames
        view = cache.view(frames, write_frames=list(range(start, start + nf)), device=x0.device)
        self.forward(x0, self.sampler.context_timestep(), start, text, cache, view, compute_output=False)
        if record_bank and cache.cfg.memory_bank is not None:
            update_after_commit(cache, start // cache.cfg.frames_per_block, text.expand(cache.batch_size))
        if record_bank and start in cache.shot_starts:  # a shot's first block becomes its sink once committed
            cache.pin_shot_sink(list(range(start, start + nf)))

    def recache(self, cache: KVCache, latents: torch.Tensor, start: int, text: TextKV) -> None:
        """LongLive-style prompt switch: recompute the K/V of the local window's frames before ``start`` (not the
        sink) under the new prompt, as upstream does: one forward of those frames' clean latents (``latents``
        [b, C, >=start, H, W]) at ``context_noise``, attending the sink and each other. The memory bank is kept
        as it is (no entry is recorded again)."""
        cc = self.cache_cfg
        first = max(cc.num_sink_frames, start - cc.local_attn_frames)
        if first >= start:
            return
        sink = list(range(min(cc.num_sink_frames, first)))
        view = cache.view(sink, write_frames=list(range(first, start)), device=latents.device)
        self.forward(latents[:, :, first:start], self.sampler.context_timestep(), first, text, cache, view,
                     compute_output=False)

    def enter_block(self, cache: KVCache, latents: torch.Tensor, block: int, prompts: list[PromptSwitch]) -> TextKV:
        """The prompt of ``block``; performs the LongLive recache when a prompt switch starts here."""
        s = block * self.cache_cfg.frames_per_block
        text = active_at(prompts, s).text
        if s > 0 and self.recache_on_switch and any(p.start_frame == s for p in prompts):
            self.recache(cache, latents, s, text)
        return text

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, cache: KVCache, latents: torch.Tensor, noise: torch.Tensor | None, prompts: list[PromptSwitch],
            blocks, *, plan_for: Callable[[int], BlockPlan | None] | None = None,
            step_noise: StepNoise | None = None, generator: torch.Generator | None = None,
            progress: bool = False) -> torch.Tensor:
        """Stream ``blocks`` (increasing block indices) of a batch: writes the clean latents into ``latents``
        ([b, C, F_total, H, W], in place) and returns it. ``noise``: initial noise of the same shape (unused by
        blocks whose plan is ``given``)."""
        fpb = self.cache_cfg.frames_per_block
        if cache.cfg.memory_bank is not None and cache.reduction is not self.bank_reduction:
            raise ConfigError("this KV cache's MemFlow score reduction is not its model's layout's: build caches "
                              "with StreamingGenerator.new_cache (or KVCache(..., reduction=gen.bank_reduction))")
        if self.cache_cfg.shot_sinks:
            cache.shot_starts = shot_starts(prompts)
        for b in tqdm(list(blocks), disable=not progress, desc="blocks"):
            s = b * fpb
            text = self.enter_block(cache, latents, b, prompts)
            plan = (plan_for(b) if plan_for is not None else None) or BlockPlan()
            if not plan.given:
                latents[:, :, s:s + fpb] = self.denoise_block(
                    cache, noise[:, :, s:s + fpb], s, text, read_frames_for_step=plan.read_frames,
                    on_step=plan.on_step, generator=generator, step_noise=step_noise)
            if plan.after_denoise is not None:
                plan.after_denoise(cache, b, text)
            self.commit_block(cache, latents[:, :, s:s + fpb], s, text, read_frames=plan.commit_frames,
                              generator=generator)
        return latents

    def check_video(self, noise: torch.Tensor) -> int:
        fpb = self.cache_cfg.frames_per_block
        if noise.dim() != 5:
            raise ConfigError(f"noise must be [batch, channels, frames, height, width], got {tuple(noise.shape)}")
        if noise.shape[2] % fpb:
            raise ConfigError(f"number of latent frames ({noise.shape[2]}) is not a multiple of "
                              f"frames_per_block ({fpb})")
        return noise.shape[2] // fpb

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, prompts: list[PromptSwitch], *, cache: KVCache | None = None,
                 progress: bool = False, generator: torch.Generator | None = None,
                 step_noise: StepNoise | None = None) -> torch.Tensor:
        """Generate a whole video from per-block noise; ``prompts`` sorted by start frame, first at 0.
        ``step_noise`` (re-noising sampler): keyed fresh noise; None draws from ``generator``."""
        nblocks = self.check_video(noise)
        fpb = self.cache_cfg.frames_per_block
        if not prompts or prompts[0].start_frame != 0:
            raise ConfigError("the first prompt must start at frame 0")
        for p in prompts:
            if p.start_frame % fpb or p.start_frame >= noise.shape[2]:
                raise ConfigError(f"prompt switch at frame {p.start_frame} must be block aligned "
                                  f"(multiple of {fpb}) and inside the video ({noise.shape[2]} frames)")
        cache = cache or self.new_cache(noise.shape[0])
        if cache.batch_size != noise.shape[0]:
            raise ConfigError(f"the KV cache holds {cache.batch_size} sample(s) but the noise has {noise.shape[0]}; "
                              f"build it with new_cache({noise.shape[0]})")
        return self.run(cache, torch.empty_like(noise), noise, prompts, range(nblocks), step_noise=step_noise,
                        generator=generator, progress=progress)
