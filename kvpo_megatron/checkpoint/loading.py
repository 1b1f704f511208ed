"""Load model weights from the files users have: safetensors / torch files in our, Wan or diffusers names."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from kvpo_megatron.checkpoint.dist import INFO_FILE, read_info
from kvpo_megatron.checkpoint.model_dir import load_model_dist
from kvpo_megatron.checkpoint.formats import read_weights
from kvpo_megatron.checkpoint.sharding import load_full_state_dict
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.lora import LoRAConfig, apply_lora
from kvpo_megatron.lora_tensors import base_name, is_lora_name
from kvpo_megatron.model.build import ModelSection

log = logging.getLogger(__name__)


def warn_if_random_weights(section) -> bool:
    """A loud warning (rank 0) when a real-size preset has no ``checkpoint``: its weights stay random, so a run
    trains or generates noise. Returns whether it warned (the ``tiny`` preset is a test model: never)."""
    if section.checkpoint or section.preset == "tiny":
        return False
    if int(os.environ.get("RANK", "0")) == 0:
        bar = "!" * 100
        log.warning("%s\nmodel.checkpoint is not set: the %s model keeps RANDOM weights, so this run trains/generates "
                    "noise.\nSet model.checkpoint to a directory from tools/convert_checkpoint.py import (or a weights "
                    "file) in your config.\n%s", bar, section.preset, bar)
    return True


def checkpoint_model_section(path: str | Path):
    """The ``ModelSection`` (preset + overrides, ``checkpoint=path``) of an imported checkpoint directory."""
    info = read_info(path)
    if not info or "model" not in info:
        raise ConfigError(f"{path}: no {INFO_FILE} with a 'model' entry; was it written by convert_checkpoint import?")
    return ModelSection(preset=info["model"]["preset"], overrides=dict(info["model"]["overrides"]), checkpoint=str(path))


def checkpoint_lora_config(path: str | Path):
    """The ``LoRAConfig`` of the LoRA stored in an imported checkpoint directory, or None if it holds none."""
    lora = (read_info(path) or {}).get("lora")
    if not lora:
        return None
    return LoRAConfig(rank=int(lora["rank"]), alpha=float(lora["alpha"]), target_modules=tuple(lora["target_modules"]))


def load_model_weights(model: torch.nn.Module, path: str | Path, *, use_ema: bool = False) -> None:
    """Load weights into a possibly TP/CP-sharded model, with or without LoRA injected: a checkpoint directory
    written by ``tools/convert_checkpoint.py import`` (any TP/CP; see ``checkpoint/dist.py`` for its LoRA), or the
    files users have, read by the converter's reader (``formats.read_weights``): one safetensors / torch file or
    a directory of (sharded) safetensors, in our, Wan or diffusers names; a Self-Forcing/LongLive/MemFlow training
    dict gives ``generator`` (or ``model``), ``generator_ema`` with ``use_ema``, as the converter's ``--use-ema``.
    On a model with LoRA the base weights go to the ``base_layer`` names and the adapters stay as they are."""
    p = Path(path)
    if p.is_dir() and (p / ".metadata").is_file():  # torch DCP: a converted / training checkpoint directory
        load_model_dist(model, p)
        return
    weights = read_weights(p, use_ema=use_ema)
    full = {k: t.load() for k, t in weights.tensors.items()}
    for name, _ in model.named_parameters():
        if name != base_name(name) and base_name(name) in full:
            full[name] = full.pop(base_name(name))
    load_full_state_dict(model, full, source_name=weights.name, skip=is_lora_name)


def load_weights_with_lora(model: torch.nn.Module, section, lora_cfg) -> None:
    """Base weights from ``section.checkpoint`` (a ``ModelSection``; random init when None), then LoRA
    ``lora_cfg`` applied. A converted checkpoint directory's LoRA becomes the model's adapter (its rank and alpha
    must match ``lora_cfg``). The trainer and ``tools/evaluate.py`` build their models this way."""
    path = section.checkpoint
    ck = checkpoint_lora_config(path) if path is not None and Path(path).is_dir() else None
    if ck is not None:
        if (ck.rank, ck.alpha) != (lora_cfg.rank, lora_cfg.alpha):
            raise ConfigError(f"checkpoint {path} holds a LoRA of rank {ck.rank}, alpha {ck.alpha}; set "
                              f"lora.rank/lora.alpha to match (got {lora_cfg.rank}, {lora_cfg.alpha})")
        apply_lora(model, lora_cfg)
        load_model_weights(model, path, use_ema=section.use_ema)
        return
    if path is not None:
        load_model_weights(model, path, use_ema=section.use_ema)
    apply_lora(model, lora_cfg)
