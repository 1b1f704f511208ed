"""Declarative key tables between Wan2.1's original checkpoints and the transformers/diffusers layouts.

umT5 (``models_t5_umt5-xxl-enc-bf16.pth``, Wan's ``T5Encoder`` with ``shared_pos=False``) <-> transformers
``UMT5EncoderModel``. Wan's FFN is ``fc2(fc1(x) * gelu_tanh(gate(x)))``, HF's is ``wo(gelu_new(wi_0(x)) * wi_1(x))``,
so ``gate.0 -> wi_0`` and ``fc1 -> wi_1``.

Wan VAE (``Wan2.1_VAE.pth``) -> diffusers ``AutoencoderKLWan`` is diffusers' own
``convert_wan_vae_to_diffusers`` (the function ``from_single_file`` uses); this module adds the inverse,
which exports a diffusers VAE in the original layout (used by the tests to build original-format files).
The Wan2.2 VAE (``Wan2.2_VAE.pth``, residual blocks) has no converter in installed diffusers: both directions are
here (``wan22_vae_original_to_diffusers`` / ``wan22_vae_diffusers_to_original``).
"""
from __future__ import annotations

import re

import torch

from kvpo_megatron.checkpoint.mappings import NameTable
from kvpo_megatron.errors import ConfigError

# (Wan original, HF UMT5EncoderModel); {n} is the block index. Both directions come from these rows.
_UMT5_ROWS = [
    ("token_embedding.weight", "shared.weight"),
    ("blocks.{n}.norm1.weight", "encoder.block.{n}.layer.0.layer_norm.weight"),
    *[(f"blocks.{{n}}.attn.{x}.weight", f"encoder.block.{{n}}.layer.0.SelfAttention.{x}.weight") for x in "qkvo"],
    ("blocks.{n}.pos_embedding.embedding.weight",
     "encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.{n}.norm2.weight", "encoder.block.{n}.layer.1.layer_norm.weight"),
    ("blocks.{n}.ffn.gate.0.weight", "encoder.block.{n}.layer.1.DenseReluDense.wi_0.weight"),
    ("blocks.{n}.ffn.fc1.weight", "encoder.block.{n}.layer.1.DenseReluDense.wi_1.weight"),
    ("blocks.{n}.ffn.fc2.weight", "encoder.block.{n}.layer.1.DenseReluDense.wo.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
]
UMT5_NAMES = NameTable(_UMT5_ROWS, ("wan", "hf"))
_TIED_EMBEDDING = "encoder.embed_tokens.weight"


def _rename(state: dict[str, torch.Tensor], src: str, dst: str, *, source: str,
            skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in skip:
            continue
        new = UMT5_NAMES.rename(key, src, dst)
        if new is None:
            raise ConfigError(f"{source}: unexpected key {key!r} (not in the umT5 key table)")
        out[new] = value
    return out


def umt5_wan_to_hf(state: dict[str, torch.Tensor], *, source: str = "umT5 checkpoint") -> dict[str, torch.Tensor]:
    """Rename a Wan ``T5Encoder`` state dict to ``UMT5EncoderModel`` keys (embedding tied to encoder.embed_tokens)."""
    out = _rename(state, "wan", "hf", source=source)
    if "shared.weight" not in out:
        raise ConfigError(f"{source}: no 'token_embedding.weight'; is this Wan's umT5 encoder checkpoint?")
    out[_TIED_EMBEDDING] = out["shared.weight"]
    return out


def umt5_hf_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`umt5_wan_to_hf` (drops the tied ``encoder.embed_tokens.weight``)."""
    return _rename(state, "hf", "wan", source="UMT5EncoderModel", skip=(_TIED_EMBEDDING,))


def umt5_config_from_wan(state: dict[str, torch.Tensor]) -> dict[str, int | float | str]:
    """Infer UMT5Config kwargs from a Wan umT5 state dict (umT5-XXL: 256384 vocab, 4096 dim, 24 layers, 64 heads)."""
    vocab, d_model = state["token_embedding.weight"].shape
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    dim_attn = state["blocks.0.attn.q.weight"].shape[0]
    return dict(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(dim_attn // heads),
        d_ff=int(state["blocks.0.ffn.fc1.weight"].shape[0]),
        num_layers=len(layers),
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------- Wan VAE: diffusers -> original
_RES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
        "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _res_suffix(rest: str) -> str:
    for new, old in _RES.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    raise ConfigError(f"AutoencoderKLWan: unexpected residual key suffix {rest!r}")


def wan_vae_diffusers_to_original(state: dict[str, torch.Tensor], *,
                                  num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Export ``AutoencoderKLWan`` weights in the original ``Wan2.1_VAE.pth`` layout (inverse of diffusers' map)."""
    out: dict[str, torch.Tensor] = {}
    fixed = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
             "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.gamma": "encoder.head.0.gamma",
             "decoder.norm_out.gamma": "decoder.head.0.gamma", "encoder.conv_out.": "encoder.head.2.",
             "decoder.conv_out.": "decoder.head.2."}
    per_up = num_res_blocks + 2  # (num_res_blocks + 1) residual blocks and one resample per decoder stage
    for key, value in state.items():
        new = None
        for prefix, old in fixed.items():
            if key.startswith(prefix):
                new = old + key[len(prefix):]
                break
        if new is None and (m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", key)):
            new = f"{m.group(1)}.middle.{2 * int(m.group(2))}.{_res_suffix(m.group(3))}"
        elif new is None and (m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", key)):
            new = f"{m.group(1)}.middle.1.{m.group(2)}"
        elif new is None and (m := re.match(r"^encoder\.down_blocks\.(\d+)\.(.+)$", key)):
            rest = m.group(2)
            is_res = not (rest.startswith("resample") or rest.startswith("time_conv"))
            new = f"encoder.downsamples.{m.group(1)}.{_res_suffix(rest) if is_res else rest}"
        elif new is None and (m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key)):
            new = f"decoder.upsamples.{int(m.group(1)) * per_up + int(m.group(2))}.{_res_suffix(m.group(3))}"
        elif new is None and (m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key)):
            new = f"decoder.upsamples.{int(m.group(1)) * per_up + num_res_blocks + 1}.{m.group(2)}"
        if new is None:
            raise ConfigError(f"AutoencoderKLWan: no original-layout name for key {key!r}")
        out[new] = value
    return out


# ---------------------------------------------------------------- Wan2.2 VAE: original <-> diffusers
# ``Wan2.2_VAE.pth`` (Wan-Video/Wan2.2 ``wan/modules/vae2_2.py``: residual down/up blocks, z_dim 48, patch 2) ->
# ``AutoencoderKLWan(is_residual=True, ...)``. Installed diffusers has no function for it (its
# ``scripts/convert_wan_to_diffusers.py::convert_vae_22`` is not shipped), so these rows are the rule: one
# (original, diffusers) regex template pair per family; ``{s}`` a stage, ``{j}`` a block in it, ``{r}`` the rest.
_WAN22_VAE_ROWS = [
    ("conv1.{r}", "quant_conv.{r}"),
    ("conv2.{r}", "post_quant_conv.{r}"),
    ("{e}.conv1.{r}", "{e}.conv_in.{r}"),
    ("{e}.head.0.gamma", "{e}.norm_out.gamma"),
    ("{e}.head.2.{r}", "{e}.conv_out.{r}"),
    ("{e}.middle.0.{res}", "{e}.mid_block.resnets.0.{res}"),
    ("{e}.middle.2.{res}", "{e}.mid_block.resnets.1.{res}"),
    ("{e}.middle.1.{r}", "{e}.mid_block.attentions.0.{r}"),
    ("encoder.downsamples.{s}.downsamples.{j}.{res}", "encoder.down_blocks.{s}.resnets.{j}.{res}"),
    ("encoder.downsamples.{s}.downsamples.{j}.{rs}", "encoder.down_blocks.{s}.downsampler.{rs}"),
    ("decoder.upsamples.{s}.upsamples.{j}.{res}", "decoder.up_blocks.{s}.resnets.{j}.{res}"),
    ("decoder.upsamples.{s}.upsamples.{j}.{rs}", "decoder.up_blocks.{s}.upsampler.{rs}"),
]
_RES_ROWS = [("residual.0.gamma", "norm1.gamma"), ("residual.2.{p}", "conv1.{p}"), ("residual.3.gamma", "norm2.gamma"),
             ("residual.6.{p}", "conv2.{p}"), ("shortcut.{p}", "conv_shortcut.{p}")]
_GROUPS = {"e": r"(?P<e>encoder|decoder)", "s": r"(?P<s>\d+)", "j": r"(?P<j>\d+)", "r": r"(?P<r>.+)",
           "p": r"(?P<p>weight|bias)", "rs": r"(?P<rs>(?:resample|time_conv)\..+)"}


def _expand_rows() -> list[tuple[str, str]]:
    rows = []
    for orig, diff in _WAN22_VAE_ROWS:
        if "{res}" in orig:
            rows += [(orig.replace("{res}", a), diff.replace("{res}", b)) for a, b in _RES_ROWS]
        else:
            rows.append((orig, diff))
    return rows


def _template_regex(template: str) -> re.Pattern:
    rx = re.escape(template)
    for name, group in _GROUPS.items():
        rx = rx.replace(re.escape("{" + name + "}"), group, 1).replace(re.escape("{" + name + "}"), f"(?P={name})")
    return re.compile(rx + "$")


_WAN22_ROWS = [(_template_regex(o), o, _template_regex(d), d) for o, d in _expand_rows()]


def _fill(template: str, groups: dict) -> str:
    for name, value in groups.items():
        template = template.replace("{" + name + "}", value)
    return template


def _wan22_rename(state: dict[str, torch.Tensor], to_diffusers: bool, source: str,
                  stage_blocks: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for o_rx, o_t, d_rx, d_t in _WAN22_ROWS:
            m = (o_rx if to_diffusers else d_rx).match(key)
            if m:
                groups = {k: v for k, v in m.groupdict().items() if v is not None}
                if not to_diffusers and "rs" in groups:  # the resample is the stage's last module
                    groups["j"] = str(stage_blocks[f"{key.split('.')[0]}.{groups['s']}"])
                out[_fill(d_t if to_diffusers else o_t, groups)] = value
                break
        else:
            raise ConfigError(f"{source}: unexpected key {key!r} (not a Wan2.2 VAE key)")
    return out


def wan22_vae_original_to_diffusers(state: dict[str, torch.Tensor], *,
                                    source: str = "Wan2.2 VAE checkpoint") -> dict[str, torch.Tensor]:
    """Rename ``Wan2.2_VAE.pth`` keys to ``AutoencoderKLWan(is_residual=True)`` keys."""
    return _wan22_rename(state, True, source)


def wan22_vae_diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`wan22_vae_original_to_diffusers` (tests build original-layout files with it)."""
    blocks: dict[str, int] = {}
    for key in state:  # a stage's resample follows its residual blocks: index = number of residual blocks
        if m := re.match(r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.resnets\.(\d+)\.", key):
            stage = f"{m.group(1).split('.')[0]}.{m.group(2)}"
            blocks[stage] = max(blocks.get(stage, 0), int(m.group(3)) + 1)
    return _wan22_rename(state, False, "AutoencoderKLWan", blocks)
