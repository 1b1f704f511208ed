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


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a full state dict file (any supported naming) into a possibly TP-sharded model."""
    p = Path(path)
    if p.is_dir():
        from kvpo_megatron.checkpoint.dist import load_model_dist
        load_model_dist(model, p)
        return
    sd = read_state_dict(p)
    for key in ("generator_ema", "generator", "model"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = strip_prefix(sd)
    fmt = detect_format(sd)
    load_full_state_dict(model, convert_state_dict(sd, fmt, "ours", source_name=str(p)), source_name=str(p))
