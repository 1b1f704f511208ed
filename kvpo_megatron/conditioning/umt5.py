"""umT5-XXL text encoder as Wan2.1 uses it: sentencepiece tokenizer + transformers ``UMT5EncoderModel``.

Expected files (paths come from the YAML config):
- weights, either Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (original ``T5Encoder`` keys, converted by
  ``wan_key_maps.UMT5_NAMES``; the architecture is read off the tensor shapes) or a Hugging Face folder
  with ``config.json`` + weights (e.g. ``google/umt5-xxl``; decoder weights, if present, are ignored);
- tokenizer ``spiece.model``: given explicitly, else looked up next to the weights
  (``<dir>/spiece.model``, ``<dir>/google/umt5-xxl/spiece.model`` as in Wan's release folders).

Tokenisation follows Wan (``HuggingfaceTokenizer(seq_len=512, clean='whitespace')``): html-unescape, collapse
whitespace, sentencepiece ids + ``</s>``, truncate to ``text_len`` (keeping ``</s>``), pad with the pad id.
transformers 5's ``T5Tokenizer(vocab_file=...)`` silently ignores the file, so sentencepiece is used directly.
"""
from __future__ import annotations

import gc
import html
import logging
import re
from pathlib import Path

import torch

from kvpo_megatron.conditioning.files import require_file_in, require_path
from kvpo_megatron.conditioning.wan_key_maps import umt5_config_from_wan, umt5_wan_to_hf
from kvpo_megatron.errors import ConfigError

logger = logging.getLogger(__name__)

UMT5_PTH_NAMES = ("models_t5_umt5-xxl-enc-bf16.pth",)
SPIECE_NAMES = ("spiece.model", "google/umt5-xxl/spiece.model", "tokenizer/spiece.model")


def clean_text(text: str) -> str:
    """Wan's 'whitespace' cleaning: unescape html entities (twice) and collapse runs of whitespace."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class SentencePieceTokenizer:
    """T5-style tokenizer over a ``spiece.model``: ids + ``</s>``, truncated/padded to ``text_len``."""

    def __init__(self, path: str | Path, *, text_len: int, clean: bool = True) -> None:
        import sentencepiece as spm

        self.path = require_path(path, "umT5 tokenizer (spiece.model)", field="tokenizer")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.text_len = text_len
        self.clean = clean
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise ConfigError(f"tokenizer {self.path}: the sentencepiece model defines no eos (</s>) piece")
        self.pad_id = max(self.sp.pad_id(), 0)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def ids(self, prompt: str) -> list[int]:
        """Token ids of one prompt, ending in ``</s>``, at most ``text_len`` long."""
        text = clean_text(prompt) if self.clean else prompt
        return self.sp.encode(text, out_type=int)[: self.text_len - 1] + [self.eos_id]

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids [B, text_len] int64, mask [B, text_len] int64)."""
        ids = torch.full((len(prompts), self.text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.text_len), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            row = self.ids(prompt)
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask


def _find_tokenizer(weights: Path, tokenizer: str | Path | None) -> Path:
    if tokenizer is not None:
        return require_path(tokenizer, "umT5 tokenizer (spiece.model)", field="tokenizer")
    base = weights if weights.is_dir() else weights.parent
    return require_file_in(base, SPIECE_NAMES, "umT5 tokenizer (spiece.model); set text_encoder.tokenizer")


def load_umt5_encoder(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """Load a ``UMT5EncoderModel`` from Wan's ``.pth`` (original keys) or a Hugging Face folder."""
    from transformers import UMT5Config, UMT5EncoderModel

    p = require_path(path, "umT5 encoder weights", field="path")
    if p.is_dir() and not (p / "config.json").exists():
        found = [p / n for n in UMT5_PTH_NAMES if (p / n).exists()]
        if not found:
            raise ConfigError(f"umT5 folder {p} has neither config.json (Hugging Face layout) nor {UMT5_PTH_NAMES[0]}")
        p = found[0]
    if p.is_dir():
        model = UMT5EncoderModel.from_pretrained(str(p), dtype=dtype)
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "token_embedding.weight" not in state:
            raise ConfigError(f"{p}: not a Wan umT5 encoder state dict (no 'token_embedding.weight')")
        config = UMT5Config(**umt5_config_from_wan(state))
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        hf_state = {k: v.to(dtype) for k, v in umt5_wan_to_hf(state, source=str(p)).items()}
        try:
            missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
        except RuntimeError as e:
            raise ConfigError(f"{p}: umT5 weights have inconsistent shapes: {e}") from None
        if missing or unexpected:
            raise ConfigError(f"{p}: umT5 keys do not match the model: missing {missing}, unexpected {unexpected}")
    return model.eval().requires_grad_(False)


class UMT5TextEncoder:
    """Encodes prompts with umT5 into ``[B, text_len, d_model]`` float32, padded positions zeroed.

    ``offload()`` moves the encoder to CPU between uses; ``free()`` drops it (only cached prompts, when
    wrapped in ``CachedTextEncoder``, can be encoded afterwards).
    """

    def __init__(self, model, tokenizer: SentencePieceTokenizer, *, device: str = "cpu",
                 batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = tokenizer.text_len
        self.text_dim = int(model.config.d_model)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._dtype = next(model.parameters()).dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, *, tokenizer: str | Path | None = None, text_len: int = 512,
                        device: str = "cpu", dtype: torch.dtype = torch.float32,
                        batch_size: int = 8) -> "UMT5TextEncoder":
        weights = require_path(path, "umT5 encoder weights", field="path")
        tok = SentencePieceTokenizer(_find_tokenizer(weights, tokenizer), text_len=text_len)
        model = load_umt5_encoder(weights, dtype=dtype)
        if tok.vocab_size > model.config.vocab_size:
            raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the encoder embeds only "
                              f"{model.config.vocab_size}: tokenizer and weights do not belong together")
        logger.info("loaded umT5 encoder from %s (%d layers, dim %d)", weights, model.config.num_layers,
                    model.config.d_model)
        return cls(model.to(device), tok, device=device, batch_size=batch_size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("UMT5TextEncoder.encode called after free(): the encoder weights were released")
        self.model.to(self.device)
        embs, lens = [], []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = self.tokenizer(prompts[start : start + self.batch_size])
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, L, D]
            embs.append((hidden.float() * mask[..., None]).cpu())
            lens.append(mask.sum(dim=1).cpu())
        return torch.cat(embs), torch.cat(lens).long()

    def offload(self) -> None:
        """Move the encoder weights to CPU (they come back to ``device`` on the next ``encode``)."""
        if self.model is not None:
            self.model.to("cpu")

    def free(self) -> None:
        """Release the encoder weights entirely."""
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
