"""LoRA on the DiT's block linears: apply, freeze, disable (reference policy), merge, gather, save/load.

Layers: ``kvpo_megatron/lora_layers.py`` (peft custom modules for megatron's parallel linears), injected
with ``peft.inject_adapter_in_model`` under adapter name ``"default"`` -- no ``PeftModel`` wrapper, the
model keeps its type and module names.

Names after :func:`apply_lora` (peft's convention; ``{n}`` block index, ``{a}`` ``self_attn``/``cross_attn``):

* base weights of an adapted linear move one level down:
  ``blocks.{n}.{a}.q.weight`` -> ``blocks.{n}.{a}.q.base_layer.weight`` (``lora_tensors.base_name``);
  every other parameter keeps its name;
* LoRA parameters: ``blocks.{n}.{a}.q.lora_A.default.weight`` / ``...lora_B.default.weight``
  (also ``ffn_fc1``, ``ffn_fc2``; :func:`lora_parameters` lists them);
* full LoRA state dicts (:func:`lora_full_state_dict`) drop the adapter name, as peft's saved files do:
  ``blocks.{n}.{a}.q.lora_A.weight`` [r, in], ``blocks.{n}.{a}.q.lora_B.weight`` [out, r];
* ``adapter_model.safetensors`` (:func:`save_adapter`) holds those keys prefixed with ``base_model.model.``,
  exactly what ``PeftModel.save_pretrained`` writes, so ``PeftModel.from_pretrained`` loads it on any torch
  model with the same module names (tests use an ``nn.Linear`` mirror).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from kvpo_megatron.checkpoint.adapter_formats import write_comfyui
from kvpo_megatron.checkpoint.formats import read_safetensors
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.lora_layers import ParallelLoraLinear, lora_base_types
from kvpo_megatron.lora_tensors import BLOCK_LINEARS
from kvpo_megatron.parallel.collectives import global_rank

logger = logging.getLogger(__name__)

ADAPTER = "default"
"""peft adapter name of the (single) LoRA adapter."""
PEFT_PREFIX = "base_model.model."
"""Key prefix of peft's saved adapter files (``PeftModel`` wraps the model as ``base_model.model``)."""
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass(kw_only=True, slots=True)
class LoRAConfig:
    """LoRA adapters on the DiT blocks' linears (peft LoRA; ``y = W x + alpha/rank * B A dropout(x)``)."""

    rank: int = 256
    """LoRA rank r (wan configs: 256; tests/tiny: small)."""
    alpha: float = 256.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input (0 = none)."""
    target_modules: tuple[str, ...] = BLOCK_LINEARS
    """Leaf names of the adapted linears inside ``blocks.{n}`` (any of q, k, v, o, ffn_fc1, ffn_fc2;
    q/k/v/o select the projection in both self- and cross-attention)."""
    init_seed: int = 0
    """Seed of lora_A's kaiming-uniform init (per layer: seed + module name; identical for any TP)."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.target_modules if t not in BLOCK_LINEARS]
        if not self.target_modules or unknown:
            raise ConfigError(f"lora.target_modules must be a non-empty subset of {list(BLOCK_LINEARS)}, "
                              f"got {list(self.target_modules)!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def target_pattern(target_modules: tuple[str, ...]) -> str:
    """peft ``target_modules`` regex (full match on module names): the given leaves anywhere under a block."""
    leaves = "|".join(re.escape(t) for t in target_modules)
    return rf"blocks\.\d+\.(?:\w+\.)*(?:{leaves})"


def peft_lora_config(cfg: LoRAConfig):
    """The ``peft.LoraConfig`` for ``cfg``, with our parallel-linear layers registered as custom modules."""
    from peft import LoraConfig

    pcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=target_pattern(cfg.target_modules), bias="none", init_lora_weights=True)
    pcfg._register_custom_module({base: functools.partial(cls, init_seed=cfg.init_seed)
                                  for base, cls in lora_base_types().items()})
    return pcfg


def lora_layers(model: nn.Module) -> Iterator[tuple[str, ParallelLoraLinear]]:
    """(module name, LoRA layer) for every adapted linear, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, ParallelLoraLinear):
            yield name, m


def _require_lora(model: nn.Module) -> list[tuple[str, ParallelLoraLinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ConfigError("model has no LoRA adapters: call apply_lora(model, cfg) first")
    return layers


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze every base parameter and inject LoRA adapter ``"default"`` into the targeted block linears.

    Returns the same model object (mutated in place). Errors name the target that matched nothing or a
    matched module of a type without a LoRA layer here.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ConfigError("apply_lora: the model already has peft adapters")
    rx = re.compile(target_pattern(cfg.target_modules))
    matched = [(n, m) for n, m in model.named_modules() if rx.fullmatch(n)]
    for leaf in cfg.target_modules:
        if not any(n.rsplit(".", 1)[-1] == leaf for n, _ in matched):
            raise ConfigError(f"lora.target_modules: {leaf!r} matches no module inside the model's blocks")
    supported = tuple(lora_base_types())
    wrong = [f"{n} ({type(m).__name__})" for n, m in matched if not isinstance(m, supported)]
    if wrong:
        raise ConfigError(f"lora.target_modules: LoRA supports megatron Column/RowParallelLinear and the TE spec's "
                          f"linears only, got {wrong[:5]}")
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(peft_lora_config(cfg), model, adapter_name=ADAPTER)
    n_params = sum(p.numel() for _, p in lora_parameters(model))
    logger.info("LoRA r=%d alpha=%g on %d linears: %d trainable parameters on this rank", cfg.rank, cfg.alpha,
                len(matched), n_params)
    return model


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA weight (``...lora_A.default.weight`` / ``...lora_B.default.weight``)."""
    ids = {id(p) for _, layer in lora_layers(model) for d in (layer.lora_A, layer.lora_B) for p in d.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


@contextmanager
def adapters_disabled(model: nn.Module):
    """The reference policy: the same model (same parameters, no copy) with every adapter bypassed.

    Merged layers are unmerged on entry and merged again on exit. ``requires_grad`` flags are untouched.
    """
    layers = [layer for _, layer in _require_lora(model)]
    was_disabled = [layer._disable_adapters for layer in layers]
    was_merged = [layer.merged for layer in layers]
    for layer, merged in zip(layers, was_merged):
        if merged:
            layer.unmerge()
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, disabled, merged in zip(layers, was_disabled, was_merged):
            layer._disable_adapters = disabled
            if merged:
                layer.merge()


def merge_lora(model: nn.Module, *, exact: bool = True) -> None:
    """Fold ``alpha/r * B @ A`` into every adapted base weight (no-grad rollouts run at base-model speed).

    ``exact=True`` keeps a copy of each unmerged weight (memory: one copy of the adapted linears) so
    :func:`unmerge_lora` restores it bitwise; ``exact=False`` keeps nothing and unmerge subtracts the delta
    (rounding residue of ~1 ulp per round trip, which accumulates in bf16).
    """
    with torch.no_grad():
        for _, layer in _require_lora(model):
            layer.merge(exact=exact)


@contextmanager
def merged(model: nn.Module):
    """No-grad generation at base-model speed: adapters folded into the weights (exactly restorable), unmerged
    again on exit. A no-op for a model without adapters."""
    if not list(lora_layers(model)):
        yield model
        return
    merge_lora(model, exact=True)
    try:
        yield model
    finally:
        unmerge_lora(model)


@contextmanager
def unmerged(model: nn.Module):
    """The trainable (unmerged) form inside a :func:`merged` region (bitwise restore), merged again on exit."""
    layers = [layer for _, layer in lora_layers(model) if layer.merged]
    with torch.no_grad():
        for layer in layers:
            layer.unmerge()
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer in layers:
                layer.merge(exact=True)


def lora_state(model: nn.Module) -> str:
    """``none`` | ``merged`` | ``disabled`` | ``active``: what an adapted forward computes now (adapters are
    switched together by this module's functions, so the first layer tells)."""
    layer = next((m for m in model.modules() if isinstance(m, ParallelLoraLinear)), None)
    if layer is None:
        return "none"
    if layer.disable_adapters:
        return "disabled"
    return "merged" if layer.merged else "active"


def unmerge_lora(model: nn.Module) -> None:
    """Inverse of :func:`merge_lora` (bitwise when merged with ``exact=True``); merged layers only."""
    with torch.no_grad():
        for _, layer in _require_lora(model):
            if layer.merged:
                layer.unmerge()


def lora_full_state_dict(model: nn.Module, *, grad: bool = False) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) LoRA weights -- or their gradients with ``grad=True`` (zeros where none) --
    keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``. Collective over each layer's TP group."""
    out = {}
    for name, layer in _require_lora(model):
        for half in ("lora_A", "lora_B"):
            p = getattr(layer, half)[ADAPTER].weight
            t = (p.grad if p.grad is not None else torch.zeros_like(p)) if grad else p
            out[f"{name}.{half}.weight"] = layer.gather(half, t.detach()).clone()
    return out


def load_lora_full_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], *, source_name: str) -> None:
    """Copy full LoRA tensors (keys as :func:`lora_full_state_dict`) into this rank's slices.

    Missing, unknown or wrong-shaped keys raise ``ConfigError`` naming ``source_name``; nothing is copied then.
    """
    targets = {}
    for name, layer in _require_lora(model):
        for half in ("lora_A", "lora_B"):
            targets[f"{name}.{half}.weight"] = (layer, half)
    missing = sorted(k for k in targets if k not in sd)
    unknown = sorted(k for k in sd if k not in targets)
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs model {layer.full_shape(half)}" for k, (layer, half) in targets.items()
                  if k in sd and tuple(sd[k].shape) != layer.full_shape(half)]
    problems = [f"{what} {keys[:10]}" + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
                for what, keys in (("missing LoRA keys", missing), ("unknown keys", unknown),
                                   ("mismatched shapes", mismatched)) if keys]
    if problems:
        raise ConfigError(f"{source_name}: " + "; ".join(problems))
    with torch.no_grad():
        for k, (layer, half) in targets.items():
            w = getattr(layer, half)[ADAPTER].weight
            w.copy_(layer.shard(half, sd[k].to(device=w.device, dtype=w.dtype)))


def _check_matches_model(model: nn.Module, r: int, alpha: float, source: str) -> None:
    layer = _require_lora(model)[0][1]
    if r != layer.r[ADAPTER] or not math.isclose(alpha, layer.lora_alpha[ADAPTER]):
        raise ConfigError(f"{source}: LoRA r={r}, alpha={alpha} but the model's adapters have "
                          f"r={layer.r[ADAPTER]}, alpha={layer.lora_alpha[ADAPTER]}")


def save_adapter(model: nn.Module, cfg: LoRAConfig, out_dir: str | Path, *,
                 comfyui_file: str | Path | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft format) into ``out_dir``, and with
    ``comfyui_file`` also that single file in ComfyUI / Wan names with ``.alpha``, which ComfyUI and diffusers'
    ``WanPipeline.load_lora_weights`` load (``checkpoint/adapter_formats.py``).

    Every rank must call it (the TP gather is collective); global rank 0 writes. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    _check_matches_model(model, cfg.rank, cfg.alpha, "save_adapter(cfg)")
    sd = lora_full_state_dict(model)
    if global_rank() != 0:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_lora_config(cfg).save_pretrained(str(out_dir))
    save_file({PEFT_PREFIX + k: v.cpu().contiguous() for k, v in sd.items()}, str(out_dir / WEIGHTS_FILE),
              metadata={"format": "pt"})
    logger.info("saved LoRA adapter (%d tensors) to %s", len(sd), out_dir)
    if comfyui_file is not None:
        Path(comfyui_file).parent.mkdir(parents=True, exist_ok=True)
        write_comfyui({k: v.cpu() for k, v in sd.items()}, cfg.alpha, comfyui_file)
        logger.info("saved the LoRA for ComfyUI / diffusers (WanPipeline.load_lora_weights) to %s", comfyui_file)
    return out_dir


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Load a peft-format adapter directory (ours or any peft LoRA with the same module names and r/alpha)."""
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise ConfigError(f"LoRA adapter: {f} does not exist")
    meta = json.loads(cfg_file.read_text())
    if meta.get("peft_type") != "LORA":
        raise ConfigError(f"{cfg_file}: peft_type must be 'LORA', got {meta.get('peft_type')!r}")
    for field, bad in (("use_dora", True), ("lora_bias", True), ("use_rslora", True)):
        if meta.get(field) == bad:
            raise ConfigError(f"{cfg_file}: {field}={bad} is not supported")
    _check_matches_model(model, meta.get("r"), meta.get("lora_alpha"), str(cfg_file))
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in read_safetensors(weights_file).items()}
    sd = {re.sub(rf"\.(lora_[AB])\.{ADAPTER}\.", r".\1.", k): v for k, v in sd.items()}
    load_lora_full_state_dict(model, sd, source_name=str(weights_file))
