"""Latent -> frame decoders: a weight-free preview decoder and the Wan2.1 / Wan2.2 VAEs through diffusers.

Latents are the normalised latents the DiT sees, ``[B, C, F, h, w]``; frames come out ``[B, T, 3, H, W]`` in
[0, 1]. Wan normalises VAE latents per channel, ``z_dit = (z_vae - mean) / std`` (``latents_mean``/``latents_std``
in the diffusers config, the same 16 numbers as Wan's ``WanVAE``); decoding undoes that first.

Expected files for ``WanVAEDecoder.from_pretrained(path)``:
- Wan's original ``Wan2.1_VAE.pth`` (keys converted by diffusers' ``convert_wan_vae_to_diffusers``; the
  architecture is diffusers' default ``AutoencoderKLWan`` config unless ``vae_config`` names a JSON config), or
- Wan2.2's original ``Wan2.2_VAE.pth`` (Wan2.2-TI2V-5B, LongLive 2.0; recognised by its residual
  ``encoder.downsamples.{s}.downsamples.{j}`` keys, renamed by ``wan_key_maps.wan22_vae_original_to_diffusers``;
  the architecture is :data:`WAN22_VAE_CONFIG` unless ``vae_config`` names a JSON config), or
- a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), or a pipeline folder with ``vae/``.

The Wan2.2 VAE (``AutoencoderKLWan(is_residual=True, patch_size=2, ...)``): z_dim 48, 16x spatial (a 2x2 pixel
patchify + 8x) and 4x temporal compression, so 1280x704 video <-> 80x44 latents and ``T = 1 + 4 (F - 1)`` frames;
decoding is causal latent frame by latent frame exactly as for Wan2.1 (1 frame for latent 0, then 4 each).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from kvpo_megatron.conditioning.files import require_path
from kvpo_megatron.conditioning.wan_key_maps import wan22_vae_original_to_diffusers
from kvpo_megatron.dtypes import check_dtype_name, torch_dtype
from kvpo_megatron.errors import ConfigError

logger = logging.getLogger(__name__)

WAN22_VAE_CONFIG: dict = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4,
    latents_mean=[
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891, 0.157,
        -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502, -0.2055,
        -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083,
        -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
    latents_std=[
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165,
        0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917,
        0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06,
        0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744])
"""``AutoencoderKLWan`` kwargs of the Wan2.2 VAE (diffusers ``scripts/convert_wan_to_diffusers.py``:
``vae22_diffusers_config``; the same per-channel mean/std as NVlabs/LongLive ``utils/wan_5b_wrapper.py``
``WanVAEWrapper``; other fields are diffusers' defaults: dim_mult [1, 2, 4, 4], 2 res blocks,
temporal downsampling [False, True, True])."""


@runtime_checkable
class LatentDecoder(Protocol):
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, F, h, w] (normalised) -> frames [B, T, 3, H, W] float in [0, 1]."""
        ...


class DecoderKind(StrEnum):
    PREVIEW = "preview"
    WAN = "wan"


@dataclass(kw_only=True, slots=True)
class DecoderConfig:
    kind: DecoderKind = DecoderKind.PREVIEW
    """preview: fixed linear latent->RGB map (no weights); wan: the Wan2.1 or Wan2.2 VAE (from its files)."""
    latent_channels: int = 16
    """preview: number of latent channels."""
    upsample: int = 1
    """preview: integer nearest-neighbour spatial upsampling factor."""
    seed: int = 0
    """preview: seed of the fixed latent->RGB projection."""
    path: str | None = None
    """wan: Wan2.1_VAE.pth, Wan2.2_VAE.pth or a diffusers AutoencoderKLWan folder."""
    vae_config: str | None = None
    """wan: JSON with AutoencoderKLWan kwargs for an original .pth (default: diffusers' Wan2.1 defaults for
    Wan2.1_VAE.pth, ``WAN22_VAE_CONFIG`` for Wan2.2_VAE.pth)."""
    device: str = "cpu"
    dtype: str = "float32"
    """wan: weight/compute dtype (float32 | bfloat16)."""
    output_device: str = "cpu"
    """Where decoded frames are gathered (each decoded latent frame is moved there at once)."""
    offload: bool = False
    """wan: keep the VAE on CPU between decode calls."""

    def __post_init__(self) -> None:
        try:
            self.kind = DecoderKind(self.kind)
        except ValueError:
            raise ConfigError(f"decoder.kind={self.kind!r}: expected one of {[k.value for k in DecoderKind]}")
        if self.upsample < 1:
            raise ConfigError(f"decoder.upsample={self.upsample}: must be >= 1")
        check_dtype_name(self.dtype, "decoder.dtype")
        if self.kind == DecoderKind.WAN and not self.path:
            raise ConfigError("decoder.path is required for kind='wan' (Wan2.1_VAE.pth or a diffusers folder)")


def _check_latents(latents: torch.Tensor, channels: int | None = None) -> None:
    if latents.ndim != 5:
        raise ConfigError(f"latents must be [B, C, F, h, w], got shape {tuple(latents.shape)}")
    if channels is not None and latents.shape[1] != channels:
        raise ConfigError(f"latents have {latents.shape[1]} channels, the decoder expects {channels}")


class LatentPreviewDecoder:
    """Weight-free decoder: ``sigmoid(W @ z + b)`` per latent pixel with a fixed random ``W [3, C]``.

    ``T = F`` and ``H, W = upsample * (h, w)`` (nearest). Smooth and monotone in the latents, so built-in
    rewards on the frames give a tiny DiT a learnable signal.
    """

    def __init__(self, *, latent_channels: int = 16, upsample: int = 1, seed: int = 0,
                 output_device: str = "cpu") -> None:
        gen = torch.Generator().manual_seed(seed)
        self.latent_channels = latent_channels
        self.upsample = upsample
        self.output_device = torch.device(output_device)
        self.weight = torch.randn(3, latent_channels, generator=gen) / latent_channels**0.5  # [3, C]
        self.bias = torch.zeros(3)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.latent_channels)
        w = self.weight.to(latents.device, torch.float32)
        rgb = torch.einsum("oc,bcfhw->bfohw", w, latents.float()) + self.bias.to(latents.device)[:, None, None]
        frames = torch.sigmoid(rgb)  # [B, F, 3, h, w]
        if self.upsample > 1:
            frames = frames.repeat_interleave(self.upsample, dim=-2).repeat_interleave(self.upsample, dim=-1)
        return frames.to(self.output_device)


def load_wan_vae(path: str | Path, *, vae_config: str | Path | dict | None = None,
                 dtype: torch.dtype = torch.float32):
    """Load ``AutoencoderKLWan`` from Wan's original ``.pth``/``.safetensors`` or a diffusers folder."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    p = require_path(path, "Wan VAE weights", field="decoder.path")
    if p.is_dir():
        folder = p / "vae" if (p / "vae" / "config.json").exists() else p
        if not (folder / "config.json").exists():
            raise ConfigError(f"Wan VAE folder {p} has no config.json (diffusers layout); pass Wan2.1_VAE.pth instead")
        return AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype).eval().requires_grad_(False)
    if isinstance(vae_config, (str, Path)):
        cfg_path = require_path(vae_config, "Wan VAE config JSON", field="decoder.vae_config")
        vae_config = json.loads(cfg_path.read_text())
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not any(k.startswith("decoder.") for k in state):
        raise ConfigError(f"{p}: not a Wan VAE state dict (no 'decoder.*' keys)")
    wan22 = any(re.match(r"encoder\.downsamples\.\d+\.downsamples\.", k) for k in state)
    if wan22:
        state, default = wan22_vae_original_to_diffusers(state, source=str(p)), "Wan2.2 config"
        vae_config = vae_config or WAN22_VAE_CONFIG
    else:
        state, default = convert_wan_vae_to_diffusers(state), "default Wan2.1 config"
    with torch.device("meta"):  # no random init: every parameter comes from the file (checked below)
        model = AutoencoderKLWan(**(vae_config or {}))
    what = (f"{p}: Wan VAE weights do not match AutoencoderKLWan"
            f"({default if vae_config in (None, WAN22_VAE_CONFIG) else vae_config})")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatch
        raise ConfigError(f"{what}: {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}; "
                          f"set decoder.vae_config for a non-default architecture") from None
    if missing or unexpected:
        raise ConfigError(f"{what}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                          f"unexpected {unexpected[:8]}")
    return model.to(dtype=dtype).eval().requires_grad_(False)  # the file's dtype -> the requested one


class WanVAEDecoder:
    """Wan VAE decoder (Wan2.1 or Wan2.2): de-normalise, then decode causally one latent frame at a time per video.

    Memory stays bounded for long videos: the causal conv cache holds a few frames, and every decoded chunk
    (1 video frame for latent 0, 4 for each later latent) is moved to ``output_device`` at once.
    ``T = 1 + 4 (F - 1)`` for both; ``H, W = 8 h, 8 w`` (Wan2.1) or ``16 h, 16 w`` (Wan2.2, after unpatchify).
    """

    def __init__(self, vae, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 output_device: str = "cpu", offload: bool = False) -> None:
        self.vae = vae
        self.device = torch.device(device)
        self.dtype = dtype
        self.output_device = torch.device(output_device)
        self.offload = offload
        cfg = vae.config
        self.latent_channels = int(cfg.z_dim)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if self.mean.shape[1] != self.latent_channels or self.std.shape[1] != self.latent_channels:
            raise ConfigError(f"Wan VAE config: latents_mean/latents_std have {self.mean.shape[1]}/"
                              f"{self.std.shape[1]} entries for z_dim={self.latent_channels}")
        self.vae.to(device=self.device if not offload else "cpu")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, vae_config=None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, output_device: str = "cpu",
                        offload: bool = False) -> "WanVAEDecoder":
        vae = load_wan_vae(path, vae_config=vae_config, dtype=dtype)
        logger.info("loaded Wan VAE from %s (z_dim %d)", path, vae.config.z_dim)
        return cls(vae, device=device, dtype=dtype, output_device=output_device, offload=offload)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latents -> raw VAE latents: ``z * std + mean`` per channel."""
        return latents.float() * self.std.to(latents.device) + self.mean.to(latents.device)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> DiT latents: ``(z - mean) / std`` per channel."""
        return (z.float() - self.mean.to(z.device)) / self.std.to(z.device)

    @torch.no_grad()
    def iter_decode(self, latents: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(video_index, frames [t, 3, H, W] in [0, 1])`` chunk by chunk, causally, video by video."""
        _check_latents(latents, self.latent_channels)
        vae = self.vae.to(device=self.device)
        try:
            for b in range(latents.shape[0]):
                z = self.denormalize(latents[b : b + 1].to(self.device)).to(self.dtype)  # [1, C, F, h, w]
                vae.clear_cache()
                for i in range(z.shape[2]):
                    vae._conv_idx = [0]
                    x = vae.post_quant_conv(z[:, :, i : i + 1])
                    out = vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(i == 0))
                    if vae.config.patch_size is not None:
                        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                        out = unpatchify(out, patch_size=vae.config.patch_size)
                    frames = (out.float().clamp(-1.0, 1.0) + 1.0) / 2.0  # [1, 3, t, H, W]
                    yield b, frames[0].permute(1, 0, 2, 3).to(self.output_device)
                vae.clear_cache()
        finally:
            if self.offload:
                vae.to(device="cpu")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        videos: list[list[torch.Tensor]] = [[] for _ in range(latents.shape[0])]
        for b, chunk in self.iter_decode(latents):
            videos[b].append(chunk)
        return torch.stack([torch.cat(v) for v in videos])  # [B, T, 3, H, W]

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, T, 3, H, W] in [0, 1] -> normalised DiT latents [B, C, F, h, w] (posterior mode)."""
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ConfigError(f"frames must be [B, T, 3, H, W], got shape {tuple(frames.shape)}")
        vae = self.vae.to(device=self.device)
        try:
            x = frames.to(self.device, self.dtype).permute(0, 2, 1, 3, 4) * 2.0 - 1.0
            z = torch.cat([vae.encode(x[b : b + 1]).latent_dist.mode() for b in range(x.shape[0])])
        finally:
            if self.offload:
                vae.to(device="cpu")
        return self.normalize(z).to(self.output_device)


def build_decoder(cfg: DecoderConfig) -> LatentDecoder:
    if cfg.kind == DecoderKind.PREVIEW:
        return LatentPreviewDecoder(latent_channels=cfg.latent_channels, upsample=cfg.upsample, seed=cfg.seed,
                                    output_device=cfg.output_device)
    dec = WanVAEDecoder.from_pretrained(cfg.path, vae_config=cfg.vae_config, device=cfg.device,
                                        dtype=torch_dtype(cfg.dtype),
                                        output_device=cfg.output_device, offload=cfg.offload)
    if dec.latent_channels != cfg.latent_channels:
        raise ConfigError(f"decoder.latent_channels={cfg.latent_channels} but the Wan VAE at {cfg.path} has "
                          f"z_dim={dec.latent_channels}")
    return dec
