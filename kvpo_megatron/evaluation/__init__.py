"""Evaluation of trained checkpoints against the base model (``tools/evaluate.py``).

``config.py`` (settings, weights choice) -> ``runner.py`` (variants x jobs: generate, decode, score, resume, DP)
-> ``report.py`` (CSV/JSON tables, HTML report with video grids and bar charts).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch.distributed as dist

from kvpo_megatron.checkpoint.training import complete_checkpoints
from kvpo_megatron.checkpoint.training_adapter import is_training_checkpoint, training_config
from kvpo_megatron.config import deep_merge, from_dict, load_config, parse_overrides, to_dict
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.evaluation.config import EvalConfig
from kvpo_megatron.evaluation.report import write_report
from kvpo_megatron.evaluation.runner import Evaluator, plan_jobs, plan_variants
from kvpo_megatron.extras import check_job_extras, require
from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
from kvpo_megatron.presets import generator_preset

log = logging.getLogger(__name__)
EVAL_PREFIX = "eval."
# sections of the training config that decide what a video looks like and how it is scored
_FINGERPRINT_KEYS = ("model", "cache", "sampler", "video", "text", "decoder", "reward", "lora", "recache_on_switch")


def _first_training_checkpoint(paths: list[str]) -> Path | None:
    for p in map(Path, paths):
        if is_training_checkpoint(p):
            return p
        found = complete_checkpoints(p) if p.is_dir() else []
        if found:
            return found[-1]
    return None


def load_eval_configs(paths: list[str], *, config: str | None = None, preset: str | None = None,
                      overrides: list[str] | None = None):
    """(training config, ``EvalConfig``). Overrides ``eval.*`` go to the evaluation section, the rest to the
    training config, which is ``--preset``/``--config`` if given, else the first training checkpoint's saved
    configuration, else the embedded tiny default."""
    overrides = list(overrides or [])
    ev = [o[len(EVAL_PREFIX):] for o in overrides if o.startswith(EVAL_PREFIX)]
    tr = [o for o in overrides if not o.startswith(EVAL_PREFIX)]
    if config is not None or preset is not None:
        train = load_config(KVPOTrainConfig, config, tr, base=generator_preset(preset) if preset else {})
    else:
        ckpt = _first_training_checkpoint(paths)
        saved = TINY_DEFAULT if ckpt is None else training_config(ckpt)
        saved = {k: v for k, v in saved.items() if k != "logging"}  # W&B settings of the run are not needed here
        if ckpt is not None:
            log.info("training configuration from %s", ckpt)
        train = from_dict(KVPOTrainConfig, deep_merge(saved, parse_overrides(tr)))
    # the settings' defaults differ (prompt files, lengths): overrides go on top of the default tree
    return train, from_dict(EvalConfig, deep_merge(to_dict(EvalConfig()), parse_overrides(ev)), "eval")


def fingerprint(train_cfg) -> str:
    tree = to_dict(train_cfg)
    blob = json.dumps({k: tree.get(k) for k in _FINGERPRINT_KEYS}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run_evaluation(paths: list[str], train_cfg, eval_cfg: EvalConfig, out: str | Path) -> dict:
    """Generate, score and report (collective under torchrun). Returns ``{'generated': n, 'html': path, ...}``
    (the paths on global rank 0 only)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    check_job_extras(train_cfg)  # the model's text encoder, decoder and rewards
    require(("av",), "media", "tools/evaluate.py (the mp4 writer)")
    variants = plan_variants(paths, eval_cfg)
    jobs = plan_jobs(eval_cfg, train_frames=train_cfg.video.num_frames,
                     frames_per_block=train_cfg.cache.frames_per_block)
    ev = Evaluator(train_cfg, eval_cfg, out, fingerprint=fingerprint(train_cfg))
    made = ev.run(variants, jobs)
    result: dict = {"generated": made}
    if dist.get_rank() == 0:
        meta = {"model": f"{train_cfg.model.preset} {train_cfg.model.overrides or ''}".strip(),
                "checkpoint": train_cfg.model.checkpoint, "seed": eval_cfg.seed,
                "weights": {c.name: c.weight for c in train_cfg.reward.components},
                "eval": to_dict(eval_cfg), "fingerprint": fingerprint(train_cfg)}
        result.update(write_report(out, variants, jobs, meta))
        log.info("report: %s (tables %s, %s)", result["html"], result["csv"], result["summary"])
    dist.barrier()
    return result
