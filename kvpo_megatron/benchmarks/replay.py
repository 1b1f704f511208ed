"""Replay benchmark of the library's path: forward + backward of one block-step per tuple under the unrouted cache,
LoRA-only weight gradients.

A replay tuple is (noisy block x_t, timestep) of one branch; ``--branches`` tuples (one per branch, each reading
its own cached context of 9 frames -- sink 3 + 6 local -- from a forked KV cache, as the trainer's replay does)
run as one batch through ``kvpo.replay.replay_terms`` (the library's replay forward: per-sample views, the split
cached/current attention without dK/dV for the cache), with the model built by the library
(``benchmarks.common.library_model``: spec, compile) and ``model.recompute_blocks`` for ``--recompute``. The base weights
are frozen; LoRA (r = alpha = 256 by default) gets gradients of ``sum_k c_k TVE_k``. Timed: the median of
``--iters`` iterations after ``--warmup``. FLOPs: ``kvpo_megatron.flops.replay_flops``. The reference is
``benchmarks.common.RefCausalWan`` with plain unmerged LoRA on the same linears, same batch, same process.

    python tools/bench_replay.py --config wan-1.3b --latent-h 60 --latent-w 104 --branches 2 --spec te --compile
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from kvpo_megatron.benchmarks.common import (RefCache, add_model_args, cast_model, device_peak_tflops, library_model,
                                             peak_memory_gb, reference_from, reset_peak, timed)
from kvpo_megatron.dtypes import flag_dtype
from kvpo_megatron.flops import replay_flops
from kvpo_megatron.kvpo.replay import replay_terms
from kvpo_megatron.kvpo.types import ReplayTuple
from kvpo_megatron.lora import LoRAConfig, apply_lora
from kvpo_megatron.model import CacheConfig
from kvpo_megatron.sampling import FlowMatchSampler, PromptSwitch, SamplerConfig, StreamingGenerator
from kvpo_megatron.sampling.streaming import BlockPlan


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="wan-1.3b")
    p.add_argument("--latent-h", type=int, default=60)
    p.add_argument("--latent-w", type=int, default=104)
    p.add_argument("--branches", type=int, default=2, help="tuples (branches) per batch")
    p.add_argument("--lora-rank", type=int, default=256)
    add_model_args(p)
    p.add_argument("--recompute", action="store_true", help="per-block activation recompute (replay.recompute)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile", default=None, help="write a per-kernel table of one replay step here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ours_step_fn(model, runner, args, device, inputs):
    """Commit each branch's 9 context frames into its own sample of a forked cache (the replay's context rebuild),
    then return a closure running one fwd+bwd replay step of all tuples through ``replay_terms``."""

    cc = CacheConfig(history_frames=9)
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), cc, runner=runner)
    x_ctx, x_t, t, c, ctx = inputs
    B = x_t.shape[0]
    prefix = gen.new_cache(1, fork_batch=B, private_frames=9)
    cache = prefix.fork(B, 9)
    with torch.no_grad():
        text = model.encode_text(ctx)
        gen.run(cache, x_ctx.clone(), None, [PromptSwitch(0, text)], range(3), plan_for=lambda b: BlockPlan(given=True))
    tuples = [ReplayTuple(block=3, step=0, start=9, x=x_t[i:i + 1], timestep=float(t[i]), v_target=c[i:i + 1])
              for i in range(B)]
    view = cache.view(cc.default_read_frames(9), device=device)
    model.recompute_blocks = args.recompute

    def step():
        with torch.enable_grad():
            text_g = model.encode_text(ctx)  # the cross-attention adapters act on the prompt's K/V
            terms = replay_terms(gen, cache, view, tuples, text_g)
            terms.sum().backward()
    return step


def ref_step_fn(ref, args, device, inputs):
    for p in ref.parameters():
        p.requires_grad_(False)
    for blk in ref.blocks:
        for lin in (blk.self_attn.q, blk.self_attn.k, blk.self_attn.v, blk.self_attn.o, blk.cross_attn.q,
                    blk.cross_attn.o, blk.ffn[0], blk.ffn[2]):
            lin.add_lora(args.lora_rank, float(args.lora_rank))
            torch.nn.init.normal_(lin.lora_b, 0, 1e-3)
    ref = cast_model(ref.to(device), flag_dtype(args.dtype))
    x_ctx, x_t, t, c, ctx = inputs
    ctx = ctx.expand(x_t.shape[0], -1, -1)
    cache = RefCache(ref.cfg.num_layers, sink=3, local=9, frames_per_block=3)
    with torch.no_grad():
        tkv = ref.text_kv(ctx)
        for s in range(0, 9, 3):
            ref(x_ctx[:, :, s:s + 3], torch.zeros(args.branches, device=device), tkv, frame_offset=s, cache=cache,
                write=True, head=False)

    def step():
        v = ref(x_t, t, tkv, frame_offset=9, cache=cache, write=False)
        ((v.float() - c) ** 2).mean().backward()
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
    model, runner = library_model(args, args.config, device, lora_rank=0, seed=args.seed)
    ref = reference_from(model, dtype=torch.float32, device=torch.device("cpu")) if args.reference else None
    apply_lora(model, LoRAConfig(rank=args.lora_rank, alpha=float(args.lora_rank)))
    with torch.no_grad():  # non-zero B so that LoRA changes the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    model.to(device)
    cfg = model.config
    T = cfg.tokens_per_frame(args.latent_h, args.latent_w)
    g = torch.Generator().manual_seed(args.seed + 1)
    B = args.branches
    shape = (B, cfg.in_channels, 9, args.latent_h, args.latent_w)
    x_ctx = torch.randn(shape, generator=g).to(device)
    x_t = torch.randn(B, cfg.in_channels, 3, args.latent_h, args.latent_w, generator=g).to(device)
    c = torch.randn(B, cfg.out_channels, 3, args.latent_h, args.latent_w, generator=g).to(device)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device)
    t = torch.full((B,), 750.0, device=device)
    dt = flag_dtype(args.dtype)
    inputs = (x_ctx.to(dt), x_t.to(dt), t, c, ctx)
    step = ours_step_fn(model, runner, args, device, inputs)
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
               split_attention=args.split_attention, compile=args.compile, te_compile=args.te_compile if args.compile and args.spec == "te" else None,
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
