"""Streaming rollout benchmark: seconds per block, video FPS, TFLOP/s, MFU and peak memory, vs a plain reference.

One rollout = ``--frames`` latent frames in blocks of ``frames_per_block`` (3); each block is ``--steps`` (4)
solver forwards against the block's view (sink 3 + the local frames before it: a 12-frame attention span once
the window is full) plus one commit forward at t=0 that writes its K/V and skips the head. A whole rollout runs
once to warm up, then again timed; the figures are means over the *steady* blocks (full 12-frame span).
FLOPs are counted as in ``tools/bench_common.py`` (linears 2 x tokens x weights, attention 4 Lq Lk d per layer;
the commit pass without the head). Video FPS counts 4 video frames per latent frame.
The reference (``--reference``, default on) is ``bench_common.RefCausalWan`` holding the same weights, timed in
the same process; ``speedup_vs_reference`` = reference seconds / ours, ``rel_err_vs_reference`` compares the
generated latents.

    python tools/bench_rollout.py --config wan-1.3b --latent-h 60 --latent-w 104 --spec te --compile --cuda-graphs
    python tools/bench_rollout.py --config tiny --latent-h 8 --latent-w 8 --device cpu --dtype fp32

``--generator NAME`` takes the cache layout (frames per block, sink, local window) and the sampler from a generator
preset instead (``longlive2-5b``: blocks of 8, sink 8 + local 24 = a 32-frame span, 4 UniPC steps); ``--layers``
overrides the model's depth (smoke runs of a large preset):

    python tools/bench_rollout.py --config wan2.2-5b --generator longlive2-5b --latent-h 44 --latent-w 80 --frames 64
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # noqa: E402  (bench_common beside this file)
from bench_common import (RefCache, cast_model, device_peak_tflops, forward_flops, peak_memory_gb,  # noqa: E402
                          reference_from, rel_err, reset_peak, timed)

log = logging.getLogger("bench_rollout")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="wan-1.3b", help="model preset (tiny | wan-1.3b | wan-14b | wan2.2-5b ...)")
    p.add_argument("--generator", default=None, help="take cache layout and sampler from this generator preset "
                   "(e.g. longlive2-5b); default: blocks of 3, sink 3 + local 9, --steps Euler steps")
    p.add_argument("--layers", type=int, default=None, help="override the model preset's number of layers")
    p.add_argument("--latent-h", type=int, default=60, help="latent height (480 px / 8)")
    p.add_argument("--latent-w", type=int, default=104, help="latent width (832 px / 8)")
    p.add_argument("--frames", type=int, default=21, help="latent frames generated (multiple of the block size)")
    p.add_argument("--batch", type=int, default=1, help="videos generated together")
    p.add_argument("--steps", type=int, default=4, help="solver steps per block (without --generator)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--spec", choices=["local", "te"], default="local")
    p.add_argument("--fp8", choices=["e4m3", "hybrid"], default=None, help="FP8 format (te spec)")
    p.add_argument("--fp8-recipe", choices=["tensorwise", "delayed"], default="tensorwise")
    p.add_argument("--fp8-linears", default="", help="comma list of self_attn,cross_attn,ffn run in FP8")
    p.add_argument("--fp8-dpa", action="store_true", help="FP8 fused attention (te spec; needs --fp8)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (TE calls stay eager)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay full-window solver steps and commits from CUDA graphs (GPU)")
    p.add_argument("--profile", default=None, help="write a per-kernel table of one steady block here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-bank", action="store_true", help="MemFlow's bank (memflow-1.3b preset; eager path)")
    p.add_argument("--sma", action="store_true",
                   help="with --memory-bank: sparse memory activation (each layer attends 3 of sink + bank)")
    return p.parse_args(argv)


def build(args, device: torch.device):
    """Our model with random weights (spec/precision from ``args``), on ``device`` in ``args.dtype``."""
    from kvpo_megatron.model import CausalWanDiT, model_config
    from kvpo_megatron.model.specs import local_spec
    from kvpo_megatron.parallel.state import ParallelConfig, init_parallel

    pgs = init_parallel(ParallelConfig())
    torch.manual_seed(args.seed)
    ov = dict(spec=args.spec)
    if args.spec == "te":
        ov.update(use_cpu_initialization=False, fp8=args.fp8, fp8_recipe=args.fp8_recipe, fp8_dot_product_attention=args.fp8_dpa)
    if args.layers is not None:
        ov["num_layers"] = args.layers
    cfg = model_config(args.config, **ov)
    if args.spec == "te":
        from kvpo_megatron.model.te_spec import te_spec
        spec = te_spec(cfg, fp8_linears=[g for g in args.fp8_linears.split(",") if g])
    else:
        spec = local_spec()
    model = cast_model(CausalWanDiT(cfg, spec, pg_collection=pgs).to(device), DTYPES[args.dtype]).eval()
    if args.compile:
        for blk in model.blocks:
            blk.compile(dynamic=False)
    return model


def layout(args):
    """(CacheConfig, SamplerConfig): LongLive-1.3B's layout with ``--steps`` Euler steps, or ``--generator``'s."""
    from kvpo_megatron.config import from_dict
    from kvpo_megatron.model import CacheConfig
    from kvpo_megatron.model.memory_bank import generator_preset
    from kvpo_megatron.sampling import SamplerConfig

    euler = SamplerConfig(timesteps=tuple(1000.0 - 250.0 * i for i in range(args.steps)))
    if args.generator is None:
        return CacheConfig(history_frames=9), euler
    tree = generator_preset(args.generator, {"cache", "sampler"})
    c = tree["cache"]
    cc = CacheConfig(frames_per_block=c["frames_per_block"], num_sink_frames=c["num_sink_frames"],
                     local_attn_frames=c["local_attn_frames"], history_frames=c["local_attn_frames"])
    return cc, from_dict(SamplerConfig, tree["sampler"]) if "sampler" in tree else euler


def rollout_ours(model, text, noise, lay, times: list[float], profile_block: int | None = None,
                 memory_bank: bool = False, sma: bool = False):
    """Generate ``noise``'s frames block by block; per-block wall times appended to ``times``.
    ``lay``: ``layout(args)``. ``memory_bank``: MemFlow's bank (3 entries, recorded every 3 blocks), as in the
    memflow-1.3b preset."""
    import dataclasses

    from kvpo_megatron.model.memory_bank import MemoryBankConfig
    from kvpo_megatron.sampling import FlowMatchSampler, StreamingGenerator

    cc, sc = lay
    sampler = FlowMatchSampler(sc)
    bank = MemoryBankConfig(bank_size=3, record_interval=3, sma=sma) if memory_bank else None
    gen = StreamingGenerator(model, sampler, dataclasses.replace(cc, memory_bank=bank))
    cache, fpb, out, dev = gen.new_cache(), cc.frames_per_block, torch.empty_like(noise), noise.device
    for s in range(0, noise.shape[2], fpb):
        with timed(dev, times), _maybe_profile(profile_block == s // fpb, profile_block):
            x0 = gen.denoise_block(cache, noise[:, :, s:s + fpb], s, text)
            gen.commit_block(cache, x0, s, text)
        out[:, :, s:s + fpb] = x0
    return out


class StaticRope(torch.nn.Module):
    """Wraps the model's RoPE: while ``active``, returns static (cos, sin) buffers filled by ``update``
    so that a CUDA graph captured at one block replays at any frame offset."""

    def __init__(self, rope):
        super().__init__()
        self.inner, self.active, self.bufs = rope, False, None

    def update(self, frame_offset: int, *grid):
        cos, sin = self.inner(frame_offset, *grid)
        if self.bufs is None:
            self.bufs = (cos.clone(), sin.clone())
        else:
            self.bufs[0].copy_(cos)
            self.bufs[1].copy_(sin)

    def forward(self, frame_offset, *grid):
        return self.bufs if self.active else self.inner(frame_offset, *grid)


class GraphedForward:
    """One model forward (fixed shapes, view size, head on/off) captured in a CUDA graph on first use;
    later calls copy x, t, the view's slots and the RoPE tables into static buffers and replay."""

    def __init__(self, model, cache, text, *, head: bool):
        self.model, self.cache, self.text, self.head = model, cache, text, head
        self.graph, self.static = None, None

    def __call__(self, x, t: float, start: int, view):
        from kvpo_megatron.model.kv_cache import AttentionView

        rope, grid = self.model.rope, self.model.check_latents(x)
        if self.static is None:
            ws = None if view.write_slots is None else view.write_slots.clone()
            self.static = dict(x=x.clone(), t=torch.full((x.shape[0],), t, device=x.device),
                               rs=view.read_slots.clone(), ws=ws)
        st = self.static
        st["x"].copy_(x)
        st["t"].fill_(t)
        st["rs"].copy_(view.read_slots)
        if st["ws"] is not None:
            st["ws"].copy_(view.write_slots)
        rope.update(start, *grid)
        sview = AttentionView(read_frames=view.read_frames, read_slots=st["rs"], write_frames=view.write_frames,
                              write_slots=st["ws"])
        run = lambda: self.model(st["x"], st["t"], text=self.text, frame_offset=start, cache=self.cache,  # noqa: E731
                                 view=sview, compute_output=self.head)
        rope.active = True
        try:
            if self.graph is None:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()  # warm-up on a side stream (workspaces, cuDNN plans, compiled kernels)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.out = run()
            self.graph.replay()
        finally:
            rope.active = False
        return self.out


def rollout_graphed(model, text, noise, lay, times: list[float], graphs: dict):
    """As ``rollout_ours``, but blocks with a full view run as CUDA-graph replays (one graph for the solver
    steps, one for the commit pass, shared by all such blocks; ``graphs`` keeps them across rollouts)."""
    from kvpo_megatron.sampling import FlowMatchSampler

    cc, sc = lay
    sampler = FlowMatchSampler(sc)
    if "cache" not in graphs:
        from kvpo_megatron.model import KVCache
        graphs["cache"] = KVCache(cc, model.config.num_layers)
        if not isinstance(model.rope, StaticRope):
            model.rope = StaticRope(model.rope)
    cache = graphs["cache"]
    cache.frame_of_slot = [None] * cache.num_slots
    fpb, out, dev, b = cc.frames_per_block, torch.empty_like(noise), noise.device, noise.shape[0]
    full = cc.num_sink_frames + cc.local_attn_frames - fpb
    for s in range(0, noise.shape[2], fpb):
        frames = cc.default_read_frames(s, fpb)
        with timed(dev, times):
            x = noise[:, :, s:s + fpb]
            for i in range(sampler.num_steps):
                view = cache.view(frames, device=dev)
                if len(frames) == full:
                    g = graphs.setdefault("denoise", GraphedForward(model, cache, text, head=True))
                    v = g(x, sampler.timestep(i), s, view)
                else:
                    v = model(x, torch.full((b,), sampler.timestep(i), device=dev), text=text, frame_offset=s,
                              cache=cache, view=view)
                x = sampler.step(x, v, i)
            view = cache.view(frames, write_frames=list(range(s, s + fpb)), device=dev)
            if len(frames) == full:
                graphs.setdefault("commit", GraphedForward(model, cache, text, head=False))(
                    x, sampler.context_timestep(), s, view)
            else:
                model(x, torch.full((b,), sampler.context_timestep(), device=dev), text=text, frame_offset=s,
                      cache=cache, view=view, compute_output=False)
        out[:, :, s:s + fpb] = x
    return out


def rollout_reference(ref, text_kv, noise, lay, times: list[float]):
    from kvpo_megatron.sampling import FlowMatchSampler

    cc, sc = lay
    sampler = FlowMatchSampler(sc)
    fpb = cc.frames_per_block
    cache = RefCache(ref.cfg.num_layers, sink=cc.num_sink_frames, local=cc.local_attn_frames, frames_per_block=fpb)
    out, dev = [], noise.device
    b = noise.shape[0]
    for s in range(0, noise.shape[2], fpb):
        with timed(dev, times):
            x = noise[:, :, s:s + fpb]
            for i in range(sampler.num_steps):
                t = torch.full((b,), sampler.timestep(i), device=dev)
                x = sampler.step(x, ref(x, t, text_kv, frame_offset=s, cache=cache, write=False), i)
            t0 = torch.full((b,), sampler.context_timestep(), device=dev)
            ref(x, t0, text_kv, frame_offset=s, cache=cache, write=True, head=False)
        out.append(x)
    return torch.cat(out, 2)


_PROFILE: dict = {}


class _maybe_profile:
    def __init__(self, on: bool, block):
        self.on = on

    def __enter__(self):
        if self.on:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()

    def __exit__(self, *exc):
        if self.on:
            self.prof.__exit__(*exc)
            _PROFILE["table"] = self.prof.key_averages().table(
                sort_by="cuda_time_total" if torch.cuda.is_available() else "cpu_time_total", row_limit=40)


def steady_blocks(frames: int, fpb: int = 3, sink: int = 3, local: int = 9) -> list[int]:
    """Indices of blocks whose view spans the full window (sink + local - fpb cached frames)."""
    full = sink + local - fpb
    idx = [b for b, s in enumerate(range(0, frames, fpb)) if s >= full]
    return idx or [frames // fpb - 1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = torch.device(args.device)
    lay = layout(args)
    cc, sc = lay
    fpb, steps = cc.frames_per_block, len(sc.timesteps)
    if args.frames % fpb:
        raise SystemExit(f"--frames must be a multiple of {fpb} (frames per block), got {args.frames}")
    model = build(args, device)
    cfg = model.config
    T = cfg.tokens_per_frame(args.latent_h, args.latent_w)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    ctx = torch.randn(args.batch, cfg.text_len, cfg.text_dim, generator=g).to(device)
    noise = torch.randn(args.batch, cfg.in_channels, args.frames, args.latent_h, args.latent_w, generator=g).to(device)
    steady = steady_blocks(args.frames, fpb, cc.num_sink_frames, cc.local_attn_frames)
    ref = reference_from(model, dtype=DTYPES[args.dtype], device=torch.device("cpu")) if args.reference else None
    with torch.no_grad():
        text = model.encode_text(ctx)
        graphs: dict = {}
        if args.cuda_graphs and args.memory_bank:
            raise SystemExit("--memory-bank runs on the eager path; drop --cuda-graphs")
        if args.sma and not args.memory_bank:
            raise SystemExit("--sma selects among sink + bank frames; add --memory-bank")
        roll = (lambda tm: rollout_graphed(model, text, noise, lay, tm, graphs)) if args.cuda_graphs else \
            (lambda tm: rollout_ours(model, text, noise, lay, tm, memory_bank=args.memory_bank, sma=args.sma))
        roll([])  # warm-up (kernels, cuDNN plans, FP8 scales, graph capture)
        reset_peak(device)
        times: list[float] = []
        ours = roll(times)
        peak = peak_memory_gb(device)
        if args.profile:  # a third rollout, profiling one steady block (not part of the timings)
            rollout_ours(model, text, noise, lay, [], profile_block=steady[0], memory_bank=args.memory_bank,
                         sma=args.sma)
    sec = sum(times[i] for i in steady) / len(steady)
    cached = cc.num_sink_frames + cc.local_attn_frames - fpb
    fwd = forward_flops(cfg, batch=args.batch, frames=fpb, tokens_per_frame=T, cached_frames=cached)
    commit = forward_flops(cfg, batch=args.batch, frames=fpb, tokens_per_frame=T, cached_frames=cached, head=False)
    flops = steps * fwd["total"] + commit["total"]
    peak_tf = device_peak_tflops(device)
    res = dict(bench="rollout", config=args.config, generator=args.generator, layers=cfg.num_layers,
               sampler=str(sc.kind), spec=args.spec, dtype=args.dtype, compile=args.compile,
               cuda_graphs=args.cuda_graphs, memory_bank=args.memory_bank, sma=args.sma, fp8=args.fp8,
               fp8_recipe=args.fp8_recipe if args.fp8 else None, fp8_linears=args.fp8_linears or None,
               fp8_dpa=args.fp8_dpa, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               latent=[args.latent_h, args.latent_w], tokens_per_frame=T, frames_per_block=fpb,
               span_frames=cc.num_sink_frames + cc.local_attn_frames,
               steps=steps, batch=args.batch, frames=args.frames, steady_blocks=len(steady),
               sec_per_block=sec, video_fps=args.batch * fpb * 4 / sec, tflop_per_block=flops / 1e12,
               attention_flop_share=(steps * fwd["attention"] + commit["attention"]) / flops,
               tflops=flops / sec / 1e12, peak_bf16_tflops=peak_tf,
               mfu=(flops / sec / 1e12 / peak_tf) if peak_tf else None, peak_mem_gb=peak)
    if args.reference:
        del model, text
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref = ref.to(device)
        with torch.no_grad():
            tkv = ref.text_kv(ctx)
            rollout_reference(ref, tkv, noise, lay, [])
            rtimes: list[float] = []
            want = rollout_reference(ref, tkv, noise, lay, rtimes)
        rsec = sum(rtimes[i] for i in steady) / len(steady)
        res.update(ref_sec_per_block=rsec, ref_video_fps=args.batch * fpb * 4 / rsec,
                   ref_tflops=flops / rsec / 1e12, speedup_vs_reference=rsec / sec,
                   rel_err_vs_reference=rel_err(ours, want))
    if args.profile:
        with open(args.profile, "w") as f:
            f.write(_PROFILE.get("table", ""))
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
