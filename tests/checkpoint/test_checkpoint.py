"""Checkpoint import/export (every source format, LoRA), config.json -> architecture (dist and training
checkpoints: ``test_training.py``).

References nobody here wrote: diffusers' ``WanTransformer3DModel`` (loads the sources and the exports; its
forward is the parity target), peft's LoRA layers on it (the LoRA target), huggingface_hub's sharded writer.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvpo_megatron.checkpoint.adapter_formats import read_lora
from kvpo_megatron.checkpoint.convert import ImportSpec, export_checkpoint, export_lora, import_checkpoint
from kvpo_megatron.checkpoint.formats import read_source
from kvpo_megatron.checkpoint.mappings import rename
from kvpo_megatron.errors import ConfigError
from tests.cli_utils import load_script
from tests.helpers import max_output_error, random_peft_lora, tiny_diffusers, wan_state_dict, with_peft_lora

RANK, ALPHA = 4, 8.0
_peft_lora = lambda: random_peft_lora(192, rank=RANK, seed=5)  # noqa: E731  (the tiny model: ffn 192)
WAN_CONFIG = {"_class_name": "WanModel", "model_type": "t2v", "dim": 96, "ffn_dim": 192, "num_heads": 12,
              "num_layers": 2, "in_dim": 4, "out_dim": 4, "freq_dim": 32, "text_dim": 32, "text_len": 16,
              "eps": 1e-6, "patch_size": [1, 2, 2]}


# ------------------------------------------------------------------------------------------ fixtures
def _write_sources(root: Path, ref, ema) -> dict:
    """Every source format on disk; returns {case: (fmt, path, kwargs)}."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    wan = wan_state_dict(ref)
    ref.save_pretrained(root / "diffusers")
    (root / "wan").mkdir()
    (root / "wan" / "config.json").write_text(json.dumps(WAN_CONFIG))
    save_file(wan, str(root / "wan" / "diffusion_pytorch_model.safetensors"))
    (root / "wan_sharded").mkdir()
    (root / "wan_sharded" / "config.json").write_text(json.dumps(WAN_CONFIG))
    save_torch_state_dict(wan, root / "wan_sharded", filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=400_000)
    gen = {"model." + k: v for k, v in wan.items()}
    gen_ema = {"model." + k: v for k, v in wan_state_dict(ema).items()}
    torch.save({"generator": gen, "critic": {"model.x": torch.zeros(3)}}, root / "self_forcing.pt")
    torch.save({"generator": gen_ema, "generator_ema": gen}, root / "longlive.pt")
    torch.save({"model": gen}, root / "memflow_base.pt")
    lora = _peft_lora()
    torch.save({"generator_lora": lora}, root / "longlive_lora.pt")
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 7}, root / "memflow_lora.pt")
    torch.save(lora, root / "memflow_lora_raw.pt")
    return {"diffusers": ("diffusers", root / "diffusers", {}), "wan": ("wan", root / "wan", {}),
            "wan_sharded": ("wan", root / "wan_sharded", {}),
            "self-forcing": ("self-forcing", root / "self_forcing.pt", {}),
            "longlive": ("longlive", root / "longlive.pt", {"use_ema": True}),
            "memflow": ("memflow", root / "memflow_base.pt", {})}


def _ours(pgs, ckpt, lora_cfg=None):
    from kvpo_megatron.checkpoint.loading import load_model_weights
    from kvpo_megatron.lora import apply_lora
    from kvpo_megatron.model import CausalWanDiT, model_config

    model = CausalWanDiT(model_config("tiny", sinusoid_fp64=False), None, pg_collection=pgs)
    if lora_cfg is not None:
        apply_lora(model, lora_cfg)
    load_model_weights(model, ckpt)
    return model.eval()


# ------------------------------------------------------------------------------------------ import / export
def test_import_export_round_trip_every_format(pgs, tmp_path):
    from diffusers import WanTransformer3DModel

    ref, ema = tiny_diffusers(0), tiny_diffusers(1)
    cases = _write_sources(tmp_path, ref, ema)
    for case, (fmt, src, kw) in cases.items():
        out = tmp_path / f"imp_{case}"
        info = import_checkpoint(ImportSpec(fmt=fmt, src=str(src), out=str(out), progress=False, **kw))
        assert info["model"] == {"preset": "tiny", "overrides": {}} and info["parameters"] == 309808, case
        err = max_output_error(ref, _ours(pgs, out), ours=True)
        assert err <= 1e-5, (case, err)
        exp = tmp_path / f"exp_{case}"
        export_checkpoint(out, exp, to="diffusers")
        assert max_output_error(ref, WanTransformer3DModel.from_pretrained(exp).eval(), ours=False) <= 1e-5, case
    # the EMA choice is honoured (longlive.pt's 'generator' holds the other model)
    assert max_output_error(ema, _ours(pgs, tmp_path / "imp_longlive"), ours=True) > 1e-3
    # load_model_weights reads every source with the converter's reader (same EMA choice), sharded safetensors
    # (directory or index file) included, into a model with LoRA injected too
    from kvpo_megatron.checkpoint.loading import load_model_weights
    from kvpo_megatron.lora import LoRAConfig, lora_full_state_dict
    sharded = tmp_path / "wan_sharded" / "diffusion_pytorch_model.safetensors.index.json"
    for case, (fmt, src, kw) in [*cases.items(), ("index", ("wan", sharded, {}))]:
        for lora in (None, LoRAConfig(rank=RANK, alpha=ALPHA)):
            model = _ours(pgs, tmp_path / "imp_wan", lora)
            before = lora_full_state_dict(model) if lora else {}
            load_model_weights(model, src, **kw)
            assert max_output_error(ref, model, ours=True) <= 1e-5, (case, lora)
            assert all(torch.equal(v, lora_full_state_dict(model)[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="expected a dict with 'generator_ema'"):
        load_model_weights(_ours(pgs, tmp_path / "imp_wan"), tmp_path / "memflow_base.pt", use_ema=True)
    # loading the training file directly unwraps it as the converter does: 'generator', or 'generator_ema'
    direct = _ours(pgs, tmp_path / "self_forcing.pt")
    assert max_output_error(ref, direct, ours=True) <= 1e-5
    load_model_weights(direct, tmp_path / "longlive.pt")
    assert max_output_error(ema, direct, ours=True) <= 1e-5
    load_model_weights(direct, tmp_path / "longlive.pt", use_ema=True)
    assert max_output_error(ref, direct, ours=True) <= 1e-5
    # ... also into a model that already has LoRA (base weights under .base_layer.; adapters untouched)
    adapted = _ours(pgs, tmp_path / "memflow_base.pt", LoRAConfig(rank=RANK, alpha=ALPHA))
    before = lora_full_state_dict(adapted)
    assert max_output_error(ref, adapted, ours=True) <= 1e-5  # LoRA B starts at zero
    load_model_weights(adapted, tmp_path / "longlive.pt")
    assert max_output_error(ema, adapted, ours=True) <= 1e-5
    assert all(torch.equal(v, lora_full_state_dict(adapted)[k]) for k, v in before.items())
    # export to original Wan names: the same tensors and config as the source we wrote
    export_checkpoint(tmp_path / "imp_wan_sharded", tmp_path / "wan_export", to="wan", max_shard_bytes=300_000)
    back = read_source("wan", tmp_path / "wan_export")
    assert len(back.files) > 1 and (tmp_path / "wan_export" / "diffusion_pytorch_model.safetensors.index.json").exists()
    wan = wan_state_dict(ref)
    assert {rename(k, "ours", "wan"): t.load() for k, t in back.tensors.items()}.keys() == wan.keys()
    assert all(torch.equal(back.tensors[rename(k, "wan", "ours")].load(), v) for k, v in wan.items())
    cfg = json.loads((tmp_path / "wan_export" / "config.json").read_text())
    assert {k: cfg[k] for k in WAN_CONFIG} == WAN_CONFIG


def test_import_with_lora_matches_peft_and_exports(pgs, tmp_path):
    from diffusers import WanTransformer3DModel

    from kvpo_megatron.checkpoint.loading import checkpoint_lora_config
    from kvpo_megatron.lora import LoRAConfig, load_adapter, lora_full_state_dict

    ref = tiny_diffusers(0)
    _write_sources(tmp_path, ref, ref)
    peft_ref = with_peft_lora(ref, _peft_lora(), rank=RANK, alpha=ALPHA)
    assert max_output_error(ref, peft_ref, ours=False) > 1e-3  # the LoRA changes the output
    for name, base, lora_file in (("longlive", "longlive.pt", "longlive_lora.pt"),
                                  ("memflow", "memflow_base.pt", "memflow_lora.pt"),
                                  ("memflow_raw", "memflow_base.pt", "memflow_lora_raw.pt")):
        out = tmp_path / f"imp_{name}"
        fmt = name.split("_")[0]
        import_checkpoint(ImportSpec(fmt=fmt, src=str(tmp_path / base), out=str(out), lora=str(tmp_path / lora_file),
                                     lora_alpha=ALPHA, use_ema=fmt == "longlive", progress=False))
        lcfg = checkpoint_lora_config(out)
        assert (lcfg.rank, lcfg.alpha, set(lcfg.target_modules)) == (RANK, ALPHA, set(LoRAConfig().target_modules))
        # a plain model gets the LoRA merged; a model with adapters gets it as its (trainable) adapter
        assert max_output_error(peft_ref, _ours(pgs, out), ours=True) <= 1e-5, name
        adapted = _ours(pgs, out, lcfg)
        assert max_output_error(peft_ref, adapted, ours=True) <= 1e-5, name
    lora_ours = lora_full_state_dict(adapted)
    # export merged -> diffusers loads it and matches peft
    export_checkpoint(out, tmp_path / "merged", to="diffusers", merge_lora=True)
    merged_ref = WanTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
    assert max_output_error(peft_ref, merged_ref, ours=False) <= 1e-5
    # --lora-only as a peft adapter our loader reads back bitwise, and with Wan names the LongLive keys
    # (the default ComfyUI/diffusers formats: tests/checkpoint/test_adapter_export.py)
    export_lora(out, tmp_path / "adapter", fmt="peft")
    fresh = _ours(pgs, tmp_path / "imp_memflow", lcfg)
    load_adapter(fresh, tmp_path / "adapter")
    assert all(torch.equal(v, lora_full_state_dict(fresh)[k]) for k, v in lora_ours.items())
    export_lora(out, tmp_path / "adapter_wan", fmt="peft", names="wan")
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "adapter_wan" / "adapter_model.safetensors")).keys() == _peft_lora().keys()
    raw, back = read_lora(tmp_path / "memflow_lora_raw.pt").pairs, read_lora(tmp_path / "adapter_wan").pairs
    assert back.keys() == raw.keys() and all(torch.equal(back[k][i], raw[k][i]) for k in raw for i in (0, 1))


def test_import_at_tp2_loads_at_tp1(pgs, tmp_path):
    ref = tiny_diffusers(0)
    cases = _write_sources(tmp_path, ref, ref)
    out = tmp_path / "imp_tp2"
    import_checkpoint(ImportSpec(fmt="wan", src=str(cases["wan_sharded"][1]), out=str(out), tp=2, progress=False,
                                 lora=str(tmp_path / "longlive_lora.pt"), lora_alpha=ALPHA))
    assert len(list(out.glob("*.distcp"))) == 2 and json.loads((out / "kvpo_checkpoint.json").read_text())["layout"]["tp"] == 2
    peft_ref = with_peft_lora(ref, _peft_lora(), rank=RANK, alpha=ALPHA)
    assert max_output_error(peft_ref, _ours(pgs, out), ours=True) <= 1e-5


def _unchanged(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_bad_inputs_name_the_problem_and_leave_output_untouched(pgs, tmp_path):
    from safetensors.torch import save_file

    ref = tiny_diffusers(0)
    cases = _write_sources(tmp_path, ref, ref)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    before = _unchanged(out)

    def imp(src, fmt="wan", **kw):
        return import_checkpoint(ImportSpec(fmt=fmt, src=str(src), out=str(out), progress=False, **kw))

    with pytest.raises(ConfigError, match="exists; pass --force"):
        imp(cases["wan"][1])
    # unknown, missing and mismatched keys listed together, naming the file
    bad = wan_state_dict(ref)
    bad["blocks.0.extra.weight"] = torch.zeros(2)
    del bad["blocks.1.ffn.2.bias"]
    bad["head.head.weight"] = torch.zeros(8, 96)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(WAN_CONFIG))
    save_file(bad, str(tmp_path / "bad" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ConfigError) as e:
        imp(tmp_path / "bad", force=True)
    msg = str(e.value)
    for part in ("bad/diffusion_pytorch_model.safetensors", "unknown keys (1): ['blocks.0.extra.weight']",
                 "missing keys (1): ['blocks.1.ffn_fc2.bias']", "head.head.weight: checkpoint (8, 96) vs model (16, 96)"):
        assert part in msg, (part, msg)
    # diffusers files read as Wan
    with pytest.raises(ConfigError, match="diffusers/config.json: config field qk_norm='rms_norm_across_heads' is not"):
        imp(cases["diffusers"][1], force=True)
    with pytest.raises(ConfigError, match="safetensors does not match a tiny model with {}: 67 of its 69 keys have no name in the --from format"):
        imp(cases["diffusers"][1] / "diffusion_pytorch_model.safetensors", config=str(cases["wan"][1] / "config.json"),
            force=True)
    with pytest.raises(ConfigError, match="num_attention_heads of .* \\(12\\) is not divisible by --tp \\(5\\)"):
        imp(cases["wan"][1], tp=5, force=True)
    with pytest.raises(ConfigError, match="expected a dict with 'generator_ema'"):
        imp(tmp_path / "self_forcing.pt", fmt="self-forcing", use_ema=True, force=True)
    # a pickle that needs code to load is refused by weights_only=True
    torch.save({"generator": {"model.x": torch.nn.Linear(2, 2)}}, tmp_path / "code.pt")
    with pytest.raises(ConfigError, match="code.pt with torch.load\\(weights_only=True\\)"):
        imp(tmp_path / "code.pt", fmt="self-forcing", force=True)
    lora = _peft_lora()
    lora["base_model.model.blocks.0.self_attn.q.lora_B.weight"] = torch.zeros(50, RANK)
    torch.save(lora, tmp_path / "bad_lora.pt")
    with pytest.raises(ConfigError, match="bad_lora.pt: LoRA does not fit the model: \\['blocks.0.self_attn.q: lora_A"):
        imp(cases["wan"][1], lora=str(tmp_path / "bad_lora.pt"), force=True)
    del lora["base_model.model.blocks.0.self_attn.q.lora_B.weight"]
    torch.save(lora, tmp_path / "bad_lora.pt")
    with pytest.raises(ConfigError, match="bad_lora.pt: .*without both lora_A and lora_B \\['blocks.0.self_attn.q'\\]"):
        imp(cases["wan"][1], lora=str(tmp_path / "bad_lora.pt"), force=True)
    # dry run validates and writes nothing, even with --force
    info = imp(cases["diffusers"][1], fmt="diffusers", dry_run=True, force=True)
    assert info["parameters"] == 309808
    assert _unchanged(out) == before and not list(tmp_path.glob(".out.tmp*"))
    # export refuses to overwrite, and needs a LoRA for --merge-lora / --lora-only
    imp(cases["wan"][1], force=True)
    assert not (out / "keep.txt").exists()
    (tmp_path / "exp").mkdir()
    with pytest.raises(ConfigError, match="exists; pass --force"):
        export_checkpoint(out, tmp_path / "exp", to="diffusers")
    with pytest.raises(ConfigError, match="holds no LoRA"):
        export_checkpoint(out, tmp_path / "exp2", to="diffusers", merge_lora=True)
    with pytest.raises(ConfigError, match="holds no LoRA"):
        export_lora(out, tmp_path / "exp3")
    assert not (tmp_path / "exp2").exists() and not (tmp_path / "exp3").exists()


def test_cli_dry_run_and_error_exit(tmp_path, capsys):
    cli = load_script("tools/convert_checkpoint.py")
    tiny_diffusers(0).save_pretrained(tmp_path / "d")
    assert cli.main(["import", "--from", "diffusers", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert not (tmp_path / "o").exists()
    assert cli.main(["import", "--from", "wan", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


def test_config_json_mapping_selects_presets():
    from kvpo_megatron.checkpoint.architecture import arch_to_section, config_json_to_arch

    wan13 = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960,
             "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16,
             "text_len": 512}
    wan14 = {**wan13, "dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}
    diff13 = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
              "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": None,
              "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
              "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}
    for cfg, fmt, preset in ((wan13, "wan", "wan-1.3b"), (wan14, "wan", "wan-14b"), (diff13, "diffusers", "wan-1.3b")):
        assert arch_to_section(config_json_to_arch(cfg, fmt, source_name="c")) == {"preset": preset, "overrides": {}}
    odd = arch_to_section(config_json_to_arch({**wan13, "num_layers": 4}, "wan", source_name="c"))
    assert odd == {"preset": "wan-1.3b", "overrides": {"num_layers": 4}}
    with pytest.raises(ConfigError, match="c: config field model_type='i2v' is not supported"):
        config_json_to_arch({**wan13, "model_type": "i2v"}, "wan", source_name="c")
    with pytest.raises(ConfigError, match="image_dim=1280 is not supported"):
        config_json_to_arch({**diff13, "image_dim": 1280}, "diffusers", source_name="c")
