"""Streaming video generation job (``examples/generate.py``): config, model, prompts -> latents (+ mp4)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpo_megatron.accelerate import accelerate
from kvpo_megatron.checkpoint.loading import load_model_weights, warn_if_random_weights
from kvpo_megatron.conditioning.text_encoder import TextEncoderConfig, build_text_encoder
from kvpo_megatron.conditioning.vae import DecoderConfig, build_decoder
from kvpo_megatron.conditioning.video_io import write_mp4
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.extras import check_job_extras
from kvpo_megatron.model.build import ModelSection, build_model
from kvpo_megatron.model.kv_cache import CacheConfig
from kvpo_megatron.model.multishot import is_scene_cut
from kvpo_megatron.parallel.state import ParallelConfig, init_parallel, validate_tokens
from kvpo_megatron.sampling import FlowMatchSampler, PromptSwitch, SamplerConfig, StreamingGenerator
from kvpo_megatron.sampling.noise import StepNoise

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class VideoConfig:
    num_frames: int = 21
    """Latent frames (a multiple of cache.frames_per_block)."""
    latent_height: int = 8
    """Latent height (480p Wan: 60)."""
    latent_width: int = 8
    """Latent width (832 wide Wan: 104)."""

    def __post_init__(self):
        for name in ("num_frames", "latent_height", "latent_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"video.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class GenerateConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Text encoder (``hash`` needs no weights; text_len/text_dim follow the model)."""
    decoder: DecoderConfig | None = None
    """Decoder for an mp4 (``preview`` or the Wan VAE); None writes latents only."""
    prompts: list[str] = field(default_factory=lambda: ["a red fox running through snow"])
    """One prompt, or several for a multi-prompt video."""
    switch_frames: list[int] = field(default_factory=list)
    """Latent frame where each later prompt starts (len(prompts) - 1 entries, block aligned)."""
    recache_on_switch: bool = False
    """Recompute the local window's K/V under the new prompt at a switch (LongLive)."""
    seed: int = 0
    out: str = "outputs/generate"
    """Output directory (latents.pt, and video.mp4 when a decoder is configured)."""

    def __post_init__(self):
        if self.video.num_frames % self.cache.frames_per_block:
            raise ConfigError(f"video.num_frames ({self.video.num_frames}) is not a multiple of "
                              f"cache.frames_per_block ({self.cache.frames_per_block})")


def _prompt_schedule(cfg: GenerateConfig) -> list[tuple[int, str]]:
    if len(cfg.switch_frames) != len(cfg.prompts) - 1:
        raise ConfigError(f"switch_frames needs {len(cfg.prompts) - 1} entries for {len(cfg.prompts)} prompts, "
                          f"got {cfg.switch_frames}")
    return list(zip([0, *cfg.switch_frames], cfg.prompts))


def run_generation(cfg: GenerateConfig, *, progress: bool = True) -> torch.Tensor:
    import dataclasses

    check_job_extras(cfg)
    pgs = init_parallel(cfg.parallel)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, pg_collection=pgs, tp=cfg.parallel.tensor_model_parallel_size,
                        cp=cfg.parallel.context_parallel_size, cp_attention=cfg.parallel.cp_attention)
    validate_tokens(model.config, cfg.parallel, cfg.video.latent_height, cfg.video.latent_width)
    if cfg.model.checkpoint:
        load_model_weights(model, cfg.model.checkpoint, use_ema=cfg.model.use_ema)
    else:
        warn_if_random_weights(cfg.model)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval()
    runner = accelerate(model, cfg.model, device=device)
    schedule = _prompt_schedule(cfg)
    encoder = build_text_encoder(dataclasses.replace(cfg.text, text_len=model.config.text_len,
                                                     text_dim=model.config.text_dim))
    gen = StreamingGenerator(model, FlowMatchSampler(cfg.sampler), cfg.cache, recache_on_switch=cfg.recache_on_switch,
                             runner=runner)
    v = cfg.video
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(1, model.config.in_channels, v.num_frames, v.latent_height, v.latent_width, generator=g)
    gen.check_video(noise)
    with torch.no_grad():
        switches = [PromptSwitch(s, model.encode_text(encoder.encode([p])[0].to(device)), s > 0 and is_scene_cut(p))
                    for s, p in schedule]
        latents = gen.generate(noise.to(device), switches, progress=progress, step_noise=StepNoise(cfg.seed))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(latents.cpu(), out / "latents.pt")
    if cfg.decoder:
        frames = build_decoder(cfg.decoder).decode(latents.float().cpu())
        write_mp4(frames[0], out / "video.mp4")
    log.info("wrote %s (latents %s)", out, tuple(latents.shape))
    return latents
