"""VideoAlign / VideoReward (Qwen2-VL-2B-Instruct + LoRA + reward tokens): VQ, MQ and TA scores of a video.

Expected files (YAML config):
- ``path``: the VideoReward checkpoint folder. Either ``checkpoint-*/`` subfolders (the highest step is used) or
  the files themselves: ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA, merged into the weights at
  load) + ``non_lora_state_dict.pth`` (``rm_head``, trained embeddings/merger), or one full ``model.pth``.
  ``model_config.json`` (next to them or one level up) supplies the score normalisation if present.
- ``base_path``: the Qwen2-VL-2B-Instruct folder (``config.json``, ``*.safetensors``, ``tokenizer.json``).
- the prompt template of your VideoAlign release, used verbatim (``rewards/videoalign_template.py``):
  ``params.prompt_template_file`` (its ``prompt_template.py`` or the template text), or found beside ``path``.
Scores are normalised ``(raw - mean) / std`` with VideoAlign's published statistics: VQ (3.6757, 2.2476),
MQ (1.1646, 1.3811), TA (2.8105, 2.5121). Frames are sampled at ``fps`` (2) from a ``video_fps`` (16) video as
qwen-vl-utils does; ``mq_grayscale`` scores MQ on grayscale frames (a second forward).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from kvpo_megatron.conditioning.files import MissingFileError, require_path
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.lora_tensors import lora_pairs, merge_full
from kvpo_megatron.rewards import qwen2vl as q
from kvpo_megatron.rewards import videoalign_template as T
from kvpo_megatron.rewards.base import as_unit_frames, check_prompts, luma

logger = logging.getLogger(__name__)

DIMENSIONS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = list(T.SPECIAL_TOKENS)
NORMALIZATION = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}

def sample_indices(total: int, *, video_fps: float, fps: float, min_frames: int = 4,
                   max_frames: int = 768) -> list[int]:
    """qwen-vl-utils' ``smart_nframes`` + ``linspace`` sampling (frame count a multiple of 2, at least 2)."""
    if total < 2:
        return [0, 0]
    n = total / video_fps * fps
    lo, hi = 2 * math.ceil(min_frames / 2), 2 * math.floor(min(max_frames, total) / 2)
    n = max(2, 2 * math.floor(min(max(n, lo), hi, total) / 2))
    return torch.linspace(0, total - 1, n).round().long().tolist()


def merge_lora(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], adapter: dict, source: str) -> None:
    """``W += s * B @ A`` for every LoRA pair (``s = alpha / r``, or ``alpha / sqrt(r)`` with rslora), in place."""
    if adapter.get("use_dora"):
        raise ConfigError(f"{source}: DoRA adapters (use_dora=true) are not supported; expected plain LoRA")
    if "r" not in adapter or "lora_alpha" not in adapter:
        raise ConfigError(f"{source}: adapter_config.json needs 'r' and 'lora_alpha'")
    r, alpha = int(adapter["r"]), float(adapter["lora_alpha"])
    scale = alpha / math.sqrt(r) if adapter.get("use_rslora") else alpha / r
    try:
        pairs = lora_pairs(lora)
    except KeyError as e:
        raise ConfigError(f"{source}: {e.args[0]}") from None
    if not pairs:
        raise ConfigError(f"{source}: no '*.lora_A.weight' tensors in the adapter")
    missing = [m for m in pairs if f"{m}.weight" not in state]
    if missing:
        raise ConfigError(f"{source}: LoRA modules {missing[:10]} have no base weight in the checkpoint")
    state.update(merge_full({f"{m}.weight": state[f"{m}.weight"] for m in pairs}, lora, scale))


def checkpoint_dir(path: Path) -> Path:
    steps = sorted((p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    return steps[-1] if steps else path


def load_videoalign_state(ckpt: Path, base: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Base weights + merged LoRA + non-LoRA trained weights (normalised keys), and model_config.json (or {})."""
    folder = checkpoint_dir(ckpt)
    meta_file = next((f for f in (folder / "model_config.json", ckpt / "model_config.json") if f.exists()), None)
    meta = q.read_json(meta_file) if meta_file else {}
    if (folder / "model.pth").exists():
        return q.normalize_keys(q.load_state_file(folder / "model.pth")), meta
    for name in ("adapter_model.safetensors", "adapter_config.json", "non_lora_state_dict.pth"):
        if not (folder / name).exists():
            raise MissingFileError(f"VideoAlign reward weights not found: {folder / name}")
    state = q.normalize_keys(q.load_folder_weights(base))
    non_lora = q.normalize_keys(q.load_state_file(folder / "non_lora_state_dict.pth"))
    state.update(non_lora)  # rm_head, and the resized embed_tokens / merger when they were trained
    lora = q.normalize_keys(q.load_state_file(folder / "adapter_model.safetensors"))
    merge_lora(state, lora, q.read_json(folder / "adapter_config.json"), str(folder))
    return state, meta


class VideoAlignReward:
    """VQ/MQ/TA of ``[B, T, 3, H, W]`` videos. ``score_all`` returns normalised scores per dimension; component
    views (``component('MQ')``) share one forward per batch through a one-entry memo."""

    def __init__(self, model: q.Qwen2VLRewardModel, tokenizer, *, prompt_template: str, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, offload: bool = False, fps: float = 2.0,
                 video_fps: float = 16.0, min_pixels: int = 128 * 28 * 28, max_pixels: int = 448 * 448,
                 mq_grayscale: bool = False, normalization: dict[str, tuple[float, float]] | None = None,
                 batch_size: int = 2) -> None:
        """``prompt_template``: the release's template text (``videoalign_template.read_template``)."""
        if "{text_prompt}" not in prompt_template or any(prompt_template.count(t) != 1 for t in SPECIAL_TOKENS):
            raise ConfigError(f"VideoAlign prompt_template needs '{{text_prompt}}' and each of {SPECIAL_TOKENS} once")
        self.model, self.tokenizer = model, tokenizer
        self.vision = q.VisionSpec.from_config(model.model.config)
        self.device, self.dtype, self.offload = torch.device(device), dtype, offload
        self.fps, self.video_fps = fps, video_fps
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.mq_grayscale = mq_grayscale
        self.normalization = dict(normalization or NORMALIZATION)
        self.prompt_template = prompt_template
        self.batch_size = batch_size
        self._memo: tuple[torch.Tensor, tuple, dict[str, torch.Tensor]] | None = None
        q.check_media_tokens(tokenizer, model.model.config)
        self.model.to(device="cpu" if offload else self.device, dtype=dtype)
        self.model.rm_head.float()

    @classmethod
    def from_pretrained(cls, path: str, *, base_path: str, prompt_template_file: str | None = None,
                        **kwargs) -> "VideoAlignReward":
        """``prompt_template_file``: the release's ``prompt_template.py`` (or the template text); None looks
        beside ``path``. Its template type is ``model_config.json``'s ``data_config.prompt_template_type``."""
        ckpt = require_path(path, "VideoAlign reward checkpoint folder", field="rewards.videoalign.path")
        base = require_path(base_path, "Qwen2-VL-2B-Instruct folder", field="rewards.videoalign.base_path")
        template_file = Path(prompt_template_file) if prompt_template_file else \
            T.find_template(ckpt, checkpoint_dir(ckpt))
        config = q.load_config(base, field="rewards.videoalign.base_path")
        tokenizer, special_ids = q.load_tokenizer(base, SPECIAL_TOKENS)
        state, meta = load_videoalign_state(ckpt, base)
        kind = (meta.get("data_config") or {}).get("prompt_template_type", T.DEFAULT_TYPE)
        kwargs["prompt_template"] = T.read_template(template_file, kind)
        head = meta.get("model_config", {}).get("rm_head_type", "default")
        model = q.build_reward_model(config, state, head_type=head, output_dim=1, special_token_ids=special_ids,
                                     source=str(ckpt))
        inf = meta.get("inference_config") or {}
        if "normalization" not in kwargs and all(f"{d}_mean" in inf for d in DIMENSIONS):
            kwargs["normalization"] = {d: (float(inf[f"{d}_mean"]), float(inf[f"{d}_std"])) for d in DIMENSIONS}
        logger.info("loaded VideoAlign from %s (base %s, prompt template %s)", ckpt, base, template_file)
        return cls(model, tokenizer, **kwargs)

    @torch.no_grad()
    def raw_scores(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """frames [B, T, 3, H, W] in [0, 1] -> unnormalised [B, 3] (VQ, MQ, TA), float32 on CPU."""
        idx = sample_indices(frames.shape[1], video_fps=self.video_fps, fps=self.fps)
        out = []
        model = self.model.to(device=self.device)
        try:
            for s in range(0, frames.shape[0], self.batch_size):
                clips = frames[s : s + self.batch_size, idx].to(self.device)
                pixel_values, grid = self.vision.patchify(clips, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
                texts = [self.chat_text(p, self.vision.num_tokens(g)) for p, g in zip(prompts[s : s + self.batch_size], grid)]
                batch = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                logits = model(batch["input_ids"], batch["attention_mask"],
                               pixel_values_videos=pixel_values.to(self.dtype), video_grid_thw=grid)  # [b, 3, 1]
                out.append(logits[..., 0].float().cpu())
        finally:
            if self.offload:
                model.to(device="cpu")
        return torch.cat(out)

    def chat_text(self, prompt: str, num_media_tokens: int) -> str:
        """The model's input text: the chat turn [video, the release template filled with ``prompt``]."""
        return q.chat_text(T.render(self.prompt_template, prompt), media="video", num_media_tokens=num_media_tokens)

    def score_all(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        x = as_unit_frames(frames, where="videoalign")
        check_prompts(x, prompts, where="videoalign")
        memo = self._memo
        if memo is not None and memo[0] is frames and memo[1] == (frames._version, tuple(prompts)):
            return memo[2]
        raw = self.raw_scores(x, prompts)
        if self.mq_grayscale:
            gray = luma(x)[:, :, None].expand(-1, -1, 3, -1, -1)
            raw[:, 1] = self.raw_scores(gray, prompts)[:, 1]
        norm = self.normalization
        scores = {d: (raw[:, i] - norm[d][0]) / norm[d][1] for i, d in enumerate(DIMENSIONS)}
        self._memo = (frames, (frames._version, tuple(prompts)), scores)  # holds `frames`, so `is` is safe
        return scores

    def component(self, dimension: str, *, name: str | None = None) -> "VideoAlignDimension":
        if dimension not in DIMENSIONS:
            raise ConfigError(f"videoalign dimension={dimension!r}: expected one of {DIMENSIONS}")
        return VideoAlignDimension(self, dimension, name or f"videoalign_{dimension.lower()}")


class VideoAlignDimension:
    """One VideoAlign dimension as a ``RewardComponent``."""

    def __init__(self, reward: VideoAlignReward, dimension: str, name: str) -> None:
        self.reward, self.dimension, self.name = reward, dimension, name

    def score(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.reward.score_all(frames, prompts)[self.dimension]

    def release(self) -> None:
        """Drop the memo (and its reference to the last frames)."""
        self.reward._memo = None
