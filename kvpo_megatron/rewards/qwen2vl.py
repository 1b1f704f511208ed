"""Shared machinery of the Qwen2-VL reward models (HPSv3, VideoAlign): model + reward head, checkpoint key
mapping, and a torch-only vision preprocessor (mirrors transformers' Qwen2-VL image/video processors, which need
torchvision; this one runs on the frames' own device).

Both upstream projects subclass ``Qwen2VLForConditionalGeneration`` (transformers 4.45 layout: ``visual.*``,
``model.*``, ``lm_head.*``) and add ``rm_head``; the score is the head's output at special reward tokens.
Here the backbone is transformers 5's ``Qwen2VLModel`` (``model.visual.*``, ``model.language_model.*``), the
LM head is dropped, and old checkpoints are renamed with the same rules as transformers' own conversion mapping.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kvpo_megatron.conditioning.files import MissingFileError, require_path
from kvpo_megatron.errors import ConfigError

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM_PROMPT = "You are a helpful assistant."


# ---------------------------------------------------------------- checkpoint keys
def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip peft wrappers and rename transformers<4.52 Qwen2-VL keys to transformers 5's; drop ``lm_head``."""
    out = {}
    for key, value in state.items():
        k = key
        while k.startswith("base_model.model."):
            k = k[len("base_model.model."):]
        k = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k)
        k = re.sub(r"\.modules_to_save\.(default\.)?", ".", k)
        if ".original_module." in k or k.startswith("lm_head."):
            continue
        k = re.sub(r"^visual\.", "model.visual.", k)
        k = re.sub(r"^model\.(?!visual\.|language_model\.)", "model.language_model.", k)
        out[k] = value
    return out


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Load ``.safetensors`` or a torch pickle (unwrapping ``{"model": ...}`` as HPSv3's loader does)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All ``*.safetensors`` shards of a Hugging Face model folder, merged."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"no *.safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_state_file(f))
    return state


# ---------------------------------------------------------------- model
def build_rm_head(kind: str, hidden: int, output_dim: int) -> nn.Module:
    """``default``: Linear(hidden, out, bias=False) (VideoAlign); ``ranknet``: the MLP HPSv3 uses
    (Linear 1024, ReLU, Dropout, Linear 16, ReLU, Linear out)."""
    if kind == "default":
        return nn.Linear(hidden, output_dim, bias=False)
    if kind == "ranknet":
        return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                             nn.Linear(16, output_dim))
    raise ConfigError(f"rm_head_type={kind!r}: expected 'default' or 'ranknet'")


class Qwen2VLRewardModel(nn.Module):
    """``Qwen2VLModel`` + float32 ``rm_head``; returns the head's output at each special reward token."""

    def __init__(self, config, *, head_type: str, output_dim: int, special_token_ids: list[int]) -> None:
        super().__init__()
        from transformers import Qwen2VLModel

        self.model = Qwen2VLModel(config)
        self.rm_head = build_rm_head(head_type, config.text_config.hidden_size, output_dim).float()
        self.special_token_ids = list(special_token_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision) -> torch.Tensor:
        """-> [B, K, output_dim] for the K special tokens (in ``special_token_ids`` order)."""
        cfg = self.model.config
        mm_types = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()  # M-RoPE
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_types,
                            use_cache=False, **vision).last_hidden_state  # [B, L, D]
        rows = []
        for tok in self.special_token_ids:
            hit = input_ids == tok
            if not bool((hit.sum(dim=1) == 1).all()):
                raise ConfigError(f"each reward prompt must contain special token id {tok} exactly once")
            rows.append(hidden[hit])  # [B, D]
        pooled = torch.stack(rows, dim=1)  # [B, K, D]
        return self.rm_head(pooled.float())


def build_reward_model(config, state: dict[str, torch.Tensor], *, head_type: str, output_dim: int,
                       special_token_ids: list[int], source: str) -> Qwen2VLRewardModel:
    """Instantiate without allocating random weights, then load ``state`` (already normalised) strictly."""
    from accelerate import init_empty_weights

    emb = state.get("model.language_model.embed_tokens.weight")
    if emb is None:
        raise ConfigError(f"{source}: no embed_tokens weight; is this a Qwen2-VL checkpoint?")
    config.text_config.vocab_size = int(emb.shape[0])
    with init_empty_weights(include_buffers=False):
        model = Qwen2VLRewardModel(config, head_type=head_type, output_dim=output_dim,
                                   special_token_ids=special_token_ids)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatch: config.json of another model size
        raise ConfigError(f"{source}: weights do not match the Qwen2-VL config: {e}") from None
    if missing or unexpected:
        raise ConfigError(f"{source}: weights do not match the Qwen2-VL reward model: missing "
                          f"{missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}")
    model.rm_head.float()
    return model.eval().requires_grad_(False)


def load_config(base: str | Path, *, field: str):
    """``Qwen2VLConfig`` of the base model folder (Qwen2-VL-7B/2B-Instruct)."""
    from transformers import Qwen2VLConfig

    folder = require_path(base, "Qwen2-VL base model folder", field=field)
    if not (folder / "config.json").exists():
        raise MissingFileError(f"Qwen2-VL config not found: {folder / 'config.json'} (config field {field!r})")
    return Qwen2VLConfig.from_pretrained(str(folder))


def load_tokenizer(base: Path, special_tokens: list[str]):
    """The base model's tokenizer (right padding) with the reward tokens added -> (tokenizer, their ids)."""
    from transformers import AutoTokenizer

    if not any((base / n).exists() for n in ("tokenizer.json", "vocab.json")):
        raise MissingFileError(f"Qwen2-VL tokenizer not found in {base} (need tokenizer.json)")
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.padding_side = "right"
    tok.add_special_tokens({"additional_special_tokens": special_tokens})
    ids = tok.convert_tokens_to_ids(special_tokens)
    return tok, ids


# ---------------------------------------------------------------- vision preprocessing
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL's resize rule (copied from transformers): multiples of ``factor``, pixel count in range."""
    if max(height, width) / min(height, width) > 200:
        raise ConfigError(f"aspect ratio must be < 200, got {height}x{width}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(kw_only=True, slots=True)
class VisionSpec:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_config(cls, config) -> "VisionSpec":
        v = config.vision_config
        return cls(patch_size=int(v.patch_size), temporal_patch_size=int(v.temporal_patch_size),
                   merge_size=int(v.spatial_merge_size))

    def patchify(self, clips: torch.Tensor, *, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """clips [N, T, 3, H, W] in [0, 1] -> (pixel_values [N * t*h*w, 3*tp*p*p], grid_thw [N, 3]).

        Resize (bicubic, antialiased), normalise with CLIP mean/std, repeat the last frame up to a multiple of
        ``temporal_patch_size`` (an image is a 1-frame clip), and flatten patches in the processors' order.
        """
        n, t, c, h, w = clips.shape
        rh, rw = smart_resize(h, w, factor=self.patch_size * self.merge_size, min_pixels=min_pixels,
                              max_pixels=max_pixels)
        x = clips.reshape(n * t, c, h, w).float()
        if (rh, rw) != (h, w):
            x = nn.functional.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False,
                                          antialias=True).clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).reshape(n, t, c, rh, rw)
        if pad := -t % self.temporal_patch_size:
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
            t += pad
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        gt, gh, gw = t // tp, rh // p, rw // p
        x = x.view(n, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        pixel_values = x.reshape(n * gt * gh * gw, c * tp * p * p)
        grid = torch.tensor([[gt, gh, gw]] * n, dtype=torch.long, device=clips.device)
        return pixel_values, grid

    def num_tokens(self, grid_row: torch.Tensor) -> int:
        return int(grid_row.prod()) // (self.merge_size ** 2)


def chat_text(user_text: str, *, media: str, num_media_tokens: int) -> str:
    """The Qwen2-VL chat template's output for one user turn ``[media, text]`` with a generation prompt,
    media placeholder already expanded to ``num_media_tokens`` pad tokens (what the processor does)."""
    pad = "<|image_pad|>" if media == "image" else "<|video_pad|>"
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            f"{pad * num_media_tokens}<|vision_end|>{user_text}<|im_end|>\n<|im_start|>assistant\n")


def check_media_tokens(tokenizer, config) -> None:
    ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    if ids != [config.image_token_id, config.video_token_id]:
        raise ConfigError(f"tokenizer media token ids {ids} differ from the model config's "
                          f"{[config.image_token_id, config.video_token_id]}: tokenizer and config do not match")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: bad JSON ({e.msg} at line {e.lineno})") from None
