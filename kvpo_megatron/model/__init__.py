"""The causal Wan DiT, its layer specs and its KV cache (knows nothing about KVPO)."""
from kvpo_megatron.model.attention import TextKV
from kvpo_megatron.model.causal_wan import CausalWanDiT, block_causal_mask
from kvpo_megatron.model.config import WanConfig, model_config
from kvpo_megatron.model.kv_cache import AttentionView, CacheConfig, KVCache

__all__ = ["CausalWanDiT", "block_causal_mask", "WanConfig", "model_config", "TextKV", "AttentionView",
           "CacheConfig", "KVCache"]
