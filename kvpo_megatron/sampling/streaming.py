"""Block-by-block streaming generation over a KV cache.

For each block of ``frames_per_block`` latent frames:
  1. denoise: for every solver step, one forward of the block's noisy latents against the block's view
     (default: sink + the local frames before it) -> velocity -> sampler step;
  2. commit: one forward of the clean block at ``context_noise`` that writes its K/V into the cache
     (skipping the output head).
Callers that change what a block attends to (CHR routing) pass ``read_frames_for_step``;
callers that need the intermediate states (KVPO's replay tuples) pass ``on_step``.
With ``cache.memory_bank`` set, every view also attends MemFlow's bank, and each commit records/compresses
it (``model/memory_bank.py``) — so rollout, replay and plain generation keep the same bank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model.attention import TextKV
from kvpo_megatron.model.kv_cache import CacheConfig, KVCache
from kvpo_megatron.model.memory_bank import LOCAL, ScoreReduction, update_after_commit
from kvpo_megatron.sampling.flow_matching import FlowMatchSampler

StepHook = Callable[[int, torch.Tensor, float, torch.Tensor], None]  # (step, x_t, timestep, velocity)
ReadFrames = Callable[[int], list[int] | list[list[int]]]  # step -> frames to attend


@dataclass
class PromptSwitch:
    """Prompt ``text`` applies from latent frame ``start_frame`` (block aligned) on."""

    start_frame: int
    text: TextKV


class StreamingGenerator:
    def __init__(self, model, sampler: FlowMatchSampler, cache_cfg: CacheConfig, *, recache_on_switch: bool = False,
                 bank_reduction: ScoreReduction | None = None):
        """``bank_reduction``: completes MemFlow's bank scores over the ranks sharding the cache; None builds it
        from the model's process groups (``parallel/bank_reduction.py``) on first use."""
        self.model, self.sampler, self.cache_cfg = model, sampler, cache_cfg
        self.recache_on_switch = recache_on_switch
        self.bank_reduction = bank_reduction
        self.forward_count = 0  # model forwards issued (tests count them)

    def new_cache(self) -> KVCache:
        return KVCache(self.cache_cfg, self.model.config.num_layers, reduction=self._reduction())

    def _reduction(self) -> ScoreReduction:
        if self.cache_cfg.memory_bank is None:
            return LOCAL
        if self.bank_reduction is None:
            from kvpo_megatron.parallel.bank_reduction import score_reduction_for
            self.bank_reduction = score_reduction_for(self.model)
        return self.bank_reduction

    def _forward(self, x, t: float, start: int, text: TextKV, cache: KVCache, view, compute_output=True):
        self.forward_count += 1
        if cache.cfg.memory_bank is not None:  # any cache this generator drives scores like its model's layout
            cache.reduction = self._reduction()
        ts = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        return self.model(x, ts, text=text, frame_offset=start, cache=cache, view=view, compute_output=compute_output)

    def denoise_block(self, cache: KVCache, noise: torch.Tensor, start: int, text: TextKV, *,
                      read_frames_for_step: ReadFrames | None = None, on_step: StepHook | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise one block ([b, C, F, H, W]) starting at frame ``start``; returns the clean latents."""
        x = noise
        default = self.cache_cfg.default_read_frames(start, noise.shape[2])
        for i in range(self.sampler.num_steps):
            frames = default if read_frames_for_step is None else read_frames_for_step(i)
            t = self.sampler.timestep(i)
            v = self._forward(x, t, start, text, cache, cache.view(frames, device=x.device))
            if on_step is not None:
                on_step(i, x, t, v)
            x = self.sampler.step(x, v, i, generator)
        return x

    def commit_block(self, cache: KVCache, x0: torch.Tensor, start: int, text: TextKV, *,
                     read_frames: list[int] | None = None, generator: torch.Generator | None = None,
                     record_bank: bool = True) -> None:
        """Write the block's clean K/V (at ``context_noise``) into the cache; then update the memory bank
        (scored against ``text``) unless ``record_bank`` is False (recomputing an earlier block)."""
        nf = x0.shape[2]
        frames = self.cache_cfg.default_read_frames(start, nf) if read_frames is None else read_frames
        x = x0
        if self.sampler.context_sigma > 0:
            eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            x = self.sampler.add_noise(x0, eps, self.sampler.context_sigma)
        view = cache.view(frames, write_frames=list(range(start, start + nf)), device=x0.device)
        self._forward(x, self.sampler.context_timestep(), start, text, cache, view, compute_output=False)
        if record_bank and cache.cfg.memory_bank is not None:
            update_after_commit(cache, start // cache.cfg.frames_per_block, text)

    def recache(self, cache: KVCache, latents: torch.Tensor, start: int, text: TextKV) -> None:
        """LongLive-style prompt switch: recompute the K/V of the local frames before ``start`` (not the sink)
        under the new prompt, block by block, from their clean latents ``latents`` [b, C, >=start, H, W].
        The memory bank is kept as it is (no entry is recorded again)."""
        fpb = self.cache_cfg.frames_per_block
        first = max(self.cache_cfg.num_sink_frames, start - (self.cache_cfg.local_attn_frames - fpb))
        first -= (first % fpb)
        for s in range(max(first, self.cache_cfg.num_sink_frames), start, fpb):
            self.commit_block(cache, latents[:, :, s:s + fpb], s, text, record_bank=False)

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
                 progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Generate a whole video from per-block noise; ``prompts`` sorted by start frame, first at 0."""
        nblocks = self.check_video(noise)
        fpb = self.cache_cfg.frames_per_block
        if not prompts or prompts[0].start_frame != 0:
            raise ConfigError("the first prompt must start at frame 0")
        for p in prompts:
            if p.start_frame % fpb or p.start_frame >= noise.shape[2]:
                raise ConfigError(f"prompt switch at frame {p.start_frame} must be block aligned "
                                  f"(multiple of {fpb}) and inside the video ({noise.shape[2]} frames)")
        cache = cache or self.new_cache()
        out = torch.empty_like(noise)
        switches = {p.start_frame: p.text for p in prompts}
        text = prompts[0].text
        for b in tqdm(range(nblocks), disable=not progress, desc="blocks"):
            s = b * fpb
            if s in switches and s > 0:
                text = switches[s]
                if self.recache_on_switch:
                    self.recache(cache, out, s, text)
            text = switches.get(s, text)
            x0 = self.denoise_block(cache, noise[:, :, s:s + fpb], s, text, generator=generator)
            out[:, :, s:s + fpb] = x0
            self.commit_block(cache, x0, s, text, generator=generator)
        return out
