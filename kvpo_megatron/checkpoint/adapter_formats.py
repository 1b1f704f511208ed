"""LoRA adapter files other tools load: ComfyUI / Wan names (the default), diffusers names, or peft.

Input everywhere: the full (TP-gathered) LoRA tensors in our names, ``blocks.{n}.{a}.q.lora_A.weight`` [r, in] /
``...lora_B.weight`` [out, r] (``lora.lora_full_state_dict``, or a checkpoint directory's ``lora.`` tensors),
and the ``LoRAConfig`` (rank, alpha). Each format's file, and who loads it:

* ``comfyui``: one ``lora.safetensors`` of original Wan module names under ``diffusion_model.`` with
  ``.lora_A.weight`` / ``.lora_B.weight`` and the scalar ``.alpha`` per module. ComfyUI's LoRA loader maps
  ``diffusion_model.<module>`` to the model's weights (``comfy/lora.py`` ``model_lora_keys_unet``) and reads
  ``lora_A``/``lora_B``/``alpha`` (``comfy/weight_adapter/lora.py``); diffusers'
  ``WanPipeline.load_lora_weights`` converts these keys (``_convert_non_diffusers_wan_lora_to_diffusers``,
  folding ``alpha / r`` into the factors). The adapter needs no metadata to keep its scale.
* ``diffusers``: ``pytorch_lora_weights.safetensors`` written by diffusers' own ``WanPipeline.save_lora_weights``
  (``transformer.``-prefixed diffusers module names, the LoRA config with alpha in the file's metadata), for
  ``WanPipeline.load_lora_weights(dir)`` and ``WanTransformer3DModel.load_lora_adapter(dir)``. Needs diffusers.
* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` (``base_model.model.`` keys) in our module
  names (``lora.load_adapter``; ``PeftModel`` on this model) or Wan's (LongLive/MemFlow peft models).
"""
from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import torch

from kvpo_megatron.checkpoint.mappings import rename
from kvpo_megatron.errors import ConfigError

COMFYUI_FILE = "lora.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


class AdapterFormat(StrEnum):
    comfyui = "comfyui"  # Wan names under diffusion_model. + .alpha: ComfyUI and diffusers load it
    diffusers = "diffusers"  # transformer.-prefixed diffusers names + LoRA config metadata (diffusers' writer)
    peft = "peft"  # adapter_config.json + adapter_model.safetensors


def _modules(full: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our module name -> (lora_A, lora_B); a key that is not a LoRA factor of a known linear is an error."""
    a, b, bad = {}, {}, []
    for k, v in full.items():
        mod, _, half = k.rpartition(".lora_")
        if half not in ("A.weight", "B.weight") or rename(mod + ".weight", "ours", "wan") is None:
            bad.append(k)
            continue
        (a if half == "A.weight" else b)[mod] = v
    if bad or set(a) != set(b) or not a:
        raise ConfigError(f"not a LoRA over the model's linears: unknown keys {bad[:10]}, unpaired "
                          f"{sorted(set(a) ^ set(b))[:10]}")
    return {m: (a[m], b[m]) for m in sorted(a)}


def _module_name(mod: str, fmt: str) -> str:
    return rename(mod + ".weight", "ours", fmt)[: -len(".weight")]


def comfyui_state_dict(full: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``diffusion_model.<Wan module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` (float32 scalar)."""
    out = {}
    for mod, (a, b) in _modules(full).items():
        name = "diffusion_model." + _module_name(mod, "wan")
        out[f"{name}.lora_A.weight"] = a.contiguous()
        out[f"{name}.lora_B.weight"] = b.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def diffusers_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers module names without the ``transformer.`` prefix (diffusers' writer adds it)."""
    out = {}
    for mod, (a, b) in _modules(full).items():
        name = _module_name(mod, "diffusers")
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a.contiguous(), b.contiguous()
    return out


def write_comfyui(full: dict[str, torch.Tensor], alpha: float, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file(comfyui_state_dict(full, alpha), str(path), metadata={"format": "pt"})
    return path


def write_diffusers(full: dict[str, torch.Tensor], cfg, out_dir: str | Path) -> Path:
    """``pytorch_lora_weights.safetensors`` through diffusers' ``WanPipeline.save_lora_weights``."""
    try:
        from diffusers import WanPipeline
    except ImportError as e:
        raise ConfigError(f"--lora-format diffusers needs diffusers (pip install diffusers): {e}") from e
    sd = diffusers_state_dict(full)
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    meta = {"r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": targets, "lora_dropout": 0.0,
            "bias": "none", "use_dora": False, "use_rslora": False}
    WanPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta,
                                  weight_name=DIFFUSERS_FILE)
    return Path(out_dir) / DIFFUSERS_FILE
