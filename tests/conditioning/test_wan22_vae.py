"""The Wan2.2 VAE (Wan2.2-TI2V-5B, LongLive 2.0) through diffusers' ``AutoencoderKLWan`` in its Wan2.2
configuration (residual blocks, 2x2 patchify, z_dim 48, 16x spatial / 4x temporal), built tiny and random here:
original ``Wan2.2_VAE.pth`` layout and diffusers folder load alike; causal chunked decode == diffusers' decode."""
from __future__ import annotations

import json

import pytest
import torch

from kvpo_megatron.conditioning.vae import WAN22_VAE_CONFIG, DecoderConfig, WanVAEDecoder, build_decoder
from kvpo_megatron.conditioning.wan_key_maps import wan22_vae_diffusers_to_original, wan22_vae_original_to_diffusers
from kvpo_megatron.errors import ConfigError

Z = 48


@pytest.fixture(scope="module")
def wan22_vae(tmp_path_factory):
    """The Wan2.2 configuration with narrow channels (base 8 / decoder 12 instead of 160 / 256)."""
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(0)
    cfg = {**WAN22_VAE_CONFIG, "base_dim": 8, "decoder_base_dim": 12,
           "latents_mean": (torch.randn(Z, generator=g) * 0.3).tolist(),
           "latents_std": (torch.rand(Z, generator=g) + 0.5).tolist()}
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**cfg).eval()
    with torch.no_grad():  # move away from zero-initialised gains/biases so every layer matters
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    root = tmp_path_factory.mktemp("vae22")
    original = wan22_vae_diffusers_to_original(vae.state_dict())
    torch.save(original, root / "Wan2.2_VAE.pth")
    (root / "vae_config.json").write_text(json.dumps(cfg))
    vae.save_pretrained(root / "pipeline" / "vae")
    return vae, cfg, root, original


def test_original_layout_keys(wan22_vae):
    """Keys of the original layout (Wan2.2 ``vae2_2.py``): residual stages ``downsamples.{s}.downsamples.{j}``
    with the resample as the stage's last module; the rename is a bijection."""
    vae, _, _, original = wan22_vae
    assert "encoder.downsamples.0.downsamples.0.residual.0.gamma" in original
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in original  # temporal downsample of stage 1
    assert "decoder.upsamples.0.upsamples.3.resample.1.weight" in original  # stage 0: 3 residual blocks + resample
    assert "decoder.middle.1.to_qkv.weight" in original and "conv2.weight" in original
    back = wan22_vae_original_to_diffusers(original)
    assert back.keys() == vae.state_dict().keys()
    with pytest.raises(ConfigError, match="unexpected key 'encoder.nope'"):
        wan22_vae_original_to_diffusers({"encoder.nope": torch.zeros(1)})


def test_decode_matches_diffusers_and_is_causal(wan22_vae):
    vae, cfg, root, _ = wan22_vae
    dec = WanVAEDecoder.from_pretrained(root / "Wan2.2_VAE.pth", vae_config=root / "vae_config.json")
    from_dir = build_decoder(DecoderConfig(kind="wan", path=str(root / "pipeline"), latent_channels=Z))
    latents = torch.randn(2, Z, 3, 2, 3)
    frames = dec.decode(latents)
    assert frames.shape == (2, 1 + 4 * 2, 3, 32, 48)  # 16x spatial, 1 + 4 (F - 1) frames
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0.01
    raw = latents * torch.tensor(cfg["latents_std"]).view(1, Z, 1, 1, 1) + torch.tensor(
        cfg["latents_mean"]).view(1, Z, 1, 1, 1)
    with torch.no_grad():
        ref = (vae.decode(raw).sample.permute(0, 2, 1, 3, 4) + 1) / 2  # diffusers' own (whole-video) decode
    torch.testing.assert_close(frames, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_dir.decode(latents), frames, rtol=1e-5, atol=1e-6)
    chunks = list(dec.iter_decode(latents[:1]))
    assert [c.shape[0] for _, c in chunks] == [1, 4, 4]
    prefix = dec.decode(latents[:, :, :2])  # causal: a prefix of the latents gives the same first frames
    torch.testing.assert_close(frames[:, :5], prefix, rtol=1e-5, atol=1e-6)
    assert dec.encode(frames).shape == (2, Z, 3, 2, 3)


def test_wan22_errors(wan22_vae, tmp_path):
    _, _, root, original = wan22_vae
    # tiny weights with the real Wan2.2 architecture (the default for a Wan2.2_VAE.pth): one clear error
    with pytest.raises(ConfigError, match=r"Wan VAE weights do not match AutoencoderKLWan\(Wan2.2 config\)"):
        WanVAEDecoder.from_pretrained(root / "Wan2.2_VAE.pth")
    with pytest.raises(ConfigError, match="latent_channels=16 but the Wan VAE .* has z_dim=48"):
        build_decoder(DecoderConfig(kind="wan", path=str(root / "pipeline")))
    torch.save({**original, "decoder.upsamples.9.bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="unexpected key 'decoder.upsamples.9.bogus'"):
        WanVAEDecoder.from_pretrained(tmp_path / "bad.pth", vae_config=root / "vae_config.json")
