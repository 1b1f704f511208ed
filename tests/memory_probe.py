"""Measured memory of a small model, for the memory model's tests (kvpo/memory_model.py).

``probe(pgs, ...)`` builds a model with LoRA on this rank's layout, fills a KV cache, and runs one replay-style
forward with grad (adapters trainable, base frozen) recording every tensor autograd saves; returns
per-rank byte counts: parameters, LoRA parameters, the KV cache's buffers, and the saved activations
(distinct storages, parameters excluded).
"""
from __future__ import annotations

import torch


def probe(pgs, *, tp: int = 1, cp: int = 1, cp_attention: str = "auto", dtype=torch.bfloat16, layers: int = 1,
          shapes: dict | None = None) -> dict:
    from kvpo_megatron.lora import LoRAConfig, apply_lora, lora_parameters
    from kvpo_megatron.model import CacheConfig, KVCache
    from kvpo_megatron.model.build import ModelSection, build_model

    s = dict(PROBE_SHAPES, **(shapes or {}))
    ov = dict(hidden_size=s["d"], ffn_hidden_size=s["f"], num_layers=layers, text_len=s["text_len"],
              num_attention_heads=s["heads"])
    model = build_model(ModelSection(preset="tiny", overrides=ov), pg_collection=pgs, tp=tp, cp=cp,
                        cp_attention=cp_attention)
    apply_lora(model, LoRAConfig(rank=s["r"], alpha=float(s["r"])))
    model.to(dtype)
    for m in model.modules():  # as benchmarks.common.cast_model: affine LayerNorms stay float32
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
    lora = {p.untyped_storage().data_ptr() for _, p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(p.untyped_storage().data_ptr() in lora)
    cc = CacheConfig(local_attn_frames=s["local"])
    cache = KVCache(cc, layers)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, s["text_len"], model.config.text_dim, generator=g)
    x = lambda: torch.randn(1, 4, 3, s["lh"], s["lw"], generator=g)  # noqa: E731
    with torch.no_grad():
        text = model.encode_text(ctx)
        for f0 in range(0, 18, 3):
            view = cache.view(cc.default_read_frames(f0), write_frames=range(f0, f0 + 3))
            model(x(), torch.tensor([0.0]), text=text, frame_offset=f0, cache=cache, view=view, compute_output=False)
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    saved = []
    view = cache.view(cc.default_read_frames(18))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        text = model.encode_text(ctx)
        model(x(), torch.tensor([500.0]), text=text, frame_offset=18, cache=cache, view=view)
    act = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return {"param_bytes": sum(params.values()), "lora_params": sum(p.numel() for _, p in lora_parameters(model)),
            "kv_bytes": sum(k.nbytes + v.nbytes for k, v in zip(cache.k, cache.v)), "kv_slots": cache.num_slots,
            "activation_bytes": sum(v for k, v in act.items() if k not in params),
            "cached_frames": len(view.read_frames)}


PROBE_SHAPES = dict(d=28 * 2, f=52, r=5, heads=4, lh=4, lw=14, local=6, text_len=11)
"""Distinct sizes so that a wrong term cannot hide behind an equal one (head dim 14, 14 tokens per frame)."""
