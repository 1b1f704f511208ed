"""``tools/convert_checkpoint.py import --from longlive2``: LongLive 2.0 checkpoint layouts (NVlabs/LongLive main)
built here at the ``tiny-wan2.2`` shape, imported, loaded, and exported to diffusers' Wan2.2 format and back.

Layouts (upstream writers): the released merged generator ``model_bf16.pt`` (``scripts/merge_lora_generator.py``:
``{"generator": {"model.<wan key>": bf16}, "checkpoint_format": "longlive_generator_merged_lora", ...}``), a
training checkpoint (``trainer/distillation.py::save``: generator / critic / float32 ``generator_ema`` / ``step``)
and its LoRA file (``{generator_lora: peft keys, critic_lora, step}``); the Wan2.2 ``config.json`` (``ti2v``).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from kvpo_megatron.checkpoint.formats import read_source
from kvpo_megatron.checkpoint.mappings import convert_state_dict, rename
from kvpo_megatron.errors import ConfigError
from tests.cli_utils import load_script
from tests.helpers import random_peft_lora, tiny_wan22_diffusers, with_peft_lora

RANK, ALPHA = 4, 4.0  # LongLive 2.0 trains LoRA with alpha = rank (configs/inference.yaml: 128 / 128)
CONFIG = {"_class_name": "WanModel", "model_type": "ti2v", "dim": 96, "ffn_dim": 448, "num_heads": 6,
          "num_layers": 2, "in_dim": 48, "out_dim": 48, "freq_dim": 32, "text_dim": 32, "text_len": 16,
          "eps": 1e-6}


def _generator(ref, dtype=None) -> dict:
    sd = convert_state_dict(ref.state_dict(), "diffusers", "wan")
    return {"model." + k: (v.clone() if dtype is None else v.to(dtype)) for k, v in sd.items()}


def _ours(pgs, ckpt, lora_cfg=None):
    from kvpo_megatron.checkpoint.loading import checkpoint_model_section, load_model_weights
    from kvpo_megatron.lora import apply_lora
    from kvpo_megatron.model import CausalWanDiT, model_config

    section = checkpoint_model_section(ckpt)
    model = CausalWanDiT(model_config(section.preset, sinusoid_fp64=False, **section.overrides), pg_collection=pgs)
    if lora_cfg is not None:
        apply_lora(model, lora_cfg)
    load_model_weights(model, ckpt)
    return model.eval()


def _err(ref, model, ours: bool = True) -> float:
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 48, 2, 4, 6, generator=g), torch.randn(2, 16, 32, generator=g)
    t = torch.tensor([999.0, 624.0])
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = model(x, t, text=model.encode_text(ctx)) if ours else model(x, t, ctx, return_dict=False)[0]
    return (got - want).abs().max().item()


def _cli(*argv) -> int:
    cli = load_script("tools/convert_checkpoint.py")
    return cli.main([*argv, "--no-progress"] if argv[0] == "import" else list(argv))


def test_release_import_export_round_trip(pgs, tmp_path):
    """model_bf16.pt -> import (bf16 kept) -> our model == diffusers on the same bf16 weights -> export to
    diffusers' Wan2.2 format (loads in WanTransformer3DModel) and to original Wan files (bitwise the release)."""
    from diffusers import WanTransformer3DModel

    ref = tiny_wan22_diffusers(0)
    gen = _generator(ref, torch.bfloat16)
    ref_bf16 = copy.deepcopy(ref)
    with torch.no_grad():
        for p in ref_bf16.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    torch.save({"generator": gen, "checkpoint_format": "longlive_generator_merged_lora",
                "source_generator_ckpt": "gen.pt", "source_lora_ckpt": "lora.pt", "model_name": "Wan2.2-TI2V-5B",
                "dtype": "bfloat16", "merged_lora": True}, tmp_path / "model_bf16.pt")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    assert _cli("import", str(tmp_path / "model_bf16.pt"), "--from", "longlive2", "--config",
                str(tmp_path / "config.json"), "--out", str(tmp_path / "imp")) == 0
    info = json.loads((tmp_path / "imp" / "kvpo_checkpoint.json").read_text())
    assert info["model"] == {"preset": "tiny-wan2.2", "overrides": {}} and info["dtype"] == "bfloat16"
    assert info["source"]["format"] == "longlive2"
    assert _err(ref_bf16, _ours(pgs, tmp_path / "imp")) <= 1e-5
    assert _err(ref, _ours(pgs, tmp_path / "imp")) > 1e-4  # the bf16 weights really are what was loaded

    assert _cli("export", str(tmp_path / "imp"), str(tmp_path / "diffusers"), "--to", "diffusers",
                "--dtype", "fp32") == 0
    cfg = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert (cfg["in_channels"], cfg["out_channels"], cfg["num_attention_heads"], cfg["attention_head_dim"]) == \
        (48, 48, 6, 16)
    assert _err(ref_bf16, WanTransformer3DModel.from_pretrained(tmp_path / "diffusers").eval(), ours=False) <= 1e-5

    assert _cli("export", str(tmp_path / "imp"), str(tmp_path / "wan"), "--to", "wan") == 0
    back = read_source("wan", tmp_path / "wan")
    assert {rename(k, "ours", "wan") for k in back.tensors} == {k.removeprefix("model.") for k in gen}
    assert all(torch.equal(back.tensors[rename(k.removeprefix("model."), "wan", "ours")].load(), v)
               for k, v in gen.items())
    wan_cfg = json.loads((tmp_path / "wan" / "config.json").read_text())
    assert {k: wan_cfg[k] for k in CONFIG if k != "_class_name"} == {k: v for k, v in CONFIG.items()
                                                                      if k != "_class_name"}
    # the exported Wan2.2 directory imports again as the same model (its config.json says ti2v)
    assert read_source("wan", tmp_path / "wan").section == {"preset": "tiny-wan2.2", "overrides": {}}


def test_training_checkpoint_ema_and_lora(pgs, tmp_path):
    """A training checkpoint: --use-ema takes the float32 EMA shadow; --lora gives the peft LoRA, which our
    adapted model reproduces (== peft on diffusers) and --merge-lora exports to diffusers."""
    from diffusers import WanTransformer3DModel

    from kvpo_megatron.checkpoint.convert import export_checkpoint
    from kvpo_megatron.checkpoint.loading import checkpoint_lora_config

    base, ema = tiny_wan22_diffusers(0), tiny_wan22_diffusers(1)
    torch.save({"generator": _generator(base), "critic": {"model.x": torch.zeros(2)}, "generator_ema": _generator(ema),
                "generator_optimizer": {"state": {}}, "step": 300}, tmp_path / "model.pt")
    lora = random_peft_lora(448, rank=RANK, seed=7)  # every linear of both blocks (the tiny Wan2.2: ffn 448)
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 300}, tmp_path / "lora.pt")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    common = ("--from", "longlive2", "--config", str(tmp_path / "config.json"))
    assert _cli("import", str(tmp_path / "model.pt"), *common, "--out", str(tmp_path / "gen")) == 0
    assert _cli("import", str(tmp_path / "model.pt"), *common, "--use-ema", "--lora", str(tmp_path / "lora.pt"),
                "--out", str(tmp_path / "ema_lora")) == 0
    assert _err(base, _ours(pgs, tmp_path / "gen")) <= 1e-5
    lcfg = checkpoint_lora_config(tmp_path / "ema_lora")
    assert (lcfg.rank, lcfg.alpha, len(lcfg.target_modules)) == (RANK, ALPHA, 6)
    peft_ref = with_peft_lora(ema, lora, rank=RANK, alpha=ALPHA)
    assert _err(ema, peft_ref, ours=False) > 1e-3  # the LoRA changes the output
    assert _err(peft_ref, _ours(pgs, tmp_path / "ema_lora")) <= 1e-5  # merged into a plain model
    assert _err(peft_ref, _ours(pgs, tmp_path / "ema_lora", lcfg)) <= 1e-5  # as a trainable adapter
    export_checkpoint(tmp_path / "ema_lora", tmp_path / "merged", to="diffusers", merge_lora=True, progress=False)
    assert _err(peft_ref, WanTransformer3DModel.from_pretrained(tmp_path / "merged").eval(), ours=False) <= 1e-5


def test_nvfp4_release_and_wrong_inputs_are_refused(tmp_path, capsys):
    ref = tiny_wan22_diffusers(0)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    quantized = {"model.blocks.0.self_attn.q.quantized_weight_values": torch.zeros(4, dtype=torch.uint8)}
    torch.save({"generator": quantized, "checkpoint_format": "longlive_generator_nvfp4"}, tmp_path / "model_4o6.pt")
    torch.save({"generator": _generator(ref), "checkpoint_format": "longlive_generator_te_nvfp4"},
               tmp_path / "model_te.pt")
    for name in ("model_4o6.pt", "model_te.pt"):
        with pytest.raises(ConfigError, match="NVFP4-quantized LongLive 2.0 checkpoint .* import the bf16 release"):
            read_source("longlive2", tmp_path / name)
    # a release has no EMA: --use-ema names what the file holds
    torch.save({"generator": _generator(ref), "checkpoint_format": "longlive_generator_merged_lora"},
               tmp_path / "model_bf16.pt")
    with pytest.raises(ConfigError, match="expected a dict with 'generator_ema'"):
        read_source("longlive2", tmp_path / "model_bf16.pt", use_ema=True)
    # the 1.3B LongLive layout read as Wan2.2 shapes: one line naming the mismatch, exit 2, nothing written
    code = _cli("import", str(tmp_path / "model_bf16.pt"), "--from", "longlive2", "--config",
                str(tmp_path / "config.json"), "--out", str(tmp_path / "out"), "--tp", "4")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "num_attention_heads of " in err and \
        "model_bf16.pt (6) is not divisible by --tp (4)" in err
    assert not (tmp_path / "out").exists()
    code = _cli("import", str(tmp_path / "model_te.pt"), "--from", "longlive2", "--out", str(tmp_path / "out"))
    assert code == 2 and "NVFP4" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_release_shapes_without_config_select_the_5b_preset():
    """The released file carries no config.json: its shapes (hidden 3072, 48 channels) select wan2.2-5b."""
    from kvpo_megatron.checkpoint.architecture import arch_to_section, heads_from_presets, infer_arch
    from kvpo_megatron.model import CausalWanDiT, model_config

    with torch.device("meta"):
        model = CausalWanDiT(model_config("wan2.2-5b", perform_initialization=False))
    arch = infer_arch({n: tuple(p.shape) for n, p in model.named_parameters()}, source_name="model_bf16.pt")
    arch["num_attention_heads"] = heads_from_presets(arch, source_name="model_bf16.pt")
    assert arch_to_section(arch) == {"preset": "wan2.2-5b", "overrides": {}}
