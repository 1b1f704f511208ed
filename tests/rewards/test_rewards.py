"""Reward components: built-ins, HPSv3 and VideoAlign on tiny Qwen2-VL models in their release formats,
per-segment composite reward, and the latents -> frames -> rewards -> advantages plumbing."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvpo_megatron.conditioning import LatentPreviewDecoder, MissingFileError, WanVAEDecoder
from kvpo_megatron.conditioning.wan_key_maps import wan_vae_diffusers_to_original
from kvpo_megatron.data import PromptSample
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.rewards import (
    BrightnessReward,
    ColorfulnessReward,
    ColorTargetReward,
    CompositeReward,
    MotionReward,
    RewardConfig,
    RewardOutput,
    TemporalConsistencyReward,
    build_reward,
    spans_from_switch_frames,
)
from kvpo_megatron.rewards import qwen2vl as q
from kvpo_megatron.rewards.hpsv3 import INSTRUCTION as HPS_INSTRUCTION
from kvpo_megatron.rewards.hpsv3 import HPSv3Reward
from kvpo_megatron.rewards.videoalign import SPECIAL_TOKENS as VA_TOKENS
from kvpo_megatron.rewards.videoalign import VideoAlignReward, sample_indices
from kvpo_megatron.rewards.videoalign_template import read_template

# A prompt_template.py in the form of VideoAlign's release (module-level template strings, build_prompt choosing one
# by template type), with this test's own wording. Its last line would leave a marker file if it were ever run.
VA_TEMPLATE = """
Rate the generated video on three criteria, each from 0 to 10.

Visual quality: sharpness, detail, colour, no structural errors.
Visual quality rating: <|VQ_reward|>
END

Motion quality: smooth, natural, stable movement of enough amplitude.
Motion quality rating: <|MQ_reward|>
END

Text alignment: subject, motion, scene and style follow the prompt.
Prompt - {text_prompt}
Text alignment rating: <|TA_reward|>
END
"""
VA_MODULE = f'''
PLAIN = """Rate this video. Prompt: "{{text_prompt}}"."""

WITH_TOKENS = """{VA_TEMPLATE}"""


def build_prompt(prompt, dimension, template_type):
    if template_type == "plain":
        return PLAIN.format(text_prompt=prompt)
    elif template_type == "detailed_special":
        return WITH_TOKENS.format(text_prompt=prompt)
    raise ValueError("Invalid template type")


open(__file__ + ".executed", "w").write("the template module was run")
'''

MEDIA = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
         "<|video_pad|>"]
PIX = dict(min_pixels=56 * 56, max_pixels=56 * 56)


# ----------------------------------------------------------------------------- tiny Qwen2-VL in release formats
def tiny_base(folder: Path, extra_tokens: int):
    """A tiny byte-level BPE tokenizer with Qwen2-VL's special tokens, and a matching tiny Qwen2VLConfig."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trained on the reward prompts themselves so they tokenize into few tokens (short sequences, fast tests)
    tok.train_from_iterator([HPS_INSTRUCTION, VA_TEMPLATE] * 4,
                            trainer=trainers.BpeTrainer(vocab_size=1500, special_tokens=MEDIA, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.save_pretrained(folder)
    ids = fast.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(fast) + extra_tokens, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=fast.pad_token_id, bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4}),
        vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32, mlp_ratio=2),
        image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3])
    return fast, cfg


def lively(model: torch.nn.Module) -> None:
    """Re-initialise a random model with larger weights so scores visibly depend on frames and prompts."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "rm_head" in name else 0.15))


def to_old_layout(key: str) -> str:
    """transformers 5 names -> the transformers 4.45 names the released checkpoints use."""
    return re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", key))


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpsv3")
    tok, cfg = tiny_base(root / "Qwen2-VL-7B-Instruct", extra_tokens=1)
    cfg.save_pretrained(root / "Qwen2-VL-7B-Instruct")
    ref_tok, ids = q.load_tokenizer(root / "Qwen2-VL-7B-Instruct", ["<|Reward|>"])
    ref = q.Qwen2VLRewardModel(cfg, head_type="ranknet", output_dim=2, special_token_ids=ids).eval()
    lively(ref)
    state = {to_old_layout(k): v.clone() for k, v in ref.state_dict().items()}
    state["lm_head.weight"] = torch.randn(cfg.text_config.vocab_size, 32)  # in the release file, unused here
    save_file(state, str(root / "HPSv3.safetensors"))
    return root, HPSv3Reward(ref, ref_tok, **PIX)


@pytest.fixture(scope="module")
def videoalign_files(tmp_path_factory):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("videoalign")
    base = root / "Qwen2-VL-2B-Instruct"
    tok, cfg = tiny_base(base, extra_tokens=0)
    n_base = len(tok)
    ref_tok, ids = q.load_tokenizer(base, VA_TOKENS)
    cfg.text_config.vocab_size = len(ref_tok)
    ref = q.Qwen2VLRewardModel(cfg, head_type="default", output_dim=1, special_token_ids=ids).eval()
    lively(ref)
    # 1. base model folder: the reward model's backbone before the reward tokens were added, HF format
    cfg_base = type(cfg).from_dict(cfg.to_dict())
    cfg_base.text_config.vocab_size = n_base
    hf = Qwen2VLForConditionalGeneration(cfg_base)
    backbone = {k: v.clone() for k, v in ref.state_dict().items() if not k.startswith("rm_head")}
    backbone["model.language_model.embed_tokens.weight"] = backbone["model.language_model.embed_tokens.weight"][:n_base]
    hf.load_state_dict(backbone, strict=False)
    hf.save_pretrained(base)
    # 2. LoRA on the language model, trained (random B), saved as peft does with old-layout names
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    inject_adapter_in_model(lora_cfg, ref)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ckpt = root / "VideoReward" / "checkpoint-100"
    ckpt.mkdir(parents=True)
    (root / "VideoReward" / "prompt_template.py").write_text(VA_MODULE)  # the release's module, beside the checkpoint
    save_file({f"base_model.model.{to_old_layout(k)}": v.contiguous()
               for k, v in get_peft_model_state_dict(ref).items()}, str(ckpt / "adapter_model.safetensors"))
    (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj", "v_proj"]}))
    non_lora = {"base_model.model.rm_head.weight": ref.rm_head.weight.detach().clone(),
                "base_model.model.model.embed_tokens.weight":
                    ref.model.language_model.embed_tokens.weight.detach().clone()}
    torch.save(non_lora, ckpt / "non_lora_state_dict.pth")
    (root / "VideoReward" / "checkpoint-50").mkdir()  # an older, incomplete checkpoint must not be picked
    norm = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 4.0}
    (root / "VideoReward" / "model_config.json").write_text(json.dumps(
        {"data_config": {"prompt_template_type": "detailed_special"}, "model_config": {"rm_head_type": "default"},
         "inference_config": norm}))
    opts = dict(video_fps=8.0, **PIX)
    normalization = {d: (norm[f"{d}_mean"], norm[f"{d}_std"]) for d in ("VQ", "MQ", "TA")}
    return root, VideoAlignReward(ref, ref_tok, prompt_template=VA_TEMPLATE, normalization=normalization,
                                  **opts), opts


# ----------------------------------------------------------------------------- HPSv3
def test_hpsv3_release_format_loads_and_scores_every_frame(hpsv3_files):
    root, reference = hpsv3_files
    hps = HPSv3Reward.from_pretrained(str(root / "HPSv3.safetensors"), base_path=str(root / "Qwen2-VL-7B-Instruct"),
                                      batch_size=3, **PIX)
    frames = torch.rand(2, 3, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat on the beach", "a red car"]
    scores = hps.score(frames, prompts)
    torch.testing.assert_close(scores, reference.score(frames, prompts), rtol=1e-4, atol=1e-5)
    per_frame = hps.score_images(frames.flatten(0, 1), [p for p in prompts for _ in range(3)]).view(2, 3)
    torch.testing.assert_close(scores, per_frame.mean(1))  # mu of every frame, averaged
    assert per_frame.std() > 1e-4  # frames matter
    assert (hps.score(frames, ["a red car", "a red car"]) - scores).abs().max() > 1e-5  # prompts matter
    uint8 = (frames * 255).round().to(torch.uint8)
    torch.testing.assert_close(hps.score(uint8, prompts), scores, rtol=0.05, atol=0.05)


def test_hpsv3_missing_files(hpsv3_files, tmp_path):
    root, _ = hpsv3_files
    with pytest.raises(MissingFileError, match=r"HPSv3 reward weights \(HPSv3.safetensors\) not found: .*nope"):
        HPSv3Reward.from_pretrained(str(tmp_path / "nope.safetensors"), base_path=str(root / "Qwen2-VL-7B-Instruct"))
    with pytest.raises(MissingFileError, match=r"Qwen2-VL config not found: .*empty/config.json"):
        (tmp_path / "empty").mkdir()
        HPSv3Reward.from_pretrained(str(root / "HPSv3.safetensors"), base_path=str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- VideoAlign
def test_videoalign_release_format_matches_unmerged_lora(videoalign_files):
    root, reference, opts = videoalign_files
    va = VideoAlignReward.from_pretrained(str(root / "VideoReward"), base_path=str(root / "Qwen2-VL-2B-Instruct"),
                                          **opts)
    assert va.normalization == reference.normalization  # read from model_config.json
    frames = torch.rand(2, 9, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    prompts = ["a cat on the beach", "a video of the quality"]
    got, ref = va.score_all(frames, prompts), reference.score_all(frames, prompts)
    for d in ("VQ", "MQ", "TA"):
        torch.testing.assert_close(got[d], ref[d], rtol=1e-4, atol=1e-4)
    raw = va.raw_scores(frames, prompts)
    torch.testing.assert_close(got["MQ"], (raw[:, 1] + 1.0) / 0.5)
    assert raw.std(0).min() > 1e-5  # each dimension varies over videos
    assert va.component("TA").score(frames, prompts) is got["TA"] or torch.equal(
        va.component("TA").score(frames, prompts), got["TA"])


def test_videoalign_grayscale_mq_and_fps_sampling(videoalign_files):
    root, reference, opts = videoalign_files
    gray_va = VideoAlignReward(reference.model, reference.tokenizer, mq_grayscale=True,
                               prompt_template=VA_TEMPLATE, normalization=reference.normalization, **opts)
    frames = torch.rand(1, 9, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    color, gray = reference.score_all(frames, ["a cat"]), gray_va.score_all(frames, ["a cat"])
    luma = (0.299 * frames[:, :, 0] + 0.587 * frames[:, :, 1] + 0.114 * frames[:, :, 2])[:, :, None].expand_as(frames)
    torch.testing.assert_close(gray["MQ"], reference.score_all(luma.clone(), ["a cat"])["MQ"])
    torch.testing.assert_close(gray["VQ"], color["VQ"])
    assert (gray["MQ"] - color["MQ"]).abs().item() > 1e-6
    assert sample_indices(33, video_fps=16, fps=2) == [0, 11, 21, 32]  # 4 frames minimum
    assert len(sample_indices(160, video_fps=16, fps=2)) == 20  # 10 s at 2 fps
    assert sample_indices(1, video_fps=16, fps=2) == [0, 0]


def test_videoalign_template_from_the_release_verbatim_with_reward_tokens_in_place(videoalign_files, tmp_path):
    root, _, opts = videoalign_files
    base = str(root / "Qwen2-VL-2B-Instruct")
    va = VideoAlignReward.from_pretrained(str(root / "VideoReward"), base_path=base, **opts)  # found beside it
    assert va.prompt_template == VA_TEMPLATE  # the release's detailed_special string, verbatim
    assert not list(root.rglob("*.executed"))  # parsed, never run
    prompt = "a red fox jumps over a frozen river"
    text = va.chat_text(prompt, num_media_tokens=4)
    assert VA_TEMPLATE.format(text_prompt=prompt) in text
    enc = va.tokenizer(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    pos = {t: ids.index(i) for t, i in zip(VA_TOKENS, va.tokenizer.convert_tokens_to_ids(VA_TOKENS))}
    assert all(ids.count(va.tokenizer.convert_tokens_to_ids(t)) == 1 for t in VA_TOKENS)
    lo = text.index(prompt)
    span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < lo + len(prompt) and b > lo]
    # VQ and MQ read their own sections, before the text prompt; TA comes after it
    assert pos["<|VQ_reward|>"] < pos["<|MQ_reward|>"] < span[0] and span[-1] < pos["<|TA_reward|>"]
    # a plain-text template file named in the config is used as it is
    (tmp_path / "template.txt").write_text(VA_TEMPLATE.replace("Prompt - ", "Described as: "))
    va_txt = VideoAlignReward.from_pretrained(str(root / "VideoReward"), base_path=base,
                                              prompt_template_file=str(tmp_path / "template.txt"), **opts)
    assert "Described as: " + prompt in va_txt.chat_text(prompt, 4)
    # without a template: one error naming where it looked; a template type without reward tokens is refused
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(MissingFileError, match=r"VideoAlign prompt template not found: .*params.prompt_template_file.*"
                                               r"ckpt/prompt_template.py"):
        VideoAlignReward.from_pretrained(str(tmp_path / "ckpt"), base_path=base)
    with pytest.raises(ConfigError, match="needs '{text_prompt}' and each reward token once"):
        read_template(root / "VideoReward" / "prompt_template.py", "plain")
    with pytest.raises(ConfigError, match="no build_prompt branch .* 'simple'"):
        read_template(root / "VideoReward" / "prompt_template.py", "simple")


def test_videoalign_missing_files(videoalign_files, tmp_path):
    root, _, _ = videoalign_files
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "ckpt" / "prompt_template.py").write_text(VA_MODULE)
    with pytest.raises(MissingFileError, match=r"VideoAlign reward weights not found: .*ckpt/adapter_config.json"):
        VideoAlignReward.from_pretrained(str(tmp_path / "ckpt"), base_path=str(root / "Qwen2-VL-2B-Instruct"))
    with pytest.raises(MissingFileError, match=r"Qwen2-VL-2B-Instruct folder not found: .*missing_base"):
        VideoAlignReward.from_pretrained(str(root / "VideoReward"), base_path=str(tmp_path / "missing_base"))


# ----------------------------------------------------------------------------- built-ins
def const(value: float, t: int = 3) -> torch.Tensor:
    return torch.full((1, t, 3, 4, 4), value)


def test_builtin_components_are_monotone_and_accept_uint8():
    b = BrightnessReward(target=0.6)
    scores = torch.cat([b.score(const(v), ["x"]) for v in (0.0, 0.3, 0.5, 0.6)])
    assert torch.all(scores[1:] > scores[:-1]) and scores[-1].abs() < 1e-6 and scores[0] >= -1.0
    frames = torch.rand(2, 3, 3, 4, 4)
    torch.testing.assert_close(b.score((frames * 255).round().to(torch.uint8), ["x", "y"]),
                               b.score((frames * 255).round() / 255, ["x", "y"]))
    c = ColorTargetReward(target=(0.8, 0.3, 0.2))
    red = torch.tensor([0.8, 0.3, 0.2]).view(1, 1, 3, 1, 1).expand(1, 2, 3, 4, 4)
    assert c.score(red, ["x"]).abs() < 1e-6 and c.score(const(0.5), ["x"]) < -0.01
    col = ColorfulnessReward()
    assert col.score(red, ["x"]) > col.score(const(0.5), ["x"]) + 0.1
    moving = torch.stack([const(0.5, 1)[0, 0], const(0.7, 1)[0, 0], const(0.5, 1)[0, 0]])[None]
    tc, mo = TemporalConsistencyReward(), MotionReward()
    assert tc.score(const(0.5), ["x"]) == 0 and tc.score(moving, ["x"]) < 0 and tc.score(const(0.5, 1), ["x"]) == 0
    assert mo.score(moving, ["x"]) > mo.score(const(0.5), ["x"])
    torch.testing.assert_close(MotionReward(target=0.2).score(moving, ["x"]), torch.tensor([0.0]))
    x = torch.full((1, 2, 3, 4, 4), 0.3, requires_grad=True)  # smooth: usable gradients
    (b.score(x, ["x"]) + col.score(x, ["x"]) + tc.score(x, ["x"])).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"frames must be \[B, T, 3, H, W\]"):
        b.score(torch.zeros(1, 3, 4, 4), ["x"])
    with pytest.raises(ConfigError, match="brightness.target=2"):
        BrightnessReward(target=2)


# ----------------------------------------------------------------------------- composite
class PromptLength:
    """Test component: mean brightness times prompt length, so per-segment prompt routing is visible."""

    name = "prompt_length"

    def score(self, frames, prompts):
        return frames.float().mean(dim=(1, 2, 3, 4)) * torch.tensor([float(len(p)) for p in prompts])


def test_composite_scores_per_segment_and_weights():
    comp = CompositeReward({"brightness": (BrightnessReward(), 1.0), "prompt_length": (PromptLength(), 0.25)})
    frames = torch.rand(3, 9, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    prompts = [["ab", "abcd"], ["ab", "abcd"], ["abcdef"]]
    segments = [[(0, 5), (5, 9)], [(0, 3), (3, 9)], [(0, 9)]]
    out = comp(frames, prompts, segments)
    for b in range(3):
        per_seg = [PromptLength().score(frames[b : b + 1, s:e], [p]) for (s, e), p in zip(segments[b], prompts[b])]
        torch.testing.assert_close(out.components["prompt_length"][b], torch.stack(per_seg).mean())
    torch.testing.assert_close(out.total, out.components["brightness"] + 0.25 * out.components["prompt_length"])
    single = comp(frames, ["x", "y", "z"])
    torch.testing.assert_close(single.components["brightness"], BrightnessReward().score(frames, ["x"] * 3))
    with pytest.raises(ConfigError, match="video 0 has 2 prompts but no segments"):
        comp(frames, prompts)
    with pytest.raises(ConfigError, match=r"video 1 segment \[3, 12\) is empty or outside 0..9"):
        comp(frames, prompts, [[(0, 5), (5, 9)], [(0, 3), (3, 12)], [(0, 9)]])
    with pytest.raises(ConfigError, match="video 2 has 2 segments but 1 prompts"):
        comp(frames, prompts, [[(0, 5), (5, 9)], [(0, 3), (3, 9)], [(0, 4), (4, 9)]])
    with pytest.raises(ConfigError, match="2 prompt entries for 3 videos"):
        comp(frames, ["x", "y"])


def test_spans_from_switch_frames():
    assert spans_from_switch_frames([2], num_latent_frames=3, num_frames=9) == [(0, 5), (5, 9)]  # Wan causal VAE
    assert spans_from_switch_frames([147, 294, 441], num_latent_frames=588, num_frames=2349)[1] == (585, 1173)
    assert spans_from_switch_frames([2], num_latent_frames=3, num_frames=3) == [(0, 2), (2, 3)]  # preview
    assert spans_from_switch_frames([], num_latent_frames=4, num_frames=8) == [(0, 8)]
    with pytest.raises(ConfigError, match="cannot map latent frames"):
        spans_from_switch_frames([1], num_latent_frames=3, num_frames=8)


@pytest.fixture(scope="module")
def tiny_vae_pth(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    cfg = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, latents_mean=[0.0] * 4,
               latents_std=[1.0] * 4)
    root = tmp_path_factory.mktemp("vae")
    torch.save(wan_vae_diffusers_to_original(AutoencoderKLWan(**cfg).state_dict()), root / "Wan2.1_VAE.pth")
    return root / "Wan2.1_VAE.pth", cfg


@pytest.mark.parametrize("decoder_kind", ["preview", "wan"])
def test_plumbing_latents_to_per_component_advantages(decoder_kind, tiny_vae_pth, hpsv3_files):
    # 1. a rollout: G=4 branches of one two-prompt sample (branch 0 is the anchor), latents as the DiT sees them
    sample = PromptSample(prompts=["a cat on the beach", "the cat runs"], switch_frames=[2], index=0)
    latents = torch.randn(4, 4, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    # 2. decode
    decoder = (LatentPreviewDecoder(latent_channels=4, upsample=8) if decoder_kind == "preview"
               else WanVAEDecoder.from_pretrained(tiny_vae_pth[0], vae_config=tiny_vae_pth[1]))
    frames = decoder.decode(latents)
    num_frames = 3 if decoder_kind == "preview" else 9
    assert frames.shape == (4, num_frames, 3, 16, 16)
    # 3. per-segment composite reward, one prompt per segment
    spans = spans_from_switch_frames(sample.switch_frames, num_latent_frames=3, num_frames=num_frames)
    _, ref_hps = hpsv3_files
    hps = HPSv3Reward(ref_hps.model, ref_hps.tokenizer, frame_stride=4, **PIX)
    reward = CompositeReward({"brightness": (BrightnessReward(target=0.7), 1.0),
                              "temporal_consistency": (TemporalConsistencyReward(), 0.5), "hpsv3": (hps, 0.2)})
    out = reward(frames, [sample.prompts] * 4, [spans] * 4)
    assert isinstance(out, RewardOutput) and set(out.components) == {"brightness", "temporal_consistency", "hpsv3"}
    first = hps.score(frames[:, spans[0][0] : spans[0][1]], [sample.prompts[0]] * 4)
    second = hps.score(frames[:, spans[1][0] : spans[1][1]], [sample.prompts[1]] * 4)
    torch.testing.assert_close(out.components["hpsv3"], (first + second) / 2)
    # 4. advantages per component, relative to the anchor branch
    adv = {k: (r - r[0]) / (r.std() + 1e-6) for k, r in out.components.items()}
    for k, a in adv.items():
        assert a.shape == (4,) and torch.isfinite(a).all() and a[0] == 0 and a[1:].abs().sum() > 0, k
    assert out.total.shape == (4,)


def test_reward_config_and_build(hpsv3_files, videoalign_files, tmp_path):
    hroot, _ = hpsv3_files
    vroot, reference, _ = videoalign_files
    cfg = RewardConfig(components=[
        {"kind": "brightness", "weight": 1.0, "params": {"target": 0.4}},
        {"kind": "motion", "weight": 0.1},
        {"kind": "hpsv3", "weight": 0.5, "path": str(hroot / "HPSv3.safetensors"), "dtype": "float32",
         "base_path": str(hroot / "Qwen2-VL-7B-Instruct"),
         "params": {"min_pixels": 3136, "max_pixels": 3136, "frame_stride": 4}},
        {"kind": "videoalign", "dimension": "VQ", "path": str(vroot / "VideoReward"), "dtype": "float32",
         "base_path": str(vroot / "Qwen2-VL-2B-Instruct"), "params": {"video_fps": 8.0, "max_pixels": 3136,
                                                                      "min_pixels": 3136}},
        {"kind": "videoalign", "dimension": "MQ", "path": str(vroot / "VideoReward"), "dtype": "float32",
         "base_path": str(vroot / "Qwen2-VL-2B-Instruct"), "params": {"video_fps": 8.0, "max_pixels": 3136,
                                                                      "min_pixels": 3136}},
    ])
    reward = build_reward(cfg)
    assert list(reward.weights) == ["brightness", "motion", "hpsv3", "videoalign_vq", "videoalign_mq"]
    assert reward.components["videoalign_vq"][0].reward is reward.components["videoalign_mq"][0].reward  # shared
    frames = torch.rand(2, 9, 3, 28, 28, generator=torch.Generator().manual_seed(9))
    out = reward(frames, ["a cat", "a dog"])
    torch.testing.assert_close(out.components["videoalign_mq"], reference.score_all(frames, ["a cat", "a dog"])["MQ"],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.components["brightness"], BrightnessReward(target=0.4).score(frames, ["", ""]))
    assert build_reward(RewardConfig()).weights == {"brightness": 1.0}


@pytest.mark.parametrize("entry, message", [
    ({"kind": "hpsv3", "base_path": "x"}, r"rewards\[hpsv3\].path is required"),
    ({"kind": "videoalign", "path": "x", "base_path": "y", "dimension": "AB"}, "dimension='AB'"),
    ({"kind": "pickscore"}, "rewards.kind='pickscore'"),
    ({"kind": "hpsv3", "path": "x", "base_path": "y", "params": {"fsp": 2}}, r"unknown \['fsp'\]"),
    ({"kind": "brightness", "weight": float("nan")}, "must be finite"),
])
def test_reward_config_errors(entry, message):
    with pytest.raises(ConfigError, match=message):
        RewardConfig(components=[entry])


def test_reward_build_errors(tmp_path, hpsv3_files):
    hroot, _ = hpsv3_files
    with pytest.raises(ConfigError, match="duplicate component names"):
        RewardConfig(components=[{"kind": "motion"}, {"kind": "motion"}])
    with pytest.raises(ConfigError, match="rewards.components is empty"):
        RewardConfig(components=[])
    with pytest.raises(ConfigError, match=r"rewards\[brightness\].params=\{'goal': 1\}"):
        build_reward(RewardConfig(components=[{"kind": "brightness", "params": {"goal": 1}}]))
    missing = tmp_path / "weights" / "HPSv3.safetensors"
    with pytest.raises(MissingFileError, match=f"HPSv3 reward weights .*not found: {re.escape(str(missing))}"):
        build_reward(RewardConfig(components=[{"kind": "hpsv3", "path": str(missing),
                                               "base_path": str(hroot / "Qwen2-VL-7B-Instruct")}]))
