"""Conditioning: text encoders (hash | umT5 | precomputed store) and latent decoders (preview | Wan2.1 VAE).

Heavy libraries (transformers, diffusers, sentencepiece) are imported only when a real model is built.
"""
from kvpo_megatron.conditioning.files import MissingFileError
from kvpo_megatron.conditioning.text_encoder import (
    CachedTextEncoder,
    HashTextEncoder,
    StoreTextEncoder,
    TextEncoder,
    TextEncoderConfig,
    TextEncoderKind,
    build_text_encoder,
)
from kvpo_megatron.conditioning.vae import (
    DecoderConfig,
    DecoderKind,
    LatentDecoder,
    LatentPreviewDecoder,
    WanVAEDecoder,
    build_decoder,
)


def __getattr__(name: str):
    # UMT5TextEncoder / SentencePieceTokenizer live in umt5.py; import lazily.
    if name in ("UMT5TextEncoder", "SentencePieceTokenizer"):
        from kvpo_megatron.conditioning import umt5

        return getattr(umt5, name)
    raise AttributeError(name)


__all__ = [
    "CachedTextEncoder", "DecoderConfig", "DecoderKind", "HashTextEncoder", "LatentDecoder", "LatentPreviewDecoder",
    "MissingFileError", "SentencePieceTokenizer", "StoreTextEncoder", "TextEncoder", "TextEncoderConfig",
    "TextEncoderKind", "UMT5TextEncoder", "WanVAEDecoder", "build_decoder", "build_text_encoder",
]
