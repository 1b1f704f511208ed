"""One Wan2.1 DiT block with per-frame adaLN modulation.

    x = x + gate_msa * SelfAttn(LN1(x) * (1 + scale_msa) + shift_msa)
    x = x + CrossAttn(LN3_affine(x), text)
    x = x + gate_ffn * FFN(LN2(x) * (1 + scale_ffn) + shift_ffn)

Modulation is per latent frame (``e0``: [b, F, 6, dim]), so a sequence mixing clean context frames and
noisy frames (teacher forcing, streaming parity tests) is expressed exactly. Tokens are grouped per
frame ([b, F*T_local, dim]), which also holds for this rank's token shard under context parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from kvpo_megatron.model.config import WanConfig
from kvpo_megatron.model.kv_cache import LayerKV


@dataclass
class WanBlockSubmodules:
    self_attention: ModuleSpec
    cross_attention: ModuleSpec
    linear_fc1: ModuleSpec | type
    linear_fc2: ModuleSpec | type


class WanBlock(nn.Module):
    def __init__(self, config: WanConfig, submodules: WanBlockSubmodules, layer_number: int = 0, pg_collection=None):
        super().__init__()
        d, eps = config.hidden_size, config.layernorm_epsilon
        tp_group = getattr(pg_collection, "tp", None)
        self.layer_number = layer_number
        self.norm1 = nn.LayerNorm(d, eps=eps, elementwise_affine=False)
        self.self_attn = build_module(submodules.self_attention, config=config, pg_collection=pg_collection)
        self.norm3 = nn.LayerNorm(d, eps=eps, elementwise_affine=True)
        self.cross_attn = build_module(submodules.cross_attention, config=config, pg_collection=pg_collection)
        self.norm2 = nn.LayerNorm(d, eps=eps, elementwise_affine=False)
        self.ffn_fc1 = build_module(submodules.linear_fc1, d, config.ffn_hidden_size, config=config,
                                    init_method=config.init_method, bias=True, gather_output=False, tp_group=tp_group)
        self.ffn_fc2 = build_module(submodules.linear_fc2, config.ffn_hidden_size, d, config=config,
                                    init_method=config.output_layer_init_method, bias=True, input_is_parallel=True,
                                    skip_bias_add=False, tp_group=tp_group)
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, *, e0: torch.Tensor, rope, text_kv, kv: LayerKV | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [b, F*T, dim]; e0: [b, F, 6, dim] float32."""
        b, n, d = x.shape
        nf = e0.shape[1]
        mod = (self.modulation[:, None].float() + e0)[:, :, :, None]  # [b, F, 6, 1, d]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod.unbind(2)

        def per_frame(t):  # [b, F*T, d] -> [b, F, T, d] float
            return t.float().view(b, nf, -1, d)

        def modulate(norm, shift, scale):
            return (norm(per_frame(x)) * (1 + scale) + shift).view(b, n, d).type_as(x)

        y = self.self_attn(modulate(self.norm1, shift_msa, scale_msa), rope=rope, kv=kv, attn_mask=attn_mask)
        x = (per_frame(x) + per_frame(y) * gate_msa).view(b, n, d).type_as(x)
        n3 = F.layer_norm(x.float(), (d,), self.norm3.weight.float(), self.norm3.bias.float(), self.norm3.eps)
        x = x + self.cross_attn(n3.type_as(x), text_kv)  # LayerNorm in fp32 whatever the parameter dtype
        h = F.gelu(self.ffn_fc1(modulate(self.norm2, shift_ffn, scale_ffn))[0], approximate="tanh")
        y = self.ffn_fc2(h)[0]
        return (per_frame(x) + per_frame(y) * gate_ffn).view(b, n, d).type_as(x)
