#!/usr/bin/env python
"""Block-by-block difference between the ``renoise`` and ``ode`` samplers on one checkpoint.

    python tools/compare_samplers.py CKPT [--preset longlive-1.3b] [--frames 21] [--height 60 --width 104]

``CKPT``: anything ``model.checkpoint`` takes (a converted directory or a user's weights file). Both runs use the
preset's cache, the same initial noise and the same prompt embedding (the weight-free ``hash`` text encoder);
``renoise`` draws its fresh noise from a fixed key. Prints one JSON line: per block
``||x_renoise - x_ode|| / ||x_renoise||`` and the same over the whole video.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch


def compare(checkpoint: str, *, preset: str = "longlive-1.3b", frames: int = 21, height: int = 60, width: int = 104,
            seed: int = 0, use_ema: bool = False) -> dict:
    from kvpo_megatron.checkpoint.loading import checkpoint_model_section, load_model_weights
    from kvpo_megatron.conditioning.text_encoder import TextEncoderConfig, build_text_encoder
    from kvpo_megatron.config import from_dict
    from kvpo_megatron.generation import GenerateConfig
    from kvpo_megatron.model.build import ModelSection, build_model
    from kvpo_megatron.parallel.state import ParallelConfig, init_parallel
    from kvpo_megatron.presets import GENERATE_SECTIONS, generator_preset
    from kvpo_megatron.sampling import FlowMatchSampler, PromptSwitch, StreamingGenerator
    from kvpo_megatron.sampling.noise import StepNoise

    cfg = from_dict(GenerateConfig, generator_preset(preset, GENERATE_SECTIONS))
    pgs = init_parallel(ParallelConfig())
    section = checkpoint_model_section(checkpoint) if Path(checkpoint, ".metadata").exists() else \
        ModelSection(preset=cfg.model.preset)
    model = build_model(section, pg_collection=pgs)
    load_model_weights(model, checkpoint, use_ema=use_ema)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device).eval()
    mc = model.config
    text = TextEncoderConfig(text_len=mc.text_len, text_dim=mc.text_dim, seed=seed)
    with torch.no_grad():
        prompt = model.encode_text(build_text_encoder(text).encode(["a red fox running through snow"])[0].to(device))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, mc.in_channels, frames, height, width, generator=g).to(device)
    out = {}
    for kind in ("renoise", "ode"):
        sampler = FlowMatchSampler(dataclasses.replace(cfg.sampler, kind=kind))
        gen = StreamingGenerator(model, sampler, cfg.cache, recache_on_switch=cfg.recache_on_switch)
        out[kind] = gen.generate(noise, [PromptSwitch(0, prompt)], step_noise=StepNoise(seed)).float().cpu()
    r, o, fpb = out["renoise"], out["ode"], cfg.cache.frames_per_block
    rel = [float((r[:, :, s:s + fpb] - o[:, :, s:s + fpb]).norm() / r[:, :, s:s + fpb].norm())
           for s in range(0, frames, fpb)]
    return {"checkpoint": str(checkpoint), "preset": preset, "frames": frames, "per_block": [round(x, 4) for x in rel],
            "video": round(float((r - o).norm() / r.norm()), 4)}


def main(argv: list[str] | None = None) -> int:
    from kvpo_megatron.cli import exit_code

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--preset", default="longlive-1.3b")
    ap.add_argument("--frames", type=int, default=21, help="latent frames (a multiple of the block)")
    ap.add_argument("--height", type=int, default=60, help="latent height (480p: 60)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832: 104)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--use-ema", action="store_true", help="a training file's generator_ema")
    a = ap.parse_args(argv)
    return exit_code(lambda: print(json.dumps(compare(a.checkpoint, preset=a.preset, frames=a.frames, height=a.height,
                                                      width=a.width, seed=a.seed, use_ema=a.use_ema))))


if __name__ == "__main__":
    sys.exit(main())
