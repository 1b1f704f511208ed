"""The LoRA adapter of a training checkpoint (``checkpoint/training.py``): raw weights or their EMA.

A training checkpoint stores the trainable LoRA as ``model.<peft name>`` (``blocks.0.self_attn.q.lora_A.default
.weight``) and, when the trainer keeps an EMA, its average as ``ema.<peft name>``; the job's configuration is in
its ``training_state.json`` (``extra.config``). Each checkpoint is verified first (``verify_training_checkpoint``:
state JSON, torch_dist metadata without code, manifest checksums). This module reads either set

* as full tensors keyed like ``lora.lora_full_state_dict`` (``blocks.0.self_attn.q.lora_A.weight``), for export
  (``tools/convert_checkpoint.py export CKPT --lora-only OUT --weights ema``), or
* straight into a model with LoRA at any TP (``tools/evaluate.py``).
"""
from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

import torch
import torch.distributed as dist

from kvpo_megatron.checkpoint.dist import load_full_tensors, load_params_dist, tensor_metadata
from kvpo_megatron.checkpoint.training import COMPLETE, EMA_PREFIX, verify_training_checkpoint
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.lora import lora_parameters
from kvpo_megatron.parallel.state import init_distributed

MODEL_PREFIX = "model."
_PEFT_NAME = re.compile(r"\.(lora_[AB])\.default\.weight$")


class AdapterWeights(StrEnum):
    raw = "raw"  # the trained LoRA weights
    ema = "ema"  # their exponential moving average (kvpo/ema.py)


def is_training_checkpoint(path: str | Path) -> bool:
    """A complete training checkpoint directory (``iter_NNNNNNN`` with ``complete.json``)."""
    return (Path(path) / COMPLETE).is_file()


def _prefix(path: Path, weights: AdapterWeights, meta: dict) -> str:
    weights = AdapterWeights(weights)
    prefix = EMA_PREFIX if weights == AdapterWeights.ema else MODEL_PREFIX
    if not any(k.startswith(prefix) and _PEFT_NAME.search(k) for k in meta):
        what = "EMA weights (train with ema.decay > 0)" if weights == AdapterWeights.ema else "LoRA weights"
        raise ConfigError(f"{path}: this training checkpoint holds no {what}")
    return prefix


def _verified(path: str | Path) -> dict:
    """The training state of a complete, intact checkpoint (``ConfigError`` otherwise)."""
    path = Path(path)
    if not is_training_checkpoint(path):
        raise ConfigError(f"{path} is not a complete training checkpoint (no {COMPLETE})")
    return verify_training_checkpoint(path)


def training_config(path: str | Path) -> dict:
    """The job configuration a training checkpoint was saved with (``extra.config``, plain dicts)."""
    config = (_verified(path).get("extra") or {}).get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the checkpoint's training state has no extra.config")
    return config


def read_training_adapter(path: str | Path, weights: AdapterWeights | str = AdapterWeights.raw
                          ) -> dict[str, torch.Tensor]:
    """Full LoRA tensors of a training checkpoint, keyed ``<module>.lora_A.weight`` / ``.lora_B.weight``."""
    path = Path(path)
    _verified(path)
    if not dist.is_initialized():  # megatron's loader is collective: a 1-rank world for a plain process
        init_distributed()
    meta = tensor_metadata(path)
    prefix = _prefix(path, weights, meta)
    lora_meta = {k: v for k, v in meta.items() if k.startswith(prefix) and _PEFT_NAME.search(k)}
    full = load_full_tensors(path, prefix=prefix, meta=lora_meta)  # (megatron adds the common state: dropped)
    return {_PEFT_NAME.sub(r".\1.weight", k[len(prefix):]): full[k[len(prefix):]] for k in lora_meta}


def load_training_adapter(model: torch.nn.Module, path: str | Path,
                          weights: AdapterWeights | str = AdapterWeights.raw) -> None:
    """Copy a training checkpoint's LoRA (raw or EMA) into ``model``'s adapters at the model's TP (collective)."""
    path = Path(path)
    _verified(path)
    meta = tensor_metadata(path)
    prefix = _prefix(path, weights, meta)
    names = [n for n, _ in lora_parameters(model)]
    load_params_dist(model, path, names=names, key_fn=lambda n: prefix + n, prefix=prefix, meta=meta)
