"""LoRA adapter files: the ones we write for other tools (ComfyUI / Wan names, the default; diffusers names; peft),
and the LoRA files users bring (:func:`read_lora`).

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

Read (:func:`read_lora`, the converter's ``--lora``): LongLive's / MemFlow's ``lora.pt``
(``{generator_lora, critic_lora, step}``; LongLive 2.0's ``lora_checkpoint.pt`` alike), a raw peft state dict
(``base_model.model.blocks.0.self_attn.q.lora_A.weight``, Wan names), or a peft adapter directory
(``adapter_model.safetensors``); files are read with safetensors or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch

from kvpo_megatron.checkpoint.formats import clean_key, read_safetensors, torch_load
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


# ------------------------------------------------------------------------------------------ LoRA files users bring
@dataclass(kw_only=True)
class LoraWeights:
    """A LoRA read from a peft-style state dict: per target linear (our name) its full A [r, in] and B [out, r]."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Our module name (``blocks.0.self_attn.q``) -> (lora_A, lora_B)."""
    rank: int = 0
    """LoRA rank r."""
    name: str = ""
    """The file it was read from (for messages)."""


_PEFT = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _peft_module_to_ours(mod: str) -> str | None:
    for prefix in ("base_model.model.", "model."):
        if mod.startswith(prefix):
            mod = mod[len(prefix):]
    mod = clean_key(mod)
    for fmt in ("wan", "ours", "diffusers"):
        ours = rename(mod + ".weight", fmt, "ours")
        if ours is not None:
            return ours[: -len(".weight")]
    return None


def parse_peft_state_dict(sd: dict, *, source_name: str) -> LoraWeights:
    """peft keys (``base_model.model.<module>.lora_A[.default].weight``) -> ``LoraWeights`` in our names."""
    a, b, bad = {}, {}, []
    for k, v in sd.items():
        m = _PEFT.match(k)
        ours = _peft_module_to_ours(m["mod"]) if m else None
        if ours is None or not isinstance(v, torch.Tensor) or v.dim() != 2:
            bad.append(k)
            continue
        (a if m["ab"] == "A" else b)[ours] = v
    unpaired = sorted(set(a) ^ set(b))
    if bad or unpaired or not a:
        raise ConfigError(f"{source_name}: not a LoRA state dict over the block linears: unknown keys {bad[:20]}, "
                          f"modules without both lora_A and lora_B {unpaired[:20]}" + ("" if a else " (no LoRA keys)"))
    ranks = {t.shape[0] for t in a.values()} | {t.shape[1] for t in b.values()}
    if len(ranks) != 1:
        raise ConfigError(f"{source_name}: LoRA ranks differ between modules: {sorted(ranks)}")
    return LoraWeights(pairs={m: (a[m], b[m]) for m in sorted(a)}, rank=ranks.pop(), name=source_name)


def read_lora(path: str | Path) -> LoraWeights:
    """LongLive/MemFlow ``lora.pt`` (``generator_lora``) or a raw peft state dict, or a peft adapter dir."""
    path = Path(path)
    if path.is_dir():
        if (path / ".metadata").is_file():  # torch DCP
            raise ConfigError(f"{path} is a megatron dist checkpoint directory, not a LoRA file or peft adapter; "
                              "export its LoRA with tools/convert_checkpoint.py export DIR --lora-only OUT")
        if not (path / "adapter_model.safetensors").exists() and (path / "adapter_model.bin").exists():
            raise ConfigError(f"{path}: adapter_model.bin is a pickle, which is not read; save the adapter as "
                              "adapter_model.safetensors (peft: save_pretrained(safe_serialization=True))")
        path = path / "adapter_model.safetensors"
    if not path.exists():
        raise ConfigError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        sd = read_safetensors(path)
    else:
        sd = torch_load(path)
    if not isinstance(sd, dict):
        raise ConfigError(f"{path}: expected a dict, got {type(sd).__name__}")
    if isinstance(sd.get("generator_lora"), dict):
        sd = sd["generator_lora"]
    return parse_peft_state_dict({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()},
                                 source_name=str(path))
