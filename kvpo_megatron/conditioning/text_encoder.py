"""Text conditioning: the ``TextEncoder`` contract, a weight-free hash encoder, a per-prompt cache, and the builder.

Every encoder returns ``(emb [B, text_len, text_dim] float32, lengths [B] int64)`` with positions at and
beyond ``lengths[b]`` zeroed, which is what Wan's DiT cross-attention expects (Wan pads umT5 outputs to 512).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

import torch

from kvpo_megatron.conditioning.umt5 import UMT5TextEncoder
from kvpo_megatron.data.embedding_store import EmbeddingStore
from kvpo_megatron.data.prompts import prompt_hash
from kvpo_megatron.dtypes import check_dtype_name, torch_dtype
from kvpo_megatron.errors import ConfigError

logger = logging.getLogger(__name__)


@runtime_checkable
class TextEncoder(Protocol):
    text_len: int
    text_dim: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (emb [B, text_len, text_dim] float32 with padded positions zeroed, lengths [B] int64)."""
        ...


class TextEncoderKind(StrEnum):
    HASH = "hash"
    UMT5 = "umt5"
    STORE = "store"


@dataclass(kw_only=True, slots=True)
class TextEncoderConfig:
    kind: TextEncoderKind = TextEncoderKind.HASH
    """hash: weight-free deterministic embeddings; umt5: Wan's umT5-XXL; store: a precomputed embedding store."""
    text_len: int = 512
    """Tokens per prompt after padding/truncation (Wan: 512)."""
    text_dim: int = 4096
    """Embedding width (umT5-XXL: 4096). For umt5/store it must match the weights/store."""
    path: str | None = None
    """umt5: Wan's models_t5_umt5-xxl-enc-bf16.pth or a Hugging Face UMT5 folder."""
    tokenizer: str | None = None
    """umt5: spiece.model (default: looked up next to ``path``)."""
    store: str | None = None
    """store: directory written by tools/precompute_text_embeddings.py."""
    prompts: str | None = None
    """store: the prompt file the store must match (hash check); None skips the check."""
    device: str = "cpu"
    """umt5: device to encode on."""
    dtype: str = "bfloat16"
    """umt5: weight dtype (float32 | bfloat16 | float16)."""
    cache: bool = True
    """Cache embeddings per prompt (umt5 and hash)."""
    offload_after_encode: bool = False
    """umt5: move the encoder to CPU after each encode call."""
    seed: int = 0
    """hash: seed mixed into every prompt's hash."""

    def __post_init__(self) -> None:
        try:
            self.kind = TextEncoderKind(self.kind)
        except ValueError:
            raise ConfigError(f"text_encoder.kind={self.kind!r}: expected one of {[k.value for k in TextEncoderKind]}")
        if self.text_len <= 0 or self.text_dim <= 0:
            raise ConfigError(f"text_encoder.text_len={self.text_len}, text_dim={self.text_dim}: must be positive")
        check_dtype_name(self.dtype, "text_encoder.dtype")
        if self.kind == TextEncoderKind.UMT5 and not self.path:
            raise ConfigError("text_encoder.path is required for kind='umt5' (Wan's umT5 .pth or HF folder)")
        if self.kind == TextEncoderKind.STORE and not self.store:
            raise ConfigError("text_encoder.store is required for kind='store'")


class HashTextEncoder:
    """Weight-free encoder: each prompt gets a fixed pseudo-random embedding seeded by its text.

    The length is ``min(text_len, words + 1)`` (like a tokenizer with ``</s>``); rows are N(0, 1) scaled by
    ``scale``. Deterministic across processes and machines (sha256, CPU generator).
    """

    def __init__(self, *, text_len: int, text_dim: int, seed: int = 0, scale: float = 1.0) -> None:
        self.text_len = text_len
        self.text_dim = text_dim
        self.seed = seed
        self.scale = scale

    def _one(self, prompt: str) -> tuple[torch.Tensor, int]:
        length = max(1, min(self.text_len, len(prompt.split()) + 1))
        gen = torch.Generator().manual_seed(prompt_hash(f"{self.seed}\x00{prompt}"))
        return torch.randn(length, self.text_dim, generator=gen) * self.scale, length

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.zeros(len(prompts), self.text_len, self.text_dim)
        lengths = torch.zeros(len(prompts), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            row, n = self._one(prompt)
            emb[i, :n] = row
            lengths[i] = n
        return emb, lengths


class CachedTextEncoder:
    """Wraps an encoder and caches each prompt's unpadded embedding on CPU.

    ``free()``/``offload()`` are forwarded to the wrapped encoder; cached prompts still encode after ``free()``.
    """

    def __init__(self, inner: TextEncoder, *, offload_after_encode: bool = False) -> None:
        self.inner = inner
        self.text_len = inner.text_len
        self.text_dim = inner.text_dim
        self.offload_after_encode = offload_after_encode
        self._cache: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        if todo:
            emb, lengths = self.inner.encode(todo)
            for prompt, row, n in zip(todo, emb, lengths.tolist()):
                self._cache[prompt] = row[:n].clone()
            if self.offload_after_encode:
                self.offload()
        out = torch.zeros(len(prompts), self.text_len, self.text_dim)
        lengths = torch.zeros(len(prompts), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            row = self._cache[prompt]
            out[i, : row.shape[0]] = row
            lengths[i] = row.shape[0]
        return out, lengths

    def offload(self) -> None:
        if hasattr(self.inner, "offload"):
            self.inner.offload()

    def free(self) -> None:
        if hasattr(self.inner, "free"):
            self.inner.free()


class StoreTextEncoder:
    """Reads embeddings precomputed by ``tools/precompute_text_embeddings.py`` (no encoder in memory)."""

    def __init__(self, store) -> None:
        self.store = store
        self.text_len = store.text_len
        self.text_dim = store.text_dim

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.lookup(prompts)


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """Build the text encoder named by ``cfg.kind`` (checks dims against the loaded weights/store)."""
    if cfg.kind == TextEncoderKind.HASH:
        enc: TextEncoder = HashTextEncoder(text_len=cfg.text_len, text_dim=cfg.text_dim, seed=cfg.seed)
    elif cfg.kind == TextEncoderKind.UMT5:
        enc = UMT5TextEncoder.from_pretrained(cfg.path, tokenizer=cfg.tokenizer, text_len=cfg.text_len,
                                              device=cfg.device, dtype=torch_dtype(cfg.dtype))
    else:
        enc = StoreTextEncoder(EmbeddingStore.open(cfg.store, prompts_file=cfg.prompts))
    if (enc.text_len, enc.text_dim) != (cfg.text_len, cfg.text_dim):
        raise ConfigError(f"text_encoder: config says text_len={cfg.text_len}, text_dim={cfg.text_dim} but the "
                          f"{cfg.kind} encoder gives text_len={enc.text_len}, text_dim={enc.text_dim}")
    if cfg.cache and cfg.kind != TextEncoderKind.STORE:
        enc = CachedTextEncoder(enc, offload_after_encode=cfg.offload_after_encode)
    return enc
