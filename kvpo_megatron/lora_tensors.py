"""LoRA as plain tensors (no peft, no megatron): parameter names, factor pairs, and the one merge ``W + s B A``.

Every merge of a LoRA into base weights goes through :func:`merged_weight`: the peft layers' ``merge``
(``lora_layers.py``), a model directory's LoRA loaded into a model without adapters (``checkpoint/model_dir.py``,
on this rank's TP slice), ``export --merge-lora`` (``checkpoint/convert.py``) and VideoAlign's reward LoRA
(``rewards/videoalign.py``). Full LoRA state dicts key the factors ``<module>.lora_A.weight`` [r, in] and
``<module>.lora_B.weight`` [out, r].
"""
from __future__ import annotations

import torch

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
BLOCK_LINEARS = ("q", "k", "v", "o", "ffn_fc1", "ffn_fc2")
"""Leaf names of the linears inside a DiT block (q,k,v,o exist in both self_attn and cross_attn)."""


def is_lora_name(name: str) -> bool:
    """A LoRA parameter (peft names: ``...q.lora_A.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """A parameter's name as it was before ``lora.apply_lora`` (drops peft's ``.base_layer``)."""
    return name.replace(".base_layer.", ".")


def lora_pairs(full: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` of a full LoRA state dict (modules in sorted order); a lone factor raises ``KeyError``."""
    mods = sorted({k[: -len(LORA_A)] for k in full if k.endswith(LORA_A)} |
                  {k[: -len(LORA_B)] for k in full if k.endswith(LORA_B)})
    lone = [m for m in mods if m + LORA_A not in full or m + LORA_B not in full]
    if lone:
        raise KeyError(f"LoRA modules without both lora_A and lora_B: {lone[:10]}")
    return {m: (full[m + LORA_A], full[m + LORA_B]) for m in mods}


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A`` in float32 (on the factors' device): ``a`` [r, in], ``b`` [out, r] -> [out, in]."""
    return (b.float() @ a.float()) * scaling


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A``, added in float32 and returned in ``W``'s dtype on ``W``'s device.

    ``a`` [r, in], ``b`` [out, r] are the factors of ``W`` [out, in] (or of its tensor-parallel slice)."""
    return (weight.float() + delta_weight(a, b, scaling).to(weight.device)).to(weight.dtype)


def merge_full(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scaling: float) -> dict:
    """Full base weights (``<module>.weight``) with every module's LoRA merged in (:func:`merged_weight`)."""
    out = dict(base)
    for mod, (a, b) in lora_pairs(lora).items():
        out[mod + ".weight"] = merged_weight(out[mod + ".weight"], a, b, scaling)
    return out
