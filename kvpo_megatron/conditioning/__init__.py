"""Conditioning: text encoders (hash | umT5 | precomputed store) and latent decoders (preview | Wan2.1 VAE).

Heavy libraries (transformers, diffusers, sentencepiece) are imported only when a real model is built (inside
``umt5.py`` / ``vae.py``).
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
from kvpo_megatron.conditioning.umt5 import SentencePieceTokenizer, UMT5TextEncoder
from kvpo_megatron.conditioning.vae import (
    DecoderConfig,
    DecoderKind,
    LatentDecoder,
    LatentPreviewDecoder,
    WanVAEDecoder,
    build_decoder,
)


__all__ = [
    "CachedTextEncoder", "DecoderConfig", "DecoderKind", "HashTextEncoder", "LatentDecoder", "LatentPreviewDecoder",
    "MissingFileError", "SentencePieceTokenizer", "StoreTextEncoder", "TextEncoder", "TextEncoderConfig",
    "TextEncoderKind", "UMT5TextEncoder", "WanVAEDecoder", "build_decoder", "build_text_encoder",
]
