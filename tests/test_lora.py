"""LoRA on the megatron linears: TP=2 == TP=1 (forward, grads, init), parity with peft's own LoRA on
diffusers' Wan, reference policy = adapters disabled (no copy), merge/unmerge, peft-format save/load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kvpo_megatron.checkpoint.mappings import convert_state_dict, rename
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.lora import (LoRAConfig, adapters_disabled, apply_lora, load_adapter,
                                load_lora_full_state_dict, lora_full_state_dict, lora_layers, lora_parameters,
                                merge_lora, save_adapter, unmerge_lora)
from kvpo_megatron.lora_tensors import base_name
from tests.dist_utils import run_workers
from tests.helpers import tiny_diffusers, tiny_full_state_dict, tiny_model

CFG = LoRAConfig(rank=4, alpha=8.0)


def _inputs():
    g = torch.Generator().manual_seed(123)
    x, ctx = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    return x, torch.tensor([937.5, 250.0]), ctx, torch.randn(2, 4, 3, 8, 8, generator=g)


def _random_lora(shapes: dict[str, torch.Tensor], seed: int = 7) -> dict[str, torch.Tensor]:
    """Full random LoRA weights (nonzero B) for the keys/shapes of ``shapes``; identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in sorted(shapes.items())}


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> bool:
    """max |got - want| <= tol, relative to max |want| where that exceeds 1 (large summed-loss grads)."""
    return (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def _fwd_bwd(model, x, t, ctx, w):
    out = model(x, t, text=model.encode_text(ctx))
    (out * w).sum().backward()
    return out.detach()


def _lora_model(pgs, cfg=CFG, **kw):
    model = tiny_model(pgs, **kw)
    return apply_lora(model, cfg)


# ---- (1) TP=2 == TP=1 ------------------------------------------------------------------------------
def _tp_worker(rank, world, out_dir, base_sd):
    from kvpo_megatron.parallel.state import ParallelConfig, init_parallel

    pgs = init_parallel(ParallelConfig(tensor_model_parallel_size=world))
    model = _lora_model(pgs, sd=base_sd)  # base weights passed in: the workers skip importing diffusers
    init = lora_full_state_dict(model)
    for name, layer in lora_layers(model):  # the sharded half holds 1/tp of its partition dim
        half = "lora_A" if name.endswith(("o", "ffn_fc2")) else "lora_B"
        assert layer.sharded_half == half, name
        w = getattr(layer, half)["default"].weight
        assert w.tensor_model_parallel and w.partition_dim == layer.partition_dim
        assert w.shape[layer.partition_dim] * world == init[f"{name}.{half}.weight"].shape[layer.partition_dim]
    sd = _random_lora(init)
    load_lora_full_state_dict(model, sd, source_name="tp2 test")
    out = _fwd_bwd(model, *_inputs())
    grads = lora_full_state_dict(model, grad=True)
    with torch.no_grad():
        merge_lora(model)
        merged = model(*_inputs()[:2], text=model.encode_text(_inputs()[2]))
        unmerge_lora(model)
    save_adapter(model, CFG, f"{out_dir}/adapter")
    if rank == 0:
        torch.save(dict(init=init, sd=sd, out=out, grads=grads, merged=merged), f"{out_dir}/tp2.pt")


def test_tp2_equals_tp1_forward_grads_init(pgs, tmp_path):
    run_workers(_tp_worker, 2, str(tmp_path), tiny_full_state_dict())
    tp2 = torch.load(tmp_path / "tp2.pt")
    model = _lora_model(pgs)
    init = lora_full_state_dict(model)
    assert init.keys() == tp2["init"].keys() and len(init) == 2 * 10 * 2
    for k, v in init.items():  # same seeded init whatever the TP size; B starts at zero
        assert torch.equal(v, tp2["init"][k]), k
        assert (v.abs().sum() == 0) == (".lora_B." in k), k
    load_lora_full_state_dict(model, tp2["sd"], source_name="tp1 test")
    out = _fwd_bwd(model, *_inputs())
    grads = lora_full_state_dict(model, grad=True)
    assert (out - tp2["out"]).abs().max().item() <= 1e-5
    assert (tp2["merged"] - tp2["out"]).abs().max().item() <= 1e-5
    for k, g in grads.items():
        assert g.abs().max() > 0, k
        assert _close(g, tp2["grads"][k]), k
    fresh = _lora_model(pgs)  # an adapter saved under TP=2 loads into TP=1 unchanged
    load_adapter(fresh, tmp_path / "adapter")
    assert all(torch.equal(v, tp2["sd"][k]) for k, v in lora_full_state_dict(fresh).items())


# ---- (2) reference: peft's own LoRA on diffusers' WanTransformer3DModel ----------------------------------------
def test_matches_peft_lora_on_diffusers_wan(pgs):
    from peft import LoraConfig, inject_adapter_in_model

    ref = tiny_diffusers()
    model = _lora_model(pgs, sd=convert_state_dict(ref.state_dict(), "diffusers", "ours"), sinusoid_fp64=False)
    x, t, ctx, w = _inputs()
    with torch.no_grad(), adapters_disabled(model):
        base = model(x, t, text=model.encode_text(ctx))
    sd = _random_lora(lora_full_state_dict(model))
    load_lora_full_state_dict(model, sd, source_name="test")
    to_ref = {}  # our module name -> diffusers module name, through the checkpoint name table
    for k in sd:
        mod = k.rsplit(".", 2)[0]
        to_ref[mod] = rename(mod + ".weight", "ours", "diffusers").removesuffix(".weight")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=sorted(set(to_ref.values()))), ref)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            mod, half, _ = k.rsplit(".", 2)
            ref_params[f"{to_ref[mod]}.{half}.default.weight"].copy_(v)
    want = ref(x, t, ctx, return_dict=False)[0]
    (want * w).sum().backward()
    got = _fwd_bwd(model, x, t, ctx, w)
    assert (got - base).abs().max() > 1e-2  # the adapters matter
    assert (got - want.detach()).abs().max().item() <= 1e-5
    for k, g in lora_full_state_dict(model, grad=True).items():
        mod, half, _ = k.rsplit(".", 2)
        assert _close(g, ref_params[f"{to_ref[mod]}.{half}.default.weight"].grad), k


# ---- (3) reference policy, (6) freezing, (4) merge ----------------------------------------------------------
def test_frozen_base_and_adapters_disabled_is_the_base_model(pgs):
    x, t, ctx, w = _inputs()
    model = tiny_model(pgs)
    with torch.no_grad():
        base = model(x, t, text=model.encode_text(ctx))
    n_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, CFG)
    lora = dict(lora_parameters(model))
    assert len(lora) == 40 and all(".lora_A.default." in n or ".lora_B.default." in n for n in lora)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in lora.values()) == n_before
    assert base_name("blocks.1.cross_attn.k.base_layer.weight") == "blocks.1.cross_attn.k.weight"
    with torch.no_grad():
        assert torch.equal(model(x, t, text=model.encode_text(ctx)), base)  # B = 0 at init
    load_lora_full_state_dict(model, _random_lora(lora_full_state_dict(model)), source_name="test")
    ids = [id(p) for p in model.parameters()]
    with torch.no_grad():
        adapted = model(x, t, text=model.encode_text(ctx))
        with adapters_disabled(model) as ref:
            assert ref is model and [id(p) for p in model.parameters()] == ids  # no second copy
            assert torch.equal(model(x, t, text=model.encode_text(ctx)), base)
        assert torch.equal(model(x, t, text=model.encode_text(ctx)), adapted)
    assert (adapted - base).abs().max() > 1e-2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)
    _fwd_bwd(model, x, t, ctx, w)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora.values())
    with pytest.raises(ConfigError, match="already has peft adapters"):
        apply_lora(model, CFG)


def test_merge_unmerge_round_trip(pgs):
    x, t, ctx, _ = _inputs()
    model = _lora_model(pgs)
    load_lora_full_state_dict(model, _random_lora(lora_full_state_dict(model)), source_name="test")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        adapted = model(x, t, text=model.encode_text(ctx))
        with adapters_disabled(model):
            base = model(x, t, text=model.encode_text(ctx))
        merge_lora(model)
        w = model.blocks[0].self_attn.q.base_layer.weight
        assert not torch.equal(w, before["blocks.0.self_attn.q.base_layer.weight"])
        merged = model(x, t, text=model.encode_text(ctx))
        with adapters_disabled(model):  # unmerges inside, merges again on exit
            assert torch.equal(model(x, t, text=model.encode_text(ctx)), base)
        assert torch.equal(model(x, t, text=model.encode_text(ctx)), merged)
    assert (merged - adapted).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        model(x, t, text=model.encode_text(ctx))  # grad-enabled forward on merged weights
    unmerge_lora(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # bitwise inverse
    with torch.no_grad():
        assert torch.equal(model(x, t, text=model.encode_text(ctx)), adapted)
        merge_lora(model, exact=False)
        unmerge_lora(model)
    drift = max((p - before[n]).abs().max().item() for n, p in model.named_parameters())
    assert drift <= 1e-6


# ---- (5) save/load in peft's format ----------------------------------------------------------------------
class _MirrorAttn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))


class _MirrorBlock(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.self_attn, self.cross_attn = _MirrorAttn(d), _MirrorAttn(d)
        self.ffn_fc1, self.ffn_fc2 = nn.Linear(d, f), nn.Linear(f, d)


class _Mirror(nn.Module):
    """Plain torch linears under our module names (what peft's loader sees as 'the base model')."""

    def __init__(self, d, f, n):
        super().__init__()
        self.blocks = nn.ModuleList(_MirrorBlock(d, f) for _ in range(n))


def test_save_load_round_trip_and_peft_loads_our_files(pgs, tmp_path):
    from peft import PeftModel

    model = _lora_model(pgs)
    sd = _random_lora(lora_full_state_dict(model))
    load_lora_full_state_dict(model, sd, source_name="test")
    save_adapter(model, CFG, tmp_path)
    other = _lora_model(pgs, LoRAConfig(rank=4, alpha=8.0, init_seed=1))
    load_adapter(other, tmp_path)
    assert all(torch.equal(v, sd[k]) for k, v in lora_full_state_dict(other).items())

    cfg = model.config
    mirror = _Mirror(cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers)
    base = {base_name(n): p for n, p in model.named_parameters()}
    mirror.load_state_dict({k: base[k] for k in mirror.state_dict()})
    peft_model = PeftModel.from_pretrained(mirror, str(tmp_path))
    peft_params = dict(peft_model.base_model.model.named_parameters())
    g = torch.Generator().manual_seed(3)
    for name, layer in lora_layers(model):
        for half in ("lora_A", "lora_B"):
            assert torch.equal(peft_params[f"{name}.{half}.default.weight"], sd[f"{name}.{half}.weight"])
        x = torch.randn(5, layer.in_features, generator=g)
        with torch.no_grad():
            want = peft_model.base_model.model.get_submodule(name)(x)
            assert (layer(x)[0] - want).abs().max().item() <= 1e-5, name


def test_trainer_adapter_loads_in_diffusers(pgs, tmp_path):
    """The single file the trainer saves beside ``final_adapter/`` (``save_adapter(comfyui_file=...)``): diffusers'
    ``WanPipeline.load_lora_weights`` loads every trained linear and gives this model's output."""
    from diffusers import WanPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    ref = tiny_diffusers()
    model = _lora_model(pgs, sd=convert_state_dict(ref.state_dict(), "diffusers", "ours"), sinusoid_fp64=False)
    sd = _random_lora(lora_full_state_dict(model))
    load_lora_full_state_dict(model, sd, source_name="test")
    save_adapter(model, CFG, tmp_path / "final_adapter", comfyui_file=tmp_path / "final_lora.safetensors")
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=ref)
    pipe.load_lora_weights(str(tmp_path / "final_lora.safetensors"))
    assert sum(isinstance(m, BaseTunerLayer) for m in ref.modules()) == len(list(lora_layers(model))) == 20
    x, t, ctx, _ = _inputs()
    with torch.no_grad():
        want = model(x, t, text=model.encode_text(ctx))
        with adapters_disabled(model):
            assert (want - model(x, t, text=model.encode_text(ctx))).abs().max() > 1e-2  # the adapter matters
        assert (ref(x, t, ctx, return_dict=False)[0] - want).abs().max().item() <= 1e-5


def test_bad_configs_and_state_dicts_name_the_problem(pgs, tmp_path):
    with pytest.raises(ConfigError, match="lora.rank must be a positive integer, got 0"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="lora.target_modules"):
        LoRAConfig(target_modules=("to_q",))
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        lora_full_state_dict(tiny_model(pgs))
    model = _lora_model(pgs)
    sd = lora_full_state_dict(model)
    bad = dict(sd)
    bad.pop("blocks.0.self_attn.q.lora_A.weight")
    bad["blocks.0.self_attn.qq.lora_A.weight"] = torch.zeros(1)
    bad["blocks.1.ffn_fc2.lora_B.weight"] = torch.zeros(32, 4)
    with pytest.raises(ConfigError, match=r"ckpt\.safetensors: missing LoRA keys \['blocks.0.self_attn.q.lora_A"
                                          r".weight'\]; unknown keys .*qq.*; mismatched shapes .*ffn_fc2.*\(32, 4\)"):
        load_lora_full_state_dict(model, bad, source_name="ckpt.safetensors")
    save_adapter(model, CFG, tmp_path)
    with pytest.raises(ConfigError, match="adapter_config.json: LoRA r=4, alpha=8.0 but the model's adapters have r=2"):
        load_adapter(_lora_model(pgs, LoRAConfig(rank=2, alpha=8.0)), tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_adapter(model, tmp_path / "nope")


def test_adapter_on_an_opaque_base_runs_inside_its_eager_call(pgs):
    """A base linear torch.compile cannot trace (the TE spec's linears are ``torch.compiler.disable``d) takes its
    adapter into the same eager call: compiling a caller gives one graph (the caller's own op) instead of an extra
    compiled graph of the adapter's rank-r math after the base call, and outputs and LoRA gradients equal eager
    ones. A traceable base keeps its adapter in the caller's graph."""
    import torch._dynamo

    model = tiny_model(pgs)
    plain = type(model.blocks[0].ffn_fc1)
    opaque = type("OpaqueColumn", (plain,), {"forward": torch.compiler.disable(plain.forward)})
    model.blocks[0].ffn_fc1.__class__ = opaque
    model = apply_lora(model, CFG)
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.normal_(0, 0.2)
    x = torch.randn(2, 5, model.config.hidden_size)
    for layer, is_opaque in ((model.blocks[0].ffn_fc1, True), (model.blocks[1].ffn_fc1, False)):
        assert layer.opaque_base is is_opaque

        def caller(inp, layer=layer):
            return layer(inp)[0] * 2.0

        torch._dynamo.reset()
        report = torch._dynamo.explain(caller)(x)
        assert report.graph_count == 1, (is_opaque, report.graph_count, report.break_reasons)
        if is_opaque:  # the caller's multiply only: no graph of the adapter's math
            assert report.op_count == 1, report.ops_per_graph
        grads = []
        for fn in (caller, torch.compile(caller)):
            layer.zero_grad()
            fn(x).square().sum().backward()
            grads.append(torch.cat([p.grad.flatten() for n, p in layer.named_parameters() if "lora_" in n]))
        assert _close(grads[1], grads[0])
    torch._dynamo.reset()
