"""Save and load a *model checkpoint directory* (layout: ``checkpoint/dist.py``) with its LoRA, at any TP/CP.

Base weights go to the base parameters. A stored LoRA goes into the model's adapters when it has them
(``lora.apply_lora`` first, with the rank/alpha of ``kvpo_checkpoint.json``), else it is merged into this rank's
slices of the base weights (``lora_tensors.merged_weight``), so generation with a plain model runs the adapted
network. Every rank of the world calls these together (they are collective).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from kvpo_megatron.checkpoint import safe_dcp
from kvpo_megatron.checkpoint.dist import (INFO_FILE, LORA_PREFIX, layout, load_full_tensors, load_params_dist,
                                           lora_sharded_state_dict, model_sharded_state_dict, partition_dim, read_info,
                                           save_sharded, tensor_metadata)
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.lora import ADAPTER, load_lora_full_state_dict, lora_full_state_dict, lora_layers
from kvpo_megatron.lora_tensors import is_lora_name, lora_pairs, merged_weight
from kvpo_megatron.parallel.collectives import global_rank

log = logging.getLogger(__name__)


def save_model_dist(model: torch.nn.Module, path: str | Path, *, dtype: torch.dtype | None = None,
                    info: dict | None = None) -> None:
    """Save base weights (cast to ``dtype``) and, if the model has LoRA adapters, their full tensors."""
    all_names = [n for n, _ in model.named_parameters()]
    names = [n for n in all_names if not is_lora_name(n)]
    sd = model_sharded_state_dict(model, names=names)
    if dtype is not None:
        for st in sd.values():
            st.data = st.data.to(dtype)
    if len(names) < len(all_names):
        sd.update(lora_sharded_state_dict(lora_full_state_dict(model)))
    Path(path).mkdir(parents=True, exist_ok=True)
    save_sharded(sd, path)
    if global_rank() == 0:
        if info is not None:
            (Path(path) / INFO_FILE).write_text(json.dumps(info, indent=2))
        safe_dcp.write_manifest(path)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the checkpoint, info file included, is complete on every rank's return


def _merge_lora_into_base(model, lora: dict[str, torch.Tensor], scaling: float) -> None:
    """W += scaling * B @ A on this rank's slice of each base weight (rows of B or columns of A of the slice)."""
    tp_rank, tp_size, _ = layout(getattr(model, "pg_collection", None))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, (a, b) in lora_pairs(lora).items():  # a [r, in], b [out, r]
            p = params.get(module + ".weight")
            if p is None:
                raise ConfigError(f"LoRA module {module} has no base weight in the model")
            dim = partition_dim(p)
            if dim == 0 and tp_size > 1:
                b = b.chunk(tp_size, dim=0)[tp_rank]
            elif dim == 1 and tp_size > 1:
                a = a.chunk(tp_size, dim=1)[tp_rank]
            p.copy_(merged_weight(p, a, b, scaling))


def load_model_dist(model: torch.nn.Module, path: str | Path) -> None:
    """Load a model checkpoint directory into ``model`` at its TP/CP layout (module docstring)."""
    meta = tensor_metadata(path)
    all_names = [n for n, _ in model.named_parameters()]
    names = [n for n in all_names if not is_lora_name(n)]
    load_params_dist(model, path, names=names, meta=meta)
    has_lora = any(k.startswith(LORA_PREFIX) for k in meta)
    if not has_lora:
        if len(names) < len(all_names):
            log.info("%s holds no LoRA; the model's adapters keep their initialisation", path)
        return
    layers = list(lora_layers(model))
    info = read_info(path) or {}
    lcfg = info.get("lora") or {}
    full = load_full_tensors(path, prefix=LORA_PREFIX, meta=meta)
    if layers:
        layer = layers[0][1]
        r, alpha = layer.r[ADAPTER], layer.lora_alpha[ADAPTER]
        if lcfg and (lcfg["rank"] != r or float(lcfg["alpha"]) != float(alpha)):
            raise ConfigError(f"{path}: LoRA r={lcfg['rank']}, alpha={lcfg['alpha']} but the model's adapters have "
                              f"r={r}, alpha={alpha}")
        load_lora_full_state_dict(model, full, source_name=str(path))
        return
    if not lcfg:
        raise ConfigError(f"{path}: holds LoRA tensors but {INFO_FILE} has no 'lora' entry (rank, alpha)")
    _merge_lora_into_base(model, full, float(lcfg["alpha"]) / int(lcfg["rank"]))
    log.info("merged the checkpoint's LoRA (r=%s, alpha=%s) into the base weights", lcfg["rank"], lcfg["alpha"])
