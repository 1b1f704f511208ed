"""A checkpoint's architecture: Wan / diffusers ``config.json`` and tensor shapes <-> our model section
(``{'preset', 'overrides'}``: the closest named preset of ``model/config.py`` and the fields that differ)."""
from __future__ import annotations

import dataclasses
import math
import re

from kvpo_megatron.errors import ConfigError

# config.json field -> WanConfig field, per format
WAN_FIELDS = {"dim": "hidden_size", "ffn_dim": "ffn_hidden_size", "num_heads": "num_attention_heads",
              "num_layers": "num_layers", "in_dim": "in_channels", "out_dim": "out_channels", "freq_dim": "freq_dim",
              "text_dim": "text_dim", "text_len": "text_len", "eps": "layernorm_epsilon", "patch_size": "patch_size"}
DIFFUSERS_FIELDS = {"num_attention_heads": "num_attention_heads", "ffn_dim": "ffn_hidden_size",
                    "num_layers": "num_layers", "in_channels": "in_channels", "out_channels": "out_channels",
                    "freq_dim": "freq_dim", "text_dim": "text_dim", "eps": "layernorm_epsilon",
                    "patch_size": "patch_size", "rope_max_seq_len": "rope_max_positions"}
ARCH_FIELDS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers", "in_channels",
               "out_channels", "freq_dim", "text_dim", "text_len", "layernorm_epsilon", "patch_size",
               "rope_max_positions")
# fields whose values we don't support (original Wan i2v/flf2v variants, other norms)
_UNSUPPORTED = {"wan": {"model_type": ("t2v", "ti2v"), "qk_norm": (True,), "cross_attn_norm": (True,)},
                "diffusers": {"qk_norm": ("rms_norm_across_heads",), "cross_attn_norm": (True,),
                              "image_dim": (None,), "added_kv_proj_dim": (None,)}}


def _presets():
    """``model.config``'s (PRESETS, WanConfig): megatron's config class, imported only when an architecture is
    resolved, so that the converter's CLI starts without megatron."""
    from kvpo_megatron.model.config import PRESETS, WanConfig  # megatron: only when resolving (converter CLI)

    return PRESETS, WanConfig


def _preset_value(preset: str, name: str):
    presets, wan_config = _presets()
    if name in presets[preset]:
        return presets[preset][name]
    f = {f.name: f for f in dataclasses.fields(wan_config)}[name]
    return f.default


def arch_to_section(arch: dict) -> dict:
    """WanConfig architecture fields -> ``{'preset', 'overrides'}`` using the closest named preset."""
    def norm(v):
        return list(v) if isinstance(v, tuple | list) else v

    best = min(_presets()[0], key=lambda p: sum(norm(_preset_value(p, k)) != norm(v) for k, v in arch.items()))
    overrides = {k: norm(v) for k, v in arch.items() if norm(_preset_value(best, k)) != norm(v)}
    return {"preset": best, "overrides": overrides}


def section_arch(section: dict) -> dict:
    """``{'preset', 'overrides'}`` -> every architecture field's value."""
    return {k: section["overrides"].get(k, _preset_value(section["preset"], k)) for k in ARCH_FIELDS}


def config_json_to_arch(cfg: dict, fmt: str, *, source_name: str) -> dict:
    """A Wan or diffusers ``config.json`` -> WanConfig architecture fields."""
    kind = "diffusers" if fmt == "diffusers" else "wan"
    for key, allowed in _UNSUPPORTED[kind].items():
        if key in cfg and cfg[key] not in allowed:
            raise ConfigError(f"{source_name}: config field {key}={cfg[key]!r} is not supported "
                              f"(supported: {list(allowed)})")
    table = DIFFUSERS_FIELDS if kind == "diffusers" else WAN_FIELDS
    arch = {ours: cfg[theirs] for theirs, ours in table.items() if theirs in cfg}
    if kind == "diffusers" and "attention_head_dim" in cfg and "num_attention_heads" in cfg:
        arch["hidden_size"] = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    if "patch_size" in arch:
        arch["patch_size"] = tuple(arch["patch_size"])
    return arch


def infer_arch(shapes: dict[str, tuple], *, source_name: str) -> dict:
    """Architecture fields readable from tensor shapes (our names); the head count is not among them."""
    need = ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
            "blocks.0.ffn_fc1.weight", "head.head.weight")
    absent = [k for k in need if k not in shapes]
    if absent:
        raise ConfigError(f"{source_name}: cannot infer the model shape, missing keys {absent}")
    pe = shapes["patch_embedding.weight"]
    patch = tuple(pe[2:])
    return {"hidden_size": pe[0], "in_channels": pe[1], "patch_size": patch,
            "text_dim": shapes["text_embedding.0.weight"][1], "freq_dim": shapes["time_embedding.0.weight"][1],
            "ffn_hidden_size": shapes["blocks.0.ffn_fc1.weight"][0],
            "num_layers": 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))),
            "out_channels": shapes["head.head.weight"][0] // math.prod(patch)}


def heads_from_presets(arch: dict, *, source_name: str) -> int:
    for name, p in _presets()[0].items():
        if p["hidden_size"] == arch["hidden_size"]:
            return p["num_attention_heads"]
    raise ConfigError(f"{source_name}: no config.json and no preset with hidden size {arch['hidden_size']}; "
                      "pass --config CONFIG.json (a Wan config.json with num_heads)")


def wan_config_json(section: dict) -> dict:
    """Original Wan2.1 ``config.json`` for a model section."""
    a = section_arch(section)
    # Wan2.2-TI2V-5B's config.json says "ti2v" (48 latent channels); its DiT is the t2v one at other sizes
    cfg = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "ti2v" if a["in_channels"] == 48
           else "t2v"}
    cfg.update({theirs: a[ours] for theirs, ours in WAN_FIELDS.items()})
    cfg.update(patch_size=list(a["patch_size"]), qk_norm=True, cross_attn_norm=True, window_size=[-1, -1])
    return cfg


def diffusers_config_json(section: dict) -> dict:
    """diffusers ``WanTransformer3DModel`` ``config.json`` for a model section."""
    a = section_arch(section)
    return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0",
            "patch_size": list(a["patch_size"]), "num_attention_heads": a["num_attention_heads"],
            "attention_head_dim": a["hidden_size"] // a["num_attention_heads"], "in_channels": a["in_channels"],
            "out_channels": a["out_channels"], "text_dim": a["text_dim"], "freq_dim": a["freq_dim"],
            "ffn_dim": a["ffn_hidden_size"], "num_layers": a["num_layers"], "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "eps": a["layernorm_epsilon"], "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": a["rope_max_positions"]}
