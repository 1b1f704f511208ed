"""TE spec vs local spec on the GPU (skipped without CUDA; run on the GPU machine with TransformerEngine).

Model: Wan-1.3B widths (1536 wide, 12 heads x 128) cut to 2 layers, latents 16x32 (128 tokens per frame),
a 15-frame streaming rollout (5 blocks, 4 steps + commit; the window rolls). Errors are ||a - b|| / ||b|| of
the generated latents against the local spec in float32 ("truth"):
* bf16 TE: within 1.5x the local bf16 error + 1e-3, and within 2e-2 of local bf16;
* FP8 (TE linears in FP8 with current scaling, or FP8 fused attention with delayed scaling): within 0.1.
Measured errors are appended as JSON lines to ``$KVPO_GPU_REPORT`` when set.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

BF16_REL_TOL = 2e-2
FP8_REL_TOL = 0.1


def _report(**kw):
    path = os.environ.get("KVPO_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(kw) + "\n")


def _model(pgs, spec_kind: str, sd, dtype, preset: str = "wan-1.3b", **ov):
    from kvpo_megatron.benchmarks.common import cast_model
    from kvpo_megatron.checkpoint.sharding import load_full_state_dict
    from kvpo_megatron.model import CausalWanDiT, model_config
    from kvpo_megatron.model.specs import local_spec

    if spec_kind == "te":
        ov["use_cpu_initialization"] = False  # TE modules initialise on the GPU
    cfg = model_config(preset, num_layers=2, spec=spec_kind, **{k: v for k, v in ov.items() if k != "fp8_linears"})
    if spec_kind == "te":
        from kvpo_megatron.model.te_spec import te_spec
        spec = te_spec(cfg, fp8_linears=ov.get("fp8_linears", ()))
    else:
        spec = local_spec()
    m = CausalWanDiT(cfg, spec, pg_collection=pgs)
    if sd is not None:
        load_full_state_dict(m, sd)
    return cast_model(m.cuda(), dtype).eval()


def _rollout(model, ctx, noise):
    from kvpo_megatron.model import CacheConfig
    from kvpo_megatron.sampling import FlowMatchSampler, SamplerConfig, StreamingGenerator
    from kvpo_megatron.sampling.streaming import PromptSwitch

    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), CacheConfig(history_frames=9))
    with torch.no_grad():
        text = model.encode_text(ctx)
        gen.generate(noise, [PromptSwitch(0, text)])  # warm-up (delayed FP8 scales)
        return gen.generate(noise, [PromptSwitch(0, text)]).float()


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def setup(pgs):
    from kvpo_megatron.checkpoint.sharding import gather_full_state_dict

    torch.manual_seed(0)
    truth_model = _model(pgs, "local", None, torch.float32)
    sd = gather_full_state_dict(truth_model)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 512, 4096, generator=g).cuda()
    noise = torch.randn(1, 16, 15, 16, 32, generator=g).cuda()
    truth = _rollout(truth_model, ctx, noise)
    local_bf16 = _rollout(_model(pgs, "local", sd, torch.bfloat16), ctx, noise)
    return dict(sd=sd, ctx=ctx, noise=noise, truth=truth, local_bf16=local_bf16)


def test_te_bf16_matches_local(pgs, setup):
    te_out = _rollout(_model(pgs, "te", setup["sd"], torch.bfloat16), setup["ctx"], setup["noise"])
    e_te, e_local = _rel(te_out, setup["truth"]), _rel(setup["local_bf16"], setup["truth"])
    e_pair = _rel(te_out, setup["local_bf16"])
    _report(test="te_bf16", err_te_vs_fp32=e_te, err_local_bf16_vs_fp32=e_local, err_te_vs_local_bf16=e_pair)
    assert torch.isfinite(te_out).all()
    assert e_te <= 1.5 * e_local + 1e-3
    assert e_pair <= BF16_REL_TOL


@pytest.mark.parametrize("mode", ["fp8_linears", "fp8_dpa"])
def test_te_fp8_within_tolerance(pgs, setup, mode):
    ov = (dict(fp8="hybrid", fp8_recipe="tensorwise", fp8_linears=("self_attn", "cross_attn", "ffn"))
          if mode == "fp8_linears" else dict(fp8="hybrid", fp8_recipe="delayed", fp8_dot_product_attention=True))
    out = _rollout(_model(pgs, "te", setup["sd"], torch.bfloat16, **ov), setup["ctx"], setup["noise"])
    err = _rel(out, setup["truth"])
    _report(test=mode, err_vs_fp32=err, err_local_bf16_vs_fp32=_rel(setup["local_bf16"], setup["truth"]))
    assert torch.isfinite(out).all()
    assert err <= FP8_REL_TOL


def test_te_bf16_matches_local_longlive2(pgs):
    """Wan2.2-TI2V-5B widths (3072 wide, 24 heads x 128, 48 channels) cut to 2 layers, LongLive 2.0's layout
    (blocks of 8, sink 8 + local 24) and UniPC sampler, 40 frames (the window rolls at block 4): TE bf16 == local."""
    from kvpo_megatron.checkpoint.sharding import gather_full_state_dict
    from kvpo_megatron.config import from_dict
    from kvpo_megatron.model import CacheConfig
    from kvpo_megatron.presets import generator_preset
    from kvpo_megatron.sampling import FlowMatchSampler, SamplerConfig, StreamingGenerator
    from kvpo_megatron.sampling.streaming import PromptSwitch

    tree = generator_preset("longlive2-5b", {"cache", "sampler"})
    torch.manual_seed(0)
    truth_model = _model(pgs, "local", None, torch.float32, preset="wan2.2-5b")
    sd = gather_full_state_dict(truth_model)
    g = torch.Generator().manual_seed(2)
    ctx, noise = torch.randn(1, 512, 4096, generator=g).cuda(), torch.randn(1, 48, 40, 8, 16, generator=g).cuda()
    outs = {}
    for name, model in (("truth", truth_model), ("local", _model(pgs, "local", sd, torch.bfloat16, preset="wan2.2-5b")),
                        ("te", _model(pgs, "te", sd, torch.bfloat16, preset="wan2.2-5b"))):
        gen = StreamingGenerator(model, FlowMatchSampler(from_dict(SamplerConfig, tree["sampler"])),
                                 from_dict(CacheConfig, tree["cache"]))
        with torch.no_grad():
            outs[name] = gen.generate(noise, [PromptSwitch(0, model.encode_text(ctx))]).float()
    e_te, e_local = _rel(outs["te"], outs["truth"]), _rel(outs["local"], outs["truth"])
    _report(test="te_bf16_longlive2", err_te_vs_fp32=e_te, err_local_bf16_vs_fp32=e_local)
    assert torch.isfinite(outs["te"]).all()
    assert e_te <= 1.5 * e_local + 1e-3 and _rel(outs["te"], outs["local"]) <= BF16_REL_TOL


def test_te_grads_match_local_under_cache(pgs, setup):
    """Replay-style forward with autograd under a filled cache: weight grads of TE == local (bf16 tol)."""
    from tests.helpers import cached_replay_backward

    grads = {}
    for kind in ("local", "te"):
        m = _model(pgs, kind, setup["sd"], torch.bfloat16)
        cached_replay_backward(m, setup["ctx"], setup["noise"])
        grads[kind] = {n: p.grad.float().clone() for n, p in m.named_parameters()
                       if p.grad is not None and "blocks.0" in n and n.endswith("weight")}
    errs = {n: _rel(grads["te"][n], g) for n, g in grads["local"].items()}
    _report(test="grads", max_rel=max(errs.values()), worst=max(errs, key=errs.get))
    assert set(grads["te"]) == set(grads["local"])
    assert max(errs.values()) <= 5e-2


def test_te_core_sparse_activation_matches_local_core(pgs):
    """MemFlow's sparse memory activation in the TE core: the frames it reads follow the queries of each call
    (no stale context reuse) and its output matches the torch SDPA core on the same cache (bf16 tol)."""
    from kvpo_megatron.model import CacheConfig, KVCache, model_config
    from kvpo_megatron.model.attention import CachedSDPA
    from kvpo_megatron.model.memory_bank import MemoryBankConfig
    from kvpo_megatron.model.te_spec import TECachedAttention

    cfg = model_config("wan-1.3b", num_layers=1, spec="te", use_cpu_initialization=False)
    g = torch.Generator(device="cuda").manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    cache = KVCache(CacheConfig(history_frames=12, memory_bank=MemoryBankConfig(sma=True, sma_top_k=2)), 1)
    for f in range(12):
        k = rnd(1, 128, 12, 128) + 3 * rnd(1, 1, 12, 128)  # a per-frame mean direction
        cache.layer(0, cache.view([], write_frames=[f])).write(k, rnd(1, 128, 12, 128))
    for f, keep in ((3, [[0]]), (6, [[0, 1]]), (9, [[0, 1, 2]])):
        cache.set_bank(0, f, torch.tensor(keep))
    view = cache.view(cache.cfg.default_read_frames(12), device="cuda")
    assert view.sparse_candidates == 6
    te_core, local_core = TECachedAttention(cfg, pgs), CachedSDPA(cfg, pgs)
    cache.sparse_log, picks = [], []
    with torch.no_grad():
        for seed in range(4):
            q = rnd(1, 384, 12, 128) + 3 * rnd(1, 1, 12, 128)
            k, v = rnd(1, 384, 12, 128), rnd(1, 384, 12, 128)
            out_te = te_core(q, k, v, kv=cache.layer(0, view))
            out_local = local_core(q, k, v, kv=cache.layer(0, view))
            err = _rel(out_te.float(), out_local.float())
            _report(test="te_sma", call=seed, err_te_vs_local=err, picks=cache.sparse_log[-1][1][0][:2])
            assert cache.sparse_log[-1] == cache.sparse_log[-2]  # both cores read the same frames
            picks.append(tuple(cache.sparse_log[-1][1][0][:2]))
            assert err <= BF16_REL_TOL
    assert len(set(picks)) > 1, picks  # the choice changed with the queries and the TE core followed it
    # the same frames without the bank right after a sparse read: the TE core must not reuse that context
    plain = cache.view(cache.cfg.default_read_frames(12), device="cuda", bank=False)
    with torch.no_grad():
        out_te = te_core(q, k, v, kv=cache.layer(0, plain))
        assert _rel(out_te.float(), local_core(q, k, v, kv=cache.layer(0, plain)).float()) <= BF16_REL_TOL
