"""``CausalWanDiT``: Wan2.1 as a block-causal streaming video DiT.

The model maps (latents, timesteps, prompt K/V) to flow-matching velocities. It runs in two modes:

* full sequence: ``cache=None``; bidirectional, or block-causal with ``attn_mask=block_causal_mask(...)``;
* streaming: ``cache`` + ``view`` (see ``model/kv_cache.py``): the input block attends to the view's cached
  frames and itself; a commit pass (``view.write_frames``) stores its K/V and may skip the head.

It knows nothing about KVPO or process groups: TP/CP are chosen by its spec (``model/specs.py``).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import build_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model.attention import TextKV
from kvpo_megatron.model.config import WanConfig
from kvpo_megatron.model.embeddings import (Head, patch_embedding, sinusoidal_embedding, text_embedding,
                                           time_embedding, time_projection, unpatchify)
from kvpo_megatron.model.kv_cache import AttentionView, KVCache
from kvpo_megatron.model.rope import Rope3D
from kvpo_megatron.model.specs import CausalWanSubmodules, local_spec


def block_causal_mask(num_frames: int, tokens_per_frame: int, frames_per_block: int, device=None) -> torch.Tensor:
    """Boolean [L, L] mask (True = attend): a token sees every token of its own and earlier blocks."""
    block = torch.arange(num_frames, device=device) // frames_per_block
    block = block.repeat_interleave(tokens_per_frame)
    return block[:, None] >= block[None, :]


class CausalWanDiT(nn.Module):
    def __init__(self, config: WanConfig, submodules: CausalWanSubmodules | None = None, pg_collection=None):
        super().__init__()
        submodules = submodules or local_spec()
        self.config = config
        self.pg_collection = pg_collection
        # Names follow the original Wan2.1 checkpoints (see checkpoint/mappings.py).
        self.patch_embedding = patch_embedding(config)
        self.text_embedding = text_embedding(config)
        self.time_embedding = time_embedding(config)
        self.time_projection = time_projection(config)
        self.rope = Rope3D(config.head_dim, config.rope_max_positions, config.rope_theta)
        self.blocks = nn.ModuleList([build_module(submodules.block, config=config, layer_number=i,
                                                  pg_collection=pg_collection) for i in range(config.num_layers)])
        self.head = Head(config)
        self.token_sharder = build_module(submodules.token_sharder, pg_collection=pg_collection)
        self.recompute_blocks = False
        """Recompute each block's activations in the backward (activation checkpointing) instead of keeping them;
        forwards that write the KV cache never recompute."""
        if config.params_dtype != torch.float32:  # megatron's linears already are; the plain modules follow
            self.to(config.params_dtype)  # (norms, modulation and RoPE still compute in fp32 internally)

    # ---- prompts -----------------------------------------------------------------------------
    def encode_text(self, context: torch.Tensor, lengths: torch.Tensor | None = None) -> TextKV:
        """Project a prompt ([b, Lt, text_dim], zero-padded) into every layer's cross-attention K/V, once.

        ``lengths`` [b]: real tokens per prompt (the text encoders return them). Without it the padding is read
        off the zero rows of ``context`` (encoders zero every position at and beyond the length). The result's
        ``mask`` only matters to MemFlow's bank scores; cross-attention attends every position either way.
        """
        if context.dim() != 3 or context.shape[-1] != self.config.text_dim:
            raise ConfigError(f"text context must be [batch, tokens, {self.config.text_dim}], "
                              f"got {tuple(context.shape)}")
        if lengths is None:
            mask = context.detach().abs().amax(-1) > 0
        else:
            if lengths.shape != context.shape[:1]:
                raise ConfigError(f"text lengths must be [batch] = [{context.shape[0]}], got {tuple(lengths.shape)}")
            mask = torch.arange(context.shape[1], device=context.device)[None] < lengths.to(context.device)[:, None]
        c = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return TextKV(layers=[blk.cross_attn.project_text(c) for blk in self.blocks], mask=mask)

    def embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [b, F] -> e [b, F, dim] (head) and e0 [b, F, 6, dim] (blocks), both float32.

        Computed one sample at a time: these matmuls have a handful of rows, where BLAS rounds differently for
        different row counts, and a sample must get the same result alone or in a batch (KVPO's batched branches
        equal plain generation)."""
        dtype = self.time_embedding[0].weight.dtype
        sin = sinusoidal_embedding(timestep, self.config.freq_dim, self.config.sinusoid_fp64).to(dtype)
        e = torch.cat([self.time_embedding(row) for row in sin.split(1)]).float()
        e0 = torch.cat([self.time_projection(row) for row in e.to(dtype).split(1)]).float().unflatten(-1, (6, -1))
        return e, e0

    # ---- forward -----------------------------------------------------------------------------
    def check_latents(self, x: torch.Tensor) -> tuple[int, int, int]:
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ConfigError(f"latents must be [batch, {cfg.in_channels}, frames, height, width], "
                              f"got {tuple(x.shape)}")
        _, _, f, h, w = x.shape
        if f % pt or h % ph or w % pw:
            raise ConfigError(f"latent shape (frames={f}, height={h}, width={w}) is not divisible by "
                              f"patch_size {cfg.patch_size}")
        return f // pt, h // ph, w // pw

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, *, text: TextKV, frame_offset: int = 0,
                cache: KVCache | None = None, view: AttentionView | None = None,
                attn_mask: torch.Tensor | None = None, compute_output: bool = True) -> torch.Tensor | None:
        """Velocity prediction.

        Args:
            x: latents [b, C, F, H, W] of frames ``frame_offset .. frame_offset+F-1``.
            timestep: [b] or [b, F] in [0, 1000] (per-frame for mixed clean/noisy inputs).
            text: the prompt's ``TextKV`` from :meth:`encode_text`.
            cache, view: streaming mode (both or neither).
            attn_mask: [L, L] boolean mask for full-sequence mode (e.g. :func:`block_causal_mask`).
            compute_output: False for a pure cache-write pass (skips the head; returns None).
        Returns:
            velocity [b, C_out, F, H, W] or None.
        """
        grid = self.check_latents(x)
        if (cache is None) != (view is None):
            raise ValueError("pass both cache and view (streaming) or neither (full sequence)")
        b, nf = x.shape[0], grid[0]
        if timestep.dim() == 1:
            timestep = timestep[:, None].expand(b, nf)
        e, e0 = self.embed_time(timestep)  # [b, F, d], [b, F, 6, d]
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cos, sin = self.rope(frame_offset, *grid)
        tokens, cos, sin = self.token_sharder.shard(tokens, cos, sin, frames=nf)
        recompute = self.recompute_blocks and torch.is_grad_enabled() and (view is None or view.write_slots is None)
        for i, blk in enumerate(self.blocks):
            kv = None if cache is None else cache.layer(i, view)
            if recompute:  # activation recompute: keep only each block's input for the backward
                tokens = checkpoint(blk, tokens, e0=e0, rope=(cos, sin), text_kv=text.layers[i], kv=kv,
                                    attn_mask=attn_mask, use_reentrant=False)
            else:
                tokens = blk(tokens, e0=e0, rope=(cos, sin), text_kv=text.layers[i], kv=kv, attn_mask=attn_mask)
        if not compute_output:
            return None
        tokens = self.token_sharder.gather(tokens, frames=nf)
        out = self.head(tokens.view(b, nf, -1, self.config.hidden_size), e).flatten(1, 2)
        return unpatchify(out, grid, self.config.patch_size, self.config.out_channels)
