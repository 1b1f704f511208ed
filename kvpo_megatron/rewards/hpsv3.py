"""HPSv3 image preference reward (Qwen2-VL-7B-Instruct + ranknet head giving (mu, sigma)); videos are scored
frame by frame with the prompt, and ``mu`` is averaged over frames.

The ``hpsv3`` package pins transformers 4.45, so the model is rebuilt here with the installed transformers.
Expected files (YAML config):
- ``path``: ``HPSv3.safetensors`` (from MizzenAI/HPSv3; full state dict of ``Qwen2VLRewardModelBT`` with
  ``visual.*``, ``model.*``, ``lm_head.*``, ``rm_head.*``; a ``.pth`` or a ``{"model": ...}`` wrapper also works);
- ``base_path``: the Qwen2-VL-7B-Instruct folder, for ``config.json`` and the tokenizer (``tokenizer.json``);
  its weights are not read (the HPSv3 file holds all of them).
Settings follow HPSv3's inference: ``<|Reward|>`` special token, min = max = 256*28*28 pixels per image, the
instruction text below, ``rm_head_type='ranknet'``, ``output_dim=2``.
"""
from __future__ import annotations

import logging

import torch

from kvpo_megatron.conditioning.files import require_path
from kvpo_megatron.rewards.base import as_unit_frames, check_prompts
from kvpo_megatron.rewards import qwen2vl as q

logger = logging.getLogger(__name__)

# Verbatim from hpsv3/dataset/data_collator_qwen.py (hpsv3 1.0.0, MIT).
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""
SPECIAL_TOKENS = ["<|Reward|>"]
PIXELS = 256 * 28 * 28


class HPSv3Reward:
    """Scores ``[B, T, 3, H, W]`` videos: HPSv3 ``mu`` of every ``frame_stride``-th frame, averaged per video."""

    def __init__(self, model: q.Qwen2VLRewardModel, tokenizer, *, name: str = "hpsv3", device: str = "cpu",
                 dtype: torch.dtype = torch.float32, offload: bool = False, batch_size: int = 8,
                 frame_stride: int = 1, min_pixels: int = PIXELS, max_pixels: int = PIXELS) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.vision = q.VisionSpec.from_config(model.model.config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload
        self.batch_size = batch_size
        self.frame_stride = frame_stride
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        q.check_media_tokens(tokenizer, model.model.config)
        self.model.to(device="cpu" if offload else self.device, dtype=dtype)
        self.model.rm_head.float()

    @classmethod
    def from_pretrained(cls, path: str, *, base_path: str, **kwargs) -> "HPSv3Reward":
        ckpt = require_path(path, "HPSv3 reward weights (HPSv3.safetensors)", field="rewards.hpsv3.path")
        config = q.load_config(base_path, field="rewards.hpsv3.base_path")
        tokenizer, special_ids = q.load_tokenizer(require_path(base_path, "Qwen2-VL-7B-Instruct folder"),
                                                  SPECIAL_TOKENS)
        state = q.normalize_keys(q.load_state_file(ckpt))
        model = q.build_reward_model(config, state, head_type="ranknet", output_dim=2,
                                     special_token_ids=special_ids, source=str(ckpt))
        logger.info("loaded HPSv3 from %s", ckpt)
        return cls(model, tokenizer, **kwargs)

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1], one prompt each -> mu [N] (float32, on CPU)."""
        out = []
        model = self.model.to(device=self.device)
        try:
            for s in range(0, images.shape[0], self.batch_size):
                imgs = images[s : s + self.batch_size].to(self.device)
                pixel_values, grid = self.vision.patchify(imgs[:, None], min_pixels=self.min_pixels,
                                                          max_pixels=self.max_pixels)
                texts = [q.chat_text(INSTRUCTION.format(text_prompt=p) + PROMPT_WITH_SPECIAL_TOKEN, media="image",
                                     num_media_tokens=self.vision.num_tokens(g))
                         for p, g in zip(prompts[s : s + self.batch_size], grid)]
                batch = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                logits = model(batch["input_ids"], batch["attention_mask"],
                               pixel_values=pixel_values.to(self.dtype), image_grid_thw=grid)  # [n, 1, 2]
                out.append(logits[:, 0, 0].float().cpu())
        finally:
            if self.offload:
                model.to(device="cpu")
        return torch.cat(out)

    def score(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = as_unit_frames(frames, where=self.name)
        check_prompts(x, prompts, where=self.name)
        x = x[:, :: self.frame_stride]  # [B, T', 3, H, W]
        b, t = x.shape[:2]
        mu = self.score_images(x.reshape(b * t, *x.shape[2:]), [p for p in prompts for _ in range(t)])
        return mu.view(b, t).mean(dim=1)
