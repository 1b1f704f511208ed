"""Named generator presets: the settings under which each released causal Wan generator reproduces its own
inference code, as config-tree values (``--preset NAME`` on ``examples/generate.py`` / ``examples/train_kvpo.py``).

Every preset samples as its checkpoint was distilled (Self-Forcing DMD, inherited by LongLive and MemFlow):
``sampler.kind: renoise`` over the timesteps [1000, 750, 500, 250] warped with shift 5, i.e. x0 = x - sigma v
then fresh noise at the next timestep; the commit pass writes the clean block at ``context_noise`` 0. The
``ode`` sampler (deterministic Euler on the velocity) is the KVPO paper's variant and is chosen explicitly with
``sampler.kind=ode``; on these checkpoints it gives different videos.

Where each value comes from (upstream files read at the commits named):

``self-forcing-1.3b`` (guandeh17/Self-Forcing 33593df)
    ``configs/self_forcing_dmd.yaml``: ``denoising_step_list`` [1000, 750, 500, 250], ``warp_denoising_step``,
    ``timestep_shift`` 5.0, ``num_frame_per_block`` 3; ``configs/default_config.yaml``: ``context_noise`` 0,
    ``independent_first_frame`` false. ``utils/wan_wrapper.py``: ``WanDiffusionWrapper`` defaults
    ``local_attn_size=-1``, ``sink_size=0`` (the yaml sets neither). ``wan/modules/causal_model.py``
    (``CausalWanSelfAttention``): ``local_attn_size == -1`` means a 32760-token (21-frame) cache attended in full,
    no sink, no eviction, so a block attends every earlier frame of its 21-frame video: sink 0 + a local window of
    21 frames here (longer videos, which upstream cannot make, slide that window). ``inference.py`` loads
    ``generator_ema`` with ``--use_ema`` as the README's command does (``model.use_ema``). No prompt switches.
``longlive-1.3b`` (NVlabs/LongLive 2462895, the last LongLive 1.0 commit)
    ``configs/longlive_inference.yaml`` / ``longlive_interactive_inference.yaml``: the same steps and shift,
    ``num_frame_per_block`` 3, ``local_attn_size`` 12, ``sink_size`` 3, ``context_noise`` 0, ``global_sink``
    true. ``wan/modules/causal_model.py``: the cache holds 12 frames; attention reads the 3 sink frames plus the
    last ``12 - 3 = 9`` frames including the block (sink 3 + local 9 here). ``pipeline/interactive_causal_
    inference.py``: at a prompt switch the cached window is recomputed under the new prompt (``recache_on_switch``).
``memflow-1.3b`` (KlingTeam/MemFlow 7ed5147)
    ``configs/inference.yaml``: LongLive's settings plus ``bank_size`` 3, ``record_interval`` 3, ``SMA`` false;
    the bank's schedule is ``MemoryBankConfig.schedule = release`` (``model/memory_bank.py``).
``longlive2-5b`` (NVlabs/LongLive main 7860ad9; ``docs/longlive2.md``)
    ``configs/inference.yaml``: Wan2.2-TI2V-5B at 1280x704 (44 x 80 latents, 880 tokens per frame),
    ``num_frame_per_block`` 8, ``local_attn_size`` 32 (sink 8 + local 24), ``sink_size`` 8 with
    ``multi_shot_sink`` (shot sinks, ``model/multishot.py``) and ``multi_shot_rope_offset`` 8, no recache at prompt
    switches; ``pipeline/causal_diffusion_inference.py``: 4-step UniPC at shift 5 (model timesteps 999, 937, 833,
    624), clean commit pass. CHR keeps the current block fixed: 16 routed slots (8 while a shot sink is merged).
"""
from __future__ import annotations

import copy

from kvpo_megatron.errors import ConfigError

UPSTREAM_SAMPLER = {"kind": "renoise", "timesteps": [1000.0, 750.0, 500.0, 250.0], "shift": 5.0, "context_noise": 0.0}
"""The distilled generators' sampler (Self-Forcing ``configs/self_forcing_dmd.yaml``)."""

_LONGLIVE_CACHE = {"frames_per_block": 3, "num_sink_frames": 3, "local_attn_frames": 9, "history_frames": 30}

GENERATOR_PRESETS: dict[str, dict] = {
    # Self-Forcing: Wan2.1-1.3B, no sink, every earlier frame of the 21-frame video attended, no prompt switches.
    "self-forcing-1.3b": {
        "model": {"preset": "wan-1.3b", "use_ema": True},
        "cache": {"frames_per_block": 3, "num_sink_frames": 0, "local_attn_frames": 21, "history_frames": 30,
                  "memory_bank": None},
        "sampler": dict(UPSTREAM_SAMPLER),
        "routing": {"num_recent_fixed": 3},
        "recache_on_switch": False,
    },
    # LongLive: Wan2.1-1.3B, sink 3 + local 9 (span 12), 30 retained frames, recache at prompt switches.
    "longlive-1.3b": {
        "model": {"preset": "wan-1.3b"},
        "cache": {**_LONGLIVE_CACHE, "memory_bank": None},
        "sampler": dict(UPSTREAM_SAMPLER),
        "routing": {"num_recent_fixed": 3},
        "recache_on_switch": True,
    },
    # MemFlow: LongLive + a 3-entry per-layer bank on its released schedule (attended span up to 15 frames).
    "memflow-1.3b": {
        "model": {"preset": "wan-1.3b"},
        "cache": {**_LONGLIVE_CACHE,
                  "memory_bank": {"bank_size": 3, "record_interval": 3, "schedule": "release", "bank_score": "dot",
                                  "mask_padding": False, "sma": False, "sma_top_k": 3}},
        "sampler": dict(UPSTREAM_SAMPLER),
        "routing": {"num_recent_fixed": 3},
        "recache_on_switch": True,
    },
}

GENERATOR_PRESETS["longlive2-5b"] = {
    "model": {"preset": "wan2.2-5b"},
    "cache": {"frames_per_block": 8, "num_sink_frames": 8, "local_attn_frames": 24, "history_frames": 40,
              "memory_bank": None, "shot_sinks": True, "shot_rope_offset": 8},
    "sampler": {"timesteps": [999.0, 749.25, 499.5, 249.75], "shift": 5.0, "kind": "unipc", "context_noise": 0.0},
    "video": {"num_frames": 128, "latent_height": 44, "latent_width": 80},
    "decoder": {"latent_channels": 48},
    "routing": {"num_recent_fixed": 8},
    "recache_on_switch": False,
}

GENERATE_SECTIONS = frozenset({"model", "cache", "sampler", "video", "recache_on_switch"})
"""The sections ``GenerateConfig`` has (no KVPO ``routing``)."""


def generator_preset(name: str, sections: set[str] | frozenset[str] | None = None) -> dict:
    """Config-tree values of a named generator (merge under a YAML/CLI tree, e.g. ``KVPOTrainConfig``);
    ``sections`` keeps only those top-level keys (``GENERATE_SECTIONS`` for ``GenerateConfig``)."""
    if name not in GENERATOR_PRESETS:
        raise ConfigError(f"unknown generator preset {name!r}; choose one of {sorted(GENERATOR_PRESETS)}")
    tree = copy.deepcopy(GENERATOR_PRESETS[name])
    return tree if sections is None else {k: v for k, v in tree.items() if k in sections}
