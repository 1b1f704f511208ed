"""Attention micro benchmark: plain SDPA over [cache; current] vs the split attention (no cache gradient).

One replay-shaped self-attention: ``--frames`` current frames (q, k, v require grad) over ``--cached-frames``
detached cached frames, ``--tokens-per-frame`` tokens each (480x832 Wan: 1560), ``--heads`` x ``--head-dim``.

* plain: ``torch.cat`` of the cache and the current K/V, then torch SDPA (``--plain`` backends; "auto" is
  torch's own choice, as in ``model/attention.py`` CachedSDPA); its backward computes dK/dV for every frame;
* split: ``kvpo_megatron.model.split_attention.cached_attention`` (``--fused`` backends for the two parts,
  Triton dQ-only kernel over the cache on CUDA).

Timed: the median over ``--iters`` of the forward and of the backward (``autograd.grad`` to q, k, v), each
synchronised, after ``--warmup``. FLOPs (the project's convention, ``benchmarks/common.py``): forward
``4 b L (N + L) d h``, backward 2x that, for both variants (the split op does fewer: its TFLOP/s are "model"
TFLOP/s). Prints one JSON line.

    python tools/bench_attention.py --batch 1,2 --plain auto,cudnn --fused flash,cudnn
"""
import argparse
import json
import statistics
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvpo_megatron.benchmarks.common import device_peak_tflops, peak_memory_gb, reset_peak, sync, timed
from kvpo_megatron.dtypes import SHORT_NAMES, flag_dtype
from kvpo_megatron.model import split_attention
from kvpo_megatron.model.split_attention import cached_attention

FLAGS = (*SHORT_NAMES, "fp64")
"""``--dtype`` choices: the package's (``dtypes.SHORT_NAMES``) and float64 for exactness checks on CPU."""
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,2", help="comma-separated batch sizes")
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--cached-frames", type=int, default=9)
    p.add_argument("--tokens-per-frame", type=int, default=1560)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(FLAGS), default="bf16")
    p.add_argument("--plain", default="auto",
                   help=f"SDPA backends for the plain variant: auto,{','.join(SDPA_BACKENDS)}")
    p.add_argument("--fused", default="auto", help="split-op part backends: auto,flash,cudnn,torch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None, help="write per-kernel tables (torch.profiler) of 3 fwd+bwd of each "
                   "variant at the first batch size to this file")
    return p.parse_args(argv)


def plain_attention(backend: str):
    def fn(q, k, v, ck, cv):
        kk, vv = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        with sdpa_kernel(SDPA_BACKENDS[backend]) if backend != "auto" else nullcontext():
            out = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
        return out.transpose(1, 2)
    return fn


def measure(fn, inputs, dout, args, device) -> tuple[dict, list[torch.Tensor]]:
    """Median forward / backward times (ms) and peak memory of fn; returns (stats, [out, dq, dk, dv])."""
    q, k, v = inputs[:3]
    fwd, bwd = [], []
    reset_peak(device)
    for i in range(args.warmup + args.iters):
        t_f, t_b = [], []
        with timed(device, t_f):
            out = fn(*inputs)
        with timed(device, t_b):
            grads = torch.autograd.grad(out, (q, k, v), dout)
        if i >= args.warmup:
            fwd.append(t_f[0])
            bwd.append(t_b[0])
    ms_f, ms_b = 1e3 * statistics.median(fwd), 1e3 * statistics.median(bwd)
    stats = dict(ms_fwd=ms_f, ms_bwd=ms_b, ms_total=ms_f + ms_b, peak_mem_gb=peak_memory_gb(device))
    return stats, [out.detach(), *grads]


def profile_tables(fns: dict, inputs, dout, path: str, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as fh:
        for name, fn in fns.items():
            with profile(activities=acts) as prof:
                for _ in range(3):
                    torch.autograd.grad(fn(*inputs), inputs[:3], dout)
                sync(device)
            fh.write(f"===== {name} (3 x fwd+bwd)\n")
            fh.write(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=80) + "\n")


def bench_batch(args, b: int, device, dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(args.seed)
    L, N = args.frames * args.tokens_per_frame, args.cached_frames * args.tokens_per_frame
    h, d = args.heads, args.head_dim
    q, k, v = (torch.randn(b, L, h, d, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    ck, cv = (torch.randn(b, N, h, d, generator=g, device=device, dtype=dtype) for _ in range(2))
    dout = torch.randn(b, L, h, d, generator=g, device=device, dtype=dtype)
    inputs = (q, k, v, ck, cv)
    fwd_flop = 4.0 * b * L * (N + L) * d * h
    peak = device_peak_tflops(device)

    def rates(st):
        st["tflops_fwd"] = fwd_flop / st["ms_fwd"] / 1e9
        st["tflops_bwd"] = 2 * fwd_flop / st["ms_bwd"] / 1e9
        st["tflops_total"] = 3 * fwd_flop / st["ms_total"] / 1e9
        st["mfu"] = st["tflops_total"] / peak if peak else None
        return st

    variants = {"plain": {}, "split": {}}
    plain_ref, errs = None, []
    for name in args.plain.split(","):
        st, outs = measure(plain_attention(name), inputs, dout, args, device)
        variants["plain"][name] = rates(st)
        plain_ref = outs if plain_ref is None else plain_ref
    for name in args.fused.split(","):
        st, outs = measure(lambda *a, f=name: cached_attention(*a, fused=f), inputs, dout, args, device)
        variants["split"][name] = rates(st)
        errs += [float((o.double() - p.double()).norm() / p.double().norm()) for o, p in zip(outs, plain_ref)]
    if args.profile and b == int(args.batch.split(",")[0]):
        fns = {f"plain/{n}": plain_attention(n) for n in args.plain.split(",")}
        fns.update({f"split/{n}": (lambda *a, f=n: cached_attention(*a, fused=f)) for n in args.fused.split(",")})
        profile_tables(fns, inputs, dout, args.profile, device)
    # headline: the first plain backend (torch's own choice by default) against the fastest split backend
    plain_name = args.plain.split(",")[0]
    split_name = min(variants["split"], key=lambda n: variants["split"][n]["ms_total"])
    plain, split = variants["plain"][plain_name], variants["split"][split_name]
    return dict(batch=b, L=L, N=N, tflop_fwd=fwd_flop / 1e12, tflop_bwd=2 * fwd_flop / 1e12,
                plain=dict(backend=plain_name, **plain), split=dict(backend=split_name, **split),
                speedup=plain["ms_total"] / split["ms_total"], bwd_speedup=plain["ms_bwd"] / split["ms_bwd"],
                max_rel_err_vs_plain=max(errs), variants=variants)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), torch.float64 if args.dtype == "fp64" else flag_dtype(args.dtype)
    results = [bench_batch(args, int(b), device, dtype) for b in args.batch.split(",")]
    sync(device)

    tuned = split_attention._kernels.get("gpu")  # the Triton dq kernel's autotuned config, when it ran
    out = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", dtype=args.dtype,
               torch=torch.__version__, heads=args.heads, head_dim=args.head_dim, frames=args.frames,
               cached_frames=args.cached_frames, tokens_per_frame=args.tokens_per_frame,
               dq_config=str(getattr(tuned, "best_config", None)), results=results)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
