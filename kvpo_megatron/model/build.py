"""Build a ``CausalWanDiT`` from a ``ModelSection`` (preset + overrides) and a parallel layout."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvpo_megatron.dtypes import torch_dtype
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model.causal_wan import CausalWanDiT
from kvpo_megatron.model.config import LayerSpecKind, model_config
from kvpo_megatron.model.specs import local_spec
from kvpo_megatron.model.te_spec import LinearGroup, TECompile, te_spec
from kvpo_megatron.parallel.cp_attention import context_parallel_spec
from kvpo_megatron.parallel.layout import CPAttention, check_heads
from kvpo_megatron.parallel.state import check_group_sizes


@dataclass(kw_only=True)
class ModelSection:
    preset: str = "tiny"
    """Named architecture: tiny | tiny-wan2.2 | wan-1.3b | wan-14b | wan2.2-5b (model/config.py PRESETS)."""
    overrides: dict = field(default_factory=dict)
    """WanConfig field overrides (e.g. ``params_dtype``); unknown fields raise."""
    checkpoint: str | None = None
    """Weights to load (see tools/convert_checkpoint.py); random init when None."""
    use_ema: bool = False
    """``checkpoint`` is a Self-Forcing/LongLive training file: load its ``generator_ema`` (else ``generator``)."""
    compile: bool = False
    """torch.compile every DiT block; applied by ``accelerate.accelerate``."""
    te_compile: TECompile = TECompile.replay
    """TE spec under ``compile``: ``replay`` traces torch equivalents of the bf16 TE linears, q/k norms and text
    attention in the replay's forwards (fewer compiled regions per block; TP == 1), ``opaque`` keeps every TE
    call eager (``model/te_spec.py``)."""
    cuda_graphs: bool = False
    """Replay no-grad streaming forwards from CUDA graphs captured per shape (GPU; ``accelerate.py``)."""
    fp8_linears: tuple[str, ...] | None = None
    """TE spec: linear groups run in FP8 (``self_attn``, ``cross_attn``, ``ffn``); None = all groups when
    ``overrides.fp8`` is set without ``fp8_dot_product_attention``, none otherwise (``model/te_spec.py``)."""
    fp8_replay: bool = False
    """Also run the scoring and the replay (forwards with gradients) in FP8; by default FP8 is for the no-grad
    rollout only and the replay stays bf16."""

    def __post_init__(self):
        if self.fp8_linears is not None:
            self.fp8_linears = tuple(self.fp8_linears)
            bad = [g for g in self.fp8_linears if g not in {x.value for x in LinearGroup}]
            if bad:
                raise ConfigError(f"model.fp8_linears: unknown group(s) {bad}; choose from "
                                  f"{[x.value for x in LinearGroup]}")


def build_model(section: ModelSection, *, pg_collection, tp: int = 1, cp: int = 1,
                cp_attention: CPAttention = CPAttention.auto, **extra) -> CausalWanDiT:
    ov = dict(section.overrides)
    if "params_dtype" in ov:
        ov["params_dtype"] = torch_dtype(ov["params_dtype"], "model.overrides.params_dtype")
    cfg = model_config(section.preset, tensor_model_parallel_size=tp, context_parallel_size=cp, **ov, **extra)
    check_group_sizes(pg_collection, tp=tp, cp=cp)
    kind = check_heads(cfg.num_attention_heads, tp=tp, cp=cp, cp_attention=cp_attention) if cp > 1 else None
    if cfg.spec == LayerSpecKind.te:
        spec = te_spec(cfg, fp8_linears=section.fp8_linears, cp_attention=kind)
    elif cp > 1:
        spec = context_parallel_spec(kind)
    else:
        spec = local_spec()
    return CausalWanDiT(cfg, spec, pg_collection=pg_collection)
