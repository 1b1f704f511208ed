"""Load model weights from the files users have: safetensors / torch files in our, Wan or diffusers names."""
from __future__ import annotations

from pathlib import Path

import torch

from kvpo_megatron.checkpoint.mappings import convert_state_dict, rename, strip_prefix
from kvpo_megatron.checkpoint.sharding import load_full_state_dict
from kvpo_megatron.errors import ConfigError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors or a torch file loaded with ``weights_only=True`` (never unpickles code)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report the file and the reason in one message
        raise ConfigError(f"cannot read checkpoint {p} with weights_only=True: {e}")


def detect_format(sd: dict) -> str:
    for fmt in ("ours", "wan", "diffusers"):
        if all(rename(k, fmt, "ours") is not None for k in sd):
            return fmt
    raise ConfigError("checkpoint keys match neither our, Wan's nor diffusers' names, e.g. "
                      f"{[k for k in sd if rename(k, 'ours', 'ours') is None][:5]}")


def checkpoint_model_section(path: str | Path):
    """The ``ModelSection`` (preset + overrides, ``checkpoint=path``) of an imported checkpoint directory."""
    from kvpo_megatron.checkpoint.dist import INFO_FILE, read_info
    from kvpo_megatron.model.build import ModelSection

    info = read_info(path)
    if not info or "model" not in info:
        raise ConfigError(f"{path}: no {INFO_FILE} with a 'model' entry; was it written by convert_checkpoint import?")
    return ModelSection(preset=info["model"]["preset"], overrides=dict(info["model"]["overrides"]), checkpoint=str(path))


def checkpoint_lora_config(path: str | Path):
    """The ``LoRAConfig`` of the LoRA stored in an imported checkpoint directory, or None if it holds none."""
    from kvpo_megatron.checkpoint.dist import read_info
    from kvpo_megatron.lora import LoRAConfig

    lora = (read_info(path) or {}).get("lora")
    if not lora:
        return None
    return LoRAConfig(rank=int(lora["rank"]), alpha=float(lora["alpha"]), target_modules=tuple(lora["target_modules"]))


def load_model_weights(model: torch.nn.Module, path: str | Path, *, use_ema: bool = False) -> None:
    """Load weights into a possibly TP/CP-sharded model: a checkpoint directory written by
    ``tools/convert_checkpoint.py import`` (any TP/CP; see ``checkpoint/dist.py`` for its LoRA), or a full state
    dict file (any supported naming; a Self-Forcing/LongLive/MemFlow training dict is unwrapped as the converter
    does: ``generator`` or ``model``, ``generator_ema`` with ``use_ema``)."""
    from kvpo_megatron.checkpoint.formats import unwrap_training_dict

    p = Path(path)
    if p.is_dir():
        from kvpo_megatron.checkpoint.dist import load_model_dist
        load_model_dist(model, p)
        return
    sd = read_state_dict(p)
    if use_ema or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        sd = unwrap_training_dict(sd, use_ema=use_ema, source_name=str(p))
    sd = strip_prefix(sd)
    fmt = detect_format(sd)
    full = convert_state_dict(sd, fmt, "ours", source_name=str(p))
    # a model with LoRA injected holds its base weights under ``.base_layer.`` names; its adapters stay as they are
    from kvpo_megatron.checkpoint.dist import base_name, is_lora_name
    for name, _ in model.named_parameters():
        if name != base_name(name) and base_name(name) in full:
            full[name] = full.pop(base_name(name))
    load_full_state_dict(model, full, source_name=str(p), skip=is_lora_name)


def load_weights_with_lora(model: torch.nn.Module, section, lora_cfg) -> None:
    """Base weights from ``section.checkpoint`` (a ``ModelSection``; random init when None), then LoRA
    ``lora_cfg`` applied. A converted checkpoint directory's LoRA becomes the model's adapter (its rank and alpha
    must match ``lora_cfg``). The trainer and ``tools/evaluate.py`` build their models this way."""
    from kvpo_megatron.lora import apply_lora

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
