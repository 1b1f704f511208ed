"""The ``longlive2-5b`` generator preset (LongLive 2.0: Wan2.2-TI2V-5B, blocks of 8, sink 8 + local 24, 4-step
UniPC at shift 5) and its sampler, and one KVPO iteration of a tiny longlive2-shaped model through the trainer."""
from __future__ import annotations

import pytest
import torch

from kvpo_megatron.config import deep_merge, from_dict
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.kvpo.routing import routed_slots
from kvpo_megatron.kvpo.train_config import KVPOTrainConfig
from kvpo_megatron.presets import generator_preset
from kvpo_megatron.sampling import FlowMatchSampler, SamplerConfig


def test_preset_values():
    """configs/inference.yaml of NVlabs/LongLive main: num_frame_per_block 8, local_attn_size 32, sink_size 8,
    sampling_steps 4, timestep_shift 5, latents [128, 48, 44, 80]; no recache in the 2.0 pipeline."""
    cfg = from_dict(KVPOTrainConfig, generator_preset("longlive2-5b"))
    assert cfg.model.preset == "wan2.2-5b"
    c = cfg.cache
    assert (c.frames_per_block, c.num_sink_frames, c.local_attn_frames) == (8, 8, 24)
    assert c.num_sink_frames + c.local_attn_frames == 32  # local_attn_size: everything attended, block included
    assert c.default_read_frames(48) == list(range(8)) + list(range(32, 48))
    assert (cfg.video.num_frames, cfg.video.latent_height, cfg.video.latent_width) == (128, 44, 80)
    assert cfg.recache_on_switch is False and cfg.decoder.latent_channels == 48
    assert (cfg.routing.num_recent_fixed, routed_slots(cfg.cache, cfg.routing)) == (8, 16)
    s = FlowMatchSampler(cfg.sampler)
    assert [s.timestep(i) for i in range(4)] == [999.0, 937.0, 833.0, 624.0]  # upstream's scheduler.timesteps
    assert s.context_timestep() == 0.0


def test_unipc_sampler():
    cfg = SamplerConfig(kind="unipc", timesteps=(999.0, 749.25, 499.5, 249.75), shift=5.0)
    uni, ode = FlowMatchSampler(cfg), FlowMatchSampler(SamplerConfig(timesteps=cfg.timesteps, shift=5.0))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g,
                                                                                  dtype=torch.float64)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64)

    def field(x, i):  # a non-linear velocity field
        return torch.tanh(x @ w) + 0.1 * i

    # 1. the first step is the Euler step (UniPC order 1 on the x0 form == DDIM == Euler for rectified flow)
    x = eps.clone()
    assert torch.allclose(uni.step(x, field(x, 0), 0), ode.step(x, field(x, 0), 0), atol=1e-6)
    # 2. a later step uses the earlier model output: it differs from Euler from the same (x, v)
    x1 = uni.step(x, field(x, 0), 0)
    assert (uni.step(x1, field(x1, 1), 1) - ode.step(x1, field(x1, 1), 1)).abs().max() > 1e-3
    # 3. exact on a straight path (v = eps - x0 everywhere): every step lands on it, the last on x0
    for sampler in (uni, FlowMatchSampler(cfg)):
        x = (1 - float(sampler.sigmas[0])) * x0 + float(sampler.sigmas[0]) * eps
        for i in range(4):
            x = sampler.step(x, eps - x0, i)
        assert (x - x0).abs().max() < 1e-5
    # 4. each block starts afresh at step 0; steps out of order are refused
    runs = []
    for _ in range(2):
        x = eps.clone()
        for i in range(4):
            x = uni.step(x, field(x, i), i)
        runs.append(x)
    assert torch.equal(runs[0], runs[1])
    uni.step(eps, field(eps, 0), 0)
    with pytest.raises(RuntimeError, match="step 2 must follow step 1 of the same block"):
        uni.step(eps, field(eps, 2), 2)
    with pytest.raises(ConfigError, match="sampler.kind must be one of"):
        SamplerConfig(kind="dpm++")


def test_kvpo_iteration_tiny_longlive2(tmp_path):
    """The longlive2-5b preset with the tiny Wan2.2-shaped model (48 channels) and small latents: one KVPO
    iteration (blocks of 8, UniPC, 16 routed slots) runs, is finite, and moves the LoRA."""
    from kvpo_megatron.kvpo.trainer import KVPOTrainer
    from kvpo_megatron.lora import lora_parameters

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("a red fox running through fresh snow at dawn\n")
    cfg = from_dict(KVPOTrainConfig, deep_merge(generator_preset("longlive2-5b"), {
        "model": {"preset": "tiny-wan2.2", "overrides": {"init_method_std": 0.3}},
        "video": {"num_frames": 40, "latent_height": 4, "latent_width": 4},
        "routing": {"window_blocks": 2},
        "rollout": {"num_branches": 2},
        "lora": {"rank": 4, "alpha": 4.0},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "objective": {"guard": False},
        "decoder": {"kind": "preview", "latent_channels": 48},
        "reward": {"components": [{"kind": "brightness", "weight": 1.0, "params": {"target": 1.0}}]},
        "data": {"prompts": str(prompt)},
        "train": {"iterations": 1, "out_dir": str(tmp_path / "run"), "progress": False},
    }))
    trainer = KVPOTrainer(cfg)
    groups = []
    run = trainer.rollout.run
    trainer.rollout.run = lambda *a, **k: groups.append(run(*a, **k)) or groups[-1]
    before = [p.detach().clone() for _, p in lora_parameters(trainer.model)]
    metrics = trainer.step()
    (group,) = groups
    assert group.pivot == 4 and group.window == [4]  # the first block with |R| = 24 > 16 routed slots (frame 32)
    branch = group.branches[0]
    assert {len(r) for r in branch.routes.values()} == {16}
    assert sorted({t.timestep for t in branch.tuples}) == [937.0, 999.0]  # routed steps: first half of UniPC's
    assert group.anchor.latents.shape == (1, 48, 40, 4, 4)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if isinstance(v, float))
    after = [p.detach() for _, p in lora_parameters(trainer.model)]
    assert any((a - b).abs().max() > 0 for a, b in zip(after, before))
