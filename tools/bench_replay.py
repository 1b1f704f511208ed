"""Replay benchmark: forward + backward of one block-step under the unrouted cache, LoRA-only weight gradients.

A replay tuple is (noisy block x_t, timestep) of one branch; ``--branches`` tuples (one per branch, each with
its own cached context of 9 frames: sink 3 + 6 local) run as one batch. The base weights are frozen; LoRA
(``kvpo_megatron.lora.apply_lora``, r = alpha = 256 by default) gets gradients. The loss is ``sum(c * v)``
with a fixed random ``c`` (the shape of KVPO's coefficient-weighted replay loss). Timed: the median of
``--iters`` iterations after ``--warmup``. FLOPs: ``bench_common.replay_flops`` (forward incl. LoRA +
backward: base linears' data gradient 1x, LoRA 2x, attention 2x its forward). The reference is
``bench_common.RefCausalWan`` with plain unmerged LoRA on the same linears, same batch, same process.

    python tools/bench_replay.py --config wan-1.3b --latent-h 60 --latent-w 104 --branches 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # noqa: E402
from bench_common import (RefCache, cast_model, device_peak_tflops, peak_memory_gb,  # noqa: E402
                          reference_from, replay_flops, reset_peak, timed)
from bench_rollout import DTYPES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="wan-1.3b")
    p.add_argument("--latent-h", type=int, default=60)
    p.add_argument("--latent-w", type=int, default=104)
    p.add_argument("--branches", type=int, default=2, help="tuples (branches) per batch")
    p.add_argument("--lora-rank", type=int, default=256)
    p.add_argument("--lora-alpha", type=float, default=256.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--spec", choices=["local", "te"], default="local")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile", default=None, help="write a per-kernel table of one replay step here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(args, device):
    from kvpo_megatron.lora import LoRAConfig, apply_lora
    from kvpo_megatron.model import CausalWanDiT, model_config
    from kvpo_megatron.model.specs import local_spec
    from kvpo_megatron.parallel.state import ParallelConfig, init_parallel

    pgs = init_parallel(ParallelConfig())
    torch.manual_seed(args.seed)
    if args.spec == "te":
        from kvpo_megatron.model.te_spec import te_spec
        cfg = model_config(args.config, spec="te", use_cpu_initialization=False)
        spec = te_spec(cfg, fp8_linears=())
    else:
        cfg, spec = model_config(args.config), local_spec()
    model = CausalWanDiT(cfg, spec, pg_collection=pgs)
    ref = reference_from(model, dtype=torch.float32, device=torch.device("cpu")) if args.reference else None
    apply_lora(model, LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha))
    model = cast_model(model.to(device), DTYPES[args.dtype])
    with torch.no_grad():  # non-zero B so that LoRA changes the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    if args.compile:
        for blk in model.blocks:
            blk.compile(dynamic=False)
    if args.recompute:
        for blk in model.blocks:
            fwd = blk.forward
            blk.forward = lambda *a, _f=fwd, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)
    return model, ref


def ours_step_fn(model, args, device, inputs):
    """Fill a per-branch cache (9 frames) and return a closure running one fwd+bwd replay step."""
    from kvpo_megatron.model import CacheConfig, KVCache

    cc = CacheConfig(history_frames=9)
    cache = KVCache(cc, model.config.num_layers)
    x_ctx, x_t, t, c, ctx = inputs
    with torch.no_grad():
        text = model.encode_text(ctx)
        for s in range(0, 9, 3):
            view = cache.view(cc.default_read_frames(s), write_frames=range(s, s + 3), device=device)
            model(x_ctx[:, :, s:s + 3], torch.zeros(args.branches, device=device), text=text, frame_offset=s,
                  cache=cache, view=view, compute_output=False)

    def step():
        view = cache.view(cc.default_read_frames(9), device=device)
        v = model(x_t, t, text=text, frame_offset=9, cache=cache, view=view)
        (v.float() * c).sum().backward()
    return step


def ref_step_fn(ref, args, device, inputs):
    for p in ref.parameters():
        p.requires_grad_(False)
    for blk in ref.blocks:
        for lin in (blk.self_attn.q, blk.self_attn.k, blk.self_attn.v, blk.self_attn.o, blk.cross_attn.q,
                    blk.cross_attn.o, blk.ffn[0], blk.ffn[2]):
            lin.add_lora(args.lora_rank, args.lora_alpha)
            torch.nn.init.normal_(lin.lora_b, 0, 1e-3)
    ref = cast_model(ref.to(device), DTYPES[args.dtype])
    x_ctx, x_t, t, c, ctx = inputs
    cache = RefCache(ref.cfg.num_layers, sink=3, local=9, frames_per_block=3)
    with torch.no_grad():
        tkv = ref.text_kv(ctx)
        for s in range(0, 9, 3):
            ref(x_ctx[:, :, s:s + 3], torch.zeros(args.branches, device=device), tkv, frame_offset=s, cache=cache,
                write=True, head=False)

    def step():
        v = ref(x_t, t, tkv, frame_offset=9, cache=cache, write=False)
        (v.float() * c).sum().backward()
    return ref, step


def time_steps(step, device, warmup, iters):
    for _ in range(warmup):
        step()
    times: list[float] = []
    for _ in range(iters):
        with timed(device, times):
            step()
    return statistics.median(times)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    model, ref = build(args, device)
    cfg = model.config
    T = cfg.tokens_per_frame(args.latent_h, args.latent_w)
    g = torch.Generator().manual_seed(args.seed + 1)
    B = args.branches
    shape = (B, cfg.in_channels, 9, args.latent_h, args.latent_w)
    x_ctx = torch.randn(shape, generator=g).to(device)
    x_t = torch.randn(B, cfg.in_channels, 3, args.latent_h, args.latent_w, generator=g).to(device)
    c = torch.randn(B, cfg.out_channels, 3, args.latent_h, args.latent_w, generator=g).to(device)
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g).to(device)
    t = torch.full((B,), 750.0, device=device)
    inputs = (x_ctx, x_t, t, c, ctx)
    step = ours_step_fn(model, args, device, inputs)
    reset_peak(device)
    sec = time_steps(step, device, args.warmup, args.iters)
    peak = peak_memory_gb(device)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda"
                                              else "cpu_time_total", row_limit=40))
    flops = replay_flops(cfg, batch=B, frames=3, tokens_per_frame=T, cached_frames=9, lora_rank=args.lora_rank)
    peak_tf = device_peak_tflops(device)
    res = dict(bench="replay", config=args.config, spec=args.spec, dtype=args.dtype, branches=B,
               lora_rank=args.lora_rank, recompute=args.recompute,
               compile=args.compile,
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               latent=[args.latent_h, args.latent_w], tokens_per_frame=T, sec_per_step=sec, tuples_per_s=B / sec,
               tflop_per_step=flops / 1e12, tflops=flops / sec / 1e12, peak_bf16_tflops=peak_tf,
               mfu=(flops / sec / 1e12 / peak_tf) if peak_tf else None, peak_mem_gb=peak)
    if args.reference:
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref, rstep = ref_step_fn(ref, args, device, inputs)
        rsec = time_steps(rstep, device, args.warmup, args.iters)
        res.update(ref_sec_per_step=rsec, ref_tuples_per_s=B / rsec, ref_tflops=flops / rsec / 1e12,
                   speedup_vs_reference=rsec / sec)
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
