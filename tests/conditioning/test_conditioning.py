"""Text encoders (sentencepiece ids, umT5 in Wan and HF layouts, caching) and latent decoders (Wan VAE, preview)."""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvpo_megatron.conditioning import (
    CachedTextEncoder,
    DecoderConfig,
    HashTextEncoder,
    LatentPreviewDecoder,
    MissingFileError,
    TextEncoderConfig,
    WanVAEDecoder,
    build_decoder,
    build_text_encoder,
)
from kvpo_megatron.conditioning.umt5 import SentencePieceTokenizer, UMT5TextEncoder, clean_text
from kvpo_megatron.conditioning.wan_key_maps import umt5_hf_to_wan, wan_vae_diffusers_to_original
from kvpo_megatron.errors import ConfigError

CORPUS = ["a cat walking on the beach at sunset", "a red car drives through a rainy city at night",
          "the quick brown fox jumps over the lazy dog", "a drone shot of snowy mountains and a lake",
          "two people dancing in a kitchen, warm light"]
HEADS, BUCKETS = 4, 8


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=buf, vocab_size=60, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def umt5(tmp_path_factory, spiece):
    """A tiny random UMT5 saved in the HF layout and as Wan's original .pth (tokenizer where Wan keeps it)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=HEADS,
                     relative_attention_num_buckets=BUCKETS, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = UMT5EncoderModel(cfg).eval()
    root = tmp_path_factory.mktemp("umt5")
    model.save_pretrained(root / "hf")
    shutil.copy(spiece, root / "hf" / "spiece.model")
    (root / "wan" / "google" / "umt5-xxl").mkdir(parents=True)
    shutil.copy(spiece, root / "wan" / "google" / "umt5-xxl" / "spiece.model")
    wan_state = umt5_hf_to_wan(model.state_dict())
    torch.save(wan_state, root / "wan" / "models_t5_umt5-xxl-enc-bf16.pth")
    return model, root, wan_state


def wan_t5_reference(state, ids, mask):
    """Wan's ``T5Encoder.forward`` (wan/modules/t5.py, shared_pos=False) written out on the original keys."""
    def norm(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def bucket(rel):  # T5RelativeEmbedding._relative_position_bucket, bidirectional, max_dist=128
        nb = BUCKETS // 2
        out = (rel > 0).long() * nb
        rel = rel.abs()
        exact = nb // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(128 / exact) * (nb - exact)).long()
        return out + torch.where(rel < exact, rel, torch.clamp(large, max=nb - 1))

    b, length = ids.shape
    x = F.embedding(ids, state["token_embedding.weight"])
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    n_layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(n_layers):
        w = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = norm(x, w["norm1.weight"])
        q, k, v = (F.linear(h, w[f"attn.{n}.weight"]).view(b, length, HEADS, -1) for n in "qkv")
        bias = F.embedding(bucket(rel), w["pos_embedding.embedding.weight"]).permute(2, 0, 1)[None]
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias
        attn = attn.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min).softmax(-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1), w["attn.o.weight"])
        h = norm(x, w["norm2.weight"])
        gate = F.gelu(F.linear(h, w["ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(F.linear(h, w["ffn.fc1.weight"]) * gate, w["ffn.fc2.weight"])
    return norm(x, state["norm.weight"])


# ----------------------------------------------------------------------------- tokenizer
def test_token_ids_equal_sentencepiece(spiece):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    tok = SentencePieceTokenizer(spiece, text_len=12)
    prompts = ["a cat walking on the beach", "  a red &amp; blue\n car  ", "the quick brown fox jumps over the "
               "lazy dog at sunset in the city"]
    ids, mask = tok(prompts)
    for i, p in enumerate(prompts):
        expected = sp.encode(clean_text(p), out_type=int)[:11] + [sp.eos_id()]
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == expected
        assert ids[i, n:].eq(sp.pad_id()).all() and mask[i, n:].eq(0).all()
    assert clean_text("  a red &amp; blue\n car  ") == "a red & blue car"
    assert int(mask[2].sum()) == 12 and ids[2, -1] == sp.eos_id()  # truncated, </s> kept


# ----------------------------------------------------------------------------- umT5
def test_umt5_wan_pth_matches_wan_reference_and_hf(umt5, spiece):
    model, root, wan_state = umt5
    enc = UMT5TextEncoder.from_pretrained(root / "wan" / "models_t5_umt5-xxl-enc-bf16.pth", text_len=16)
    assert (enc.text_len, enc.text_dim) == (16, 16) and enc.model.config.num_layers == 2
    prompts = ["a cat walking on the beach", "a drone shot of snowy mountains and a lake at night"]
    emb, lengths = enc.encode(prompts)
    ids, mask = SentencePieceTokenizer(spiece, text_len=16)(prompts)
    with torch.no_grad():
        ref = wan_t5_reference(wan_state, ids, mask)
        hf = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert lengths.tolist() == mask.sum(1).tolist()
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(emb[b, :n], ref[b, :n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(emb[b, :n], hf[b, :n], rtol=1e-5, atol=1e-6)
        assert emb[b, n:].abs().sum() == 0  # padded positions zeroed
    emb_hf, _ = UMT5TextEncoder.from_pretrained(root / "hf", text_len=16).encode(prompts)
    torch.testing.assert_close(emb_hf, emb, rtol=1e-5, atol=1e-6)


def test_umt5_cache_offload_free_through_config(umt5):
    _, root, _ = umt5
    cfg = TextEncoderConfig(kind="umt5", path=str(root / "hf"), text_len=512, text_dim=16, dtype="float32",
                            offload_after_encode=True)
    enc = build_text_encoder(cfg)
    assert isinstance(enc, CachedTextEncoder)
    first, lengths = enc.encode(["a cat", "a dog", "a cat"])
    assert first.shape == (3, 512, 16) and first.dtype == torch.float32
    assert enc.misses == 2 and enc.hits == 1 and len(enc) == 2
    torch.testing.assert_close(first[0], first[2])
    assert first[0, lengths[0]:].abs().sum() == 0
    enc.free()
    again, _ = enc.encode(["a dog"])  # cached prompts still work without the encoder
    torch.testing.assert_close(again[0], first[1])
    with pytest.raises(RuntimeError, match="after free"):
        enc.encode(["a brand new prompt"])


def test_umt5_errors(umt5, tmp_path):
    _, root, wan_state = umt5
    with pytest.raises(MissingFileError, match=r"umT5 encoder weights not found: .*nope.pth \(config field 'path'\)"):
        UMT5TextEncoder.from_pretrained(tmp_path / "nope.pth")
    lone = tmp_path / "lone.pth"
    torch.save(wan_state, lone)
    with pytest.raises(MissingFileError, match=r"umT5 tokenizer \(spiece.model\).* not found: tried .*spiece.model"):
        UMT5TextEncoder.from_pretrained(lone)
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="not a Wan umT5 encoder state dict"):
        UMT5TextEncoder.from_pretrained(tmp_path / "bad.pth", tokenizer=root / "hf" / "spiece.model")
    with pytest.raises(ConfigError, match="text_encoder.path is required"):
        TextEncoderConfig(kind="umt5")
    with pytest.raises(ConfigError, match=r"text_encoder.kind='t5'"):
        TextEncoderConfig(kind="t5")
    with pytest.raises(ConfigError, match="text_dim=4096 but the umt5 encoder gives .*text_dim=16"):
        build_text_encoder(TextEncoderConfig(kind="umt5", path=str(root / "hf"), dtype="float32"))


def test_hash_encoder_deterministic_and_padded():
    enc = HashTextEncoder(text_len=10, text_dim=6, seed=3)
    a, la = enc.encode(["a cat on a mat", "x"])
    b, _ = HashTextEncoder(text_len=10, text_dim=6, seed=3).encode(["x", "a cat on a mat"])
    torch.testing.assert_close(a[0], b[1])
    assert la.tolist() == [6, 2] and a[1, 2:].abs().sum() == 0 and a[1, :2].abs().sum() > 0
    other, _ = HashTextEncoder(text_len=10, text_dim=6, seed=4).encode(["x"])
    assert not torch.allclose(other[0], a[1])
    built = build_text_encoder(TextEncoderConfig(text_len=10, text_dim=6, seed=3))
    torch.testing.assert_close(built.encode(["x"])[0][0], a[1])


# ----------------------------------------------------------------------------- Wan VAE
VAE_CFG = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, latents_mean=[0.1, -0.2, 0.3, 0.0],
               latents_std=[1.5, 0.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def wan_vae(tmp_path_factory):
    """Tiny AutoencoderKLWan (the real block structure, narrow) saved as Wan's original .pth and diffusers folder."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE_CFG).eval()
    root = tmp_path_factory.mktemp("vae")
    torch.save(wan_vae_diffusers_to_original(vae.state_dict()), root / "Wan2.1_VAE.pth")
    (root / "vae_config.json").write_text(json.dumps(VAE_CFG))
    vae.save_pretrained(root / "pipeline" / "vae")
    return vae, root


def test_wan_vae_original_and_diffusers_layouts(wan_vae):
    vae, root = wan_vae
    from_pth = WanVAEDecoder.from_pretrained(root / "Wan2.1_VAE.pth", vae_config=root / "vae_config.json")
    from_dir = build_decoder(DecoderConfig(kind="wan", path=str(root / "pipeline"), latent_channels=4))
    latents = torch.randn(2, 4, 3, 2, 3)
    frames = from_pth.decode(latents)
    assert frames.shape == (2, 1 + 4 * 2, 3, 16, 24) and 0.0 <= frames.min() and frames.max() <= 1.0
    raw = latents * torch.tensor(VAE_CFG["latents_std"]).view(1, 4, 1, 1, 1) + torch.tensor(
        VAE_CFG["latents_mean"]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        ref = (vae.decode(raw).sample.permute(0, 2, 1, 3, 4) + 1) / 2  # diffusers' own (whole-video) decode
    torch.testing.assert_close(frames, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_dir.decode(latents), frames, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_pth.denormalize(latents), raw)
    torch.testing.assert_close(from_pth.normalize(raw), latents, rtol=1e-5, atol=1e-6)
    assert from_pth.encode(frames).shape == (2, 4, 3, 2, 3)


def test_wan_vae_streams_causally_chunk_by_chunk(wan_vae):
    _, root = wan_vae
    dec = WanVAEDecoder.from_pretrained(root / "Wan2.1_VAE.pth", vae_config=root / "vae_config.json", offload=True)
    latents = torch.randn(2, 4, 3, 1, 1)
    chunks = list(dec.iter_decode(latents))
    assert [(b, c.shape[0]) for b, c in chunks] == [(0, 1), (0, 4), (0, 4), (1, 1), (1, 4), (1, 4)]
    # causal: decoding a prefix of the latents gives the same first frames
    prefix = dec.decode(latents[:, :, :2])
    torch.testing.assert_close(dec.decode(latents)[:, :5], prefix, rtol=1e-5, atol=1e-6)
    assert next(dec.vae.parameters()).device.type == "cpu"


def test_wan_vae_errors(wan_vae, tmp_path):
    _, root = wan_vae
    msg = r"Wan VAE weights not found: .*Wan2.1_VAE.pth \(config field 'decoder.path'\)"
    with pytest.raises(MissingFileError, match=msg):
        build_decoder(DecoderConfig(kind="wan", path=str(tmp_path / "Wan2.1_VAE.pth"), latent_channels=4))
    with pytest.raises(ConfigError, match="decoder.path is required"):
        DecoderConfig(kind="wan")
    with pytest.raises(ConfigError, match="Wan VAE weights do not match AutoencoderKLWan.*set decoder.vae_config"):
        WanVAEDecoder.from_pretrained(root / "Wan2.1_VAE.pth")  # tiny weights, default (real) config
    torch.save({"encoder.x": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="not a Wan VAE state dict"):
        WanVAEDecoder.from_pretrained(tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="latent_channels=16 but the Wan VAE .* has z_dim=4"):
        build_decoder(DecoderConfig(kind="wan", path=str(root / "pipeline")))
    dec = WanVAEDecoder.from_pretrained(root / "pipeline")
    with pytest.raises(ConfigError, match="latents have 5 channels, the decoder expects 4"):
        dec.decode(torch.zeros(1, 5, 2, 2, 2))


def test_preview_decoder():
    dec = build_decoder(DecoderConfig(latent_channels=4, upsample=2, seed=1))
    assert isinstance(dec, LatentPreviewDecoder)
    latents = torch.randn(2, 4, 5, 3, 3)
    frames = dec.decode(latents)
    assert frames.shape == (2, 5, 3, 6, 6) and 0.0 < frames.min() and frames.max() < 1.0
    torch.testing.assert_close(frames, LatentPreviewDecoder(latent_channels=4, upsample=2, seed=1).decode(latents))
    assert torch.equal(frames[..., 0, 0], frames[..., 1, 1])  # nearest upsampling
    # smooth and monotone: moving the latents along W^T brightens every channel's pre-activation
    w = dec.weight  # [3, C]
    brighter = dec.decode(latents + 0.5 * w.sum(0).view(1, 4, 1, 1, 1))
    assert (brighter.mean() > frames.mean())
    with pytest.raises(ConfigError, match=r"latents must be \[B, C, F, h, w\]"):
        dec.decode(torch.zeros(4, 5, 3, 3))
    with pytest.raises(ConfigError, match="decoder.upsample=0"):
        DecoderConfig(upsample=0)
