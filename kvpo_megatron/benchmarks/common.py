"""Shared pieces of the benchmarks: the library model a benchmark drives, timers, device peaks, and a plain-PyTorch
reference model.

FLOPs are the library's count (``kvpo_megatron/flops.py``). A benchmark measures the library's own path: the model
comes from ``build_model`` + ``apply_lora`` + ``accelerate`` with the flags given, and every forward goes through
the streaming engine; nothing here builds a loop, graph capture or RoPE replacement of its own.

``RefCausalWan`` is an independent eager causal Wan2.1 (original Wan parameter names, torch SDPA, no fusion,
a per-step ``torch.cat`` of the cached frames) that loads our weights through ``checkpoint/mappings.py``: the
plain-PyTorch reference timed beside ours.
"""
from __future__ import annotations

import argparse
import math
import resource
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from kvpo_megatron.accelerate import accelerate
from kvpo_megatron.checkpoint.mappings import convert_state_dict
from kvpo_megatron.checkpoint.sharding import gather_full_state_dict
from kvpo_megatron.dtypes import SHORT_NAMES
from kvpo_megatron.lora import LoRAConfig, apply_lora
from kvpo_megatron.lora_tensors import base_name
from kvpo_megatron.model.build import ModelSection, build_model
from kvpo_megatron.parallel.state import ParallelConfig, init_parallel

# Dense bf16 tensor-core peaks (datasheet, without sparsity) in TFLOP/s.
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}


def device_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (TFLOP/s), or None when unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in BF16_PEAK_TFLOPS.items():
        if key in name:
            return val
    return None




def add_model_args(p: argparse.ArgumentParser) -> None:
    """The execution flags every benchmark takes (they map onto the library's config fields)."""
    p.add_argument("--dtype", choices=sorted(SHORT_NAMES), default="bf16")
    p.add_argument("--spec", choices=["local", "te"], default="local")
    p.add_argument("--compile", action="store_true", help="model.compile: torch.compile each block")
    p.add_argument("--cuda-graphs", action="store_true", help="model.cuda_graphs: no-grad forwards from CUDA graphs")
    p.add_argument("--te-compile", choices=["replay", "opaque"], default="replay",
                   help="model.te_compile: under --compile, trace the TE calls of the replay's forwards or keep them eager")
    p.add_argument("--split-attention", choices=["auto", "flash", "cudnn", "torch"], default="auto",
                   help="model.overrides.split_attention: kernels of the replay's split attention")
    p.add_argument("--fp8", choices=["e4m3", "hybrid"], default=None, help="FP8 format (te spec)")
    p.add_argument("--fp8-recipe", choices=["tensorwise", "delayed"], default="tensorwise")
    p.add_argument("--fp8-linears", default=None, help="comma list of self_attn,cross_attn,ffn run in FP8")
    p.add_argument("--fp8-dpa", action="store_true", help="FP8 fused attention (te spec; needs --fp8)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (smoke runs of large presets)")


def model_section(args, preset: str):
    """The ``ModelSection`` (config tree) the flags select."""
    ov = {"params_dtype": SHORT_NAMES[args.dtype], "bf16": args.dtype == "bf16", "spec": args.spec,
          "split_attention": args.split_attention}
    if args.spec == "te":
        ov.update(use_cpu_initialization=False, fp8=args.fp8, fp8_recipe=args.fp8_recipe,
                  fp8_dot_product_attention=args.fp8_dpa)
    if args.layers:
        ov["num_layers"] = args.layers
    linears = None if args.fp8_linears is None else tuple(g for g in args.fp8_linears.split(",") if g)
    return ModelSection(preset=preset, overrides=ov, compile=args.compile, cuda_graphs=args.cuda_graphs,
                        fp8_linears=linears, te_compile=args.te_compile)


def library_model(args, preset: str, device: torch.device, *, lora_rank: int = 0, seed: int = 0):
    """(model, runner): the library's model for ``args`` with random weights (LoRA r=alpha=``lora_rank`` with a
    non-zero B, so adapters change the output), on ``device``, accelerated as configured."""

    pgs = init_parallel(ParallelConfig())
    torch.manual_seed(seed)
    section = model_section(args, preset)
    model = build_model(section, pg_collection=pgs)
    if lora_rank:
        apply_lora(model, LoRAConfig(rank=lora_rank, alpha=float(lora_rank)))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)
    model = model.to(device)
    return model, accelerate(model, section, device=device)


# ---- timers / memory --------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, out: list[float]):
    """Append the wall time of the block (device synchronised at both ends) to ``out``."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    out.append(time.perf_counter() - t0)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory since the last ``reset_peak`` (CUDA) or the process's max RSS (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- the plain-PyTorch reference model --------------------------------------------------------------
class RefLinear(nn.Linear):
    """nn.Linear with an optional LoRA branch ``scale * B(A x)`` (plain eager, unmerged)."""

    def add_lora(self, rank: int, alpha: float) -> None:
        self.lora_a = nn.Parameter(torch.randn(rank, self.in_features, dtype=self.weight.dtype,
                                               device=self.weight.device) / math.sqrt(self.in_features))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=self.weight.dtype,
                                               device=self.weight.device))
        self.lora_scale = alpha / rank

    def forward(self, x):
        y = super().forward(x)
        if hasattr(self, "lora_a"):
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.lora_scale
        return y


class RefRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.q, self.k, self.v, self.o = (RefLinear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RefRMSNorm(dim, eps), RefRMSNorm(dim, eps)
        self.heads = heads

    def split(self, t):  # [b, L, dim] -> [b, heads, L, hd]
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def attend(self, q, k, v):  # [b, h, L, hd]
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def rope_rotate(x, cos, sin):
    """x: [b, h, L, hd]; cos/sin: [L, hd/2] float32; rotates pairs (x[2i], x[2i+1])."""
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).type_as(x)


class RefBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layernorm_epsilon
        self.eps = eps
        self.self_attn = RefAttention(d, cfg.num_attention_heads, eps)
        self.cross_attn = RefAttention(d, cfg.num_attention_heads, eps)
        self.norm3 = nn.LayerNorm(d, eps=eps)
        self.ffn = nn.Sequential(RefLinear(d, cfg.ffn_hidden_size), nn.GELU(approximate="tanh"),
                                 RefLinear(cfg.ffn_hidden_size, d))
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))

    def forward(self, x, e, cos, sin, text_kv, cache_kv):
        """x [b, L, d]; e [b, 6, d] float32; cache_kv: (list of cached (k, v) [b, h, T, hd], write?)."""
        m = (self.modulation.float() + e).unsqueeze(2).unbind(1)  # 6 x [b, 1, d]
        ln = lambda t: F.layer_norm(t.float(), t.shape[-1:], eps=self.eps)  # noqa: E731
        a = self.self_attn
        h = (ln(x) * (1 + m[1]) + m[0]).type_as(x)
        q, k = a.split(a.norm_q(a.q(h))), a.split(a.norm_k(a.k(h)))
        v = a.split(a.v(h))
        q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
        cached, store = cache_kv
        if store is not None:
            store(k, v)
        kk = torch.cat([c[0] for c in cached] + [k], 2)
        vv = torch.cat([c[1] for c in cached] + [v], 2)
        x = (x.float() + a.attend(q, kk, vv).float() * m[2]).type_as(x)
        c = self.cross_attn
        x = x + c.attend(c.split(c.norm_q(c.q(self.norm3(x.float()).type_as(x)))), *text_kv)
        y = self.ffn((ln(x) * (1 + m[4]) + m[3]).type_as(x))
        return (x.float() + y.float() * m[5]).type_as(x)


class RefCausalWan(nn.Module):
    """Eager streaming causal Wan2.1 with a frame-dict KV cache (sink + local window); Wan parameter names."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, cfg.patch_size, cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.num_layers))
        self.head = nn.Module()
        self.head.head = nn.Linear(d, cfg.out_channels * math.prod(cfg.patch_size))
        self.head.modulation = nn.Parameter(torch.zeros(1, 2, d))

    def rope(self, f0: int, f: int, h: int, w: int, device):
        """Wan's 3D RoPE angles: head_dim split into frame/height/width parts; [f*h*w, hd/2] cos, sin."""
        hd = self.cfg.hidden_size // self.cfg.num_attention_heads
        parts = (hd - 4 * (hd // 6), 2 * (hd // 6), 2 * (hd // 6))
        angs = []
        for part, pos, n in zip(parts, (torch.arange(f0, f0 + f), torch.arange(h), torch.arange(w)), (0, 1, 2)):
            inv = self.cfg.rope_theta ** (-torch.arange(0, part, 2, dtype=torch.float64) / part)
            a = torch.outer(pos.double(), inv)
            shape = [1, 1, 1, a.shape[-1]]
            shape[n] = a.shape[0]
            angs.append(a.view(shape).expand(f, h, w, -1))
        ang = torch.cat(angs, -1).reshape(f * h * w, -1).to(device)
        return ang.cos().float(), ang.sin().float()

    def text_kv(self, context):
        """Per-layer cross-attention K/V of a prompt, computed once: list of ([b,h,Lt,hd], [b,h,Lt,hd])."""
        c = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        return [(b.cross_attn.split(b.cross_attn.norm_k(b.cross_attn.k(c))), b.cross_attn.split(b.cross_attn.v(c)))
                for b in self.blocks]

    def forward(self, x, t, text_kv, *, frame_offset: int, cache: "RefCache", write: bool, head: bool = True):
        """x [b, C, F, H, W]; t [b] timesteps. Reads the cache's resident window; ``write`` stores this block."""
        cfg, dt = self.cfg, self.patch_embedding.weight.dtype
        half = cfg.freq_dim // 2
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=x.device) / half)
        ang = t.double()[:, None] * freqs
        e = self.time_embedding(torch.cat([ang.cos(), ang.sin()], 1).to(dt)).float()
        e0 = self.time_projection(e.to(dt)).float().unflatten(1, (6, -1))
        tok = self.patch_embedding(x.to(dt))
        b, _, f, h, w = tok.shape
        tok = tok.flatten(2).transpose(1, 2)
        cos, sin = self.rope(frame_offset, f, h, w, x.device)
        for i, blk in enumerate(self.blocks):
            store = (lambda k, v, i=i: cache.put(i, frame_offset, k, v)) if write else None
            tok = blk(tok, e0, cos, sin, text_kv[i], (cache.read(i, frame_offset), store))
        if not head:
            return None
        mod = self.head.modulation.float() + e[:, None]
        y = F.layer_norm(tok.float(), tok.shape[-1:], eps=cfg.layernorm_epsilon) * (1 + mod[:, 1:2]) + mod[:, 0:1]
        out = self.head.head(y.type_as(tok))  # [b, F*h*w, pt*ph*pw*C]
        pt, ph, pw = cfg.patch_size
        out = out.view(b, f, h, w, pt, ph, pw, cfg.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, cfg.out_channels, f * pt, h * ph, w * pw)


class RefCache:
    """Per layer a dict frame -> (k, v) [b, h, T, hd]; a block at frame s reads the sink frames and the
    ``local - F`` frames before s, concatenated every step (the plain approach)."""

    def __init__(self, num_layers: int, *, sink: int, local: int, frames_per_block: int):
        self.layers = [dict() for _ in range(num_layers)]
        self.sink, self.local, self.fpb = sink, local, frames_per_block

    def frames_for(self, start: int) -> list[int]:
        first = max(self.sink, start - (self.local - self.fpb))
        return list(range(min(self.sink, start))) + list(range(first, start))

    def read(self, layer: int, start: int):
        return [self.layers[layer][f] for f in self.frames_for(start)]

    def put(self, layer: int, start: int, k, v):
        d = self.layers[layer]
        for j, (kf, vf) in enumerate(zip(k.chunk(self.fpb, 2), v.chunk(self.fpb, 2))):
            d[start + j] = (kf, vf)
        keep = set(self.frames_for(start + self.fpb))
        for f in [f for f in d if f not in keep]:
            del d[f]


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters to ``dtype`` but keep affine LayerNorms in float32 (they take float32 inputs)."""
    model.to(dtype)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.float()
    return model


def reference_from(model, *, dtype: torch.dtype, device: torch.device) -> RefCausalWan:
    """A ``RefCausalWan`` holding ``model``'s weights, loaded through the ours -> Wan name mapping."""

    ref = RefCausalWan(model.config)
    # base weights only (under ``lora.merged`` they hold the folded adapters)
    sd = {base_name(k): v for k, v in gather_full_state_dict(model).items() if ".lora_" not in k}
    sd = convert_state_dict(sd, "ours", "wan", source_name="benchmark model")
    ref.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return cast_model(ref.to(device), dtype).eval()
