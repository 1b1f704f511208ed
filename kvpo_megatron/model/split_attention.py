"""Attention of a block of current tokens over [detached cached K/V ; its own K/V], with no cache gradient.

``cached_attention(q, k, v, ck, cv)`` equals ``softmax(scale * q [ck; k]^T) [cv; v]`` (no mask), but its
backward never computes dK/dV for the cached keys ``ck``/``cv`` (they are constants: no gradient reaches
them even if they require one). The cached part of the backward then costs a dQ-only pass (3 matmuls per
key block instead of 5), which removes ~30% of the attention backward at the replay's shape (9 cached +
3 current frames).

Forward: two parts merged exactly by log-sum-exp. With ``O_c, lse_c`` the attention of q over the cache and
``O_n, lse_n`` over the current block (per query row),

    lse = logaddexp(lse_c, lse_n),  O = exp(lse_c - lse) O_c + exp(lse_n - lse) O_n.

Backward (one op for the whole thing). Write ``P_j = exp(S_j - lse)`` with ``S_j = scale q.k_j`` for every
key j of [cache; current], ``D = rowsum(dO * O)``. Plain attention's gradient is

    dS_j = P_j (dO.v_j - D),   dq = scale sum_j dS_j k_j,   dk_j = scale sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i.

``P_j`` needs only the merged lse, so the sum over j splits by key range:

* current keys: a standard flash backward over (q, k, v) handed the *merged* O and lse (it recomputes P from
  the lse it is given and D from O and dO) returns exactly dq_current, dk, dv;
* cached keys: only ``dq_cached = scale sum_{j in cache} P_j (dO.v_j - D) k_j`` (recompute S, P; dP = dO V^T;
  dS = P (dP - D); dq += dS K), the dQ-only kernel below; ``dq = dq_current + dq_cached``.

This equals differentiating the merge through (O_c, lse_c, O_n, lse_n): with ``w_p = exp(lse_p - lse)`` the
merge gives each part ``dO_p = w_p dO`` and ``dlse_p = w_p (rowsum(dO * O_p) - D)``; the part's own backward
then has ``dS_j = P^p_j w_p (dO.v_j - rowsum(dO * O_p)) + P^p_j dlse_p = w_p P^p_j (dO.v_j - D) = P_j (dO.v_j - D)``.

Implementations (picked automatically, or forced by ``fused=`` / ``kernels=``):

* per-part forward/backward: ``"flash"`` (torch's fused flash-attention ops, CUDA fp16/bf16, head dim <= 256
  and a multiple of 8), ``"cudnn"`` (torch's cuDNN attention ops; opt-in), or ``"torch"`` (chunked over keys,
  online softmax, accumulation in float32 or float64: every device and dtype);
* the LSE merge and the dQ-only backward over the cache (``kernels=``): ``"triton"`` (an element-wise merge
  kernel; a FlashAttention-2-style dq kernel that also forms D from dO and O; CUDA, or CPU under
  ``TRITON_INTERPRET=1``) or ``"torch"`` (element-wise torch ops; chunked over keys).

The two ops are ``torch.library`` custom ops, so ``torch.compile`` treats the attention as one opaque call.
Use it where the cache needs no gradient (it never gets one here); the first CUDA call autotunes the dq kernel
(a few compiles, once per process and head dim), so make that call on one thread before several threads use it.
"""
import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch; the torch fallback runs without it
    import types

    triton, tl = None, types.SimpleNamespace(constexpr=None)  # lets the kernel's signature be defined

KEY_CHUNK = 512
"""Keys per step of the pure-PyTorch parts (memory: a few [b, h, L, KEY_CHUNK] float32 temporaries)."""

FUSED_CHOICES = ("auto", "flash", "cudnn", "torch")
KERNEL_CHOICES = ("auto", "triton", "torch")


# ---- public entry point ----------------------------------------------------------------------------------
def cached_attention(q: Tensor, k: Tensor, v: Tensor, ck: Tensor | None = None, cv: Tensor | None = None, *,
                     scale: float | None = None, fused: str = "auto", kernels: str = "auto") -> Tensor:
    """Attention of q over [ck; k] / [cv; v] whose backward gives no gradient to ``ck``, ``cv``.

    Args:
        q, k, v: [b, L, h, d] queries and [b, M, h, d] keys/values of the current block (may require grad; k, v
            get gradients); M = L, or M > L when every rank's queries attend all ranks' current keys (CP
            all-gather).
        ck, cv: [b, N, h, d] cached keys/values, treated as constants (detached). None or N = 0: plain
            attention over the current block.
        scale: softmax scale; default ``1 / sqrt(d)``.
        fused: per-part attention implementation, one of ``FUSED_CHOICES`` (``"auto"``: flash where
            supported, else torch).
        kernels: the LSE merge and the dQ-only backward over the cache, one of ``KERNEL_CHOICES``
            (``"auto"``: triton on CUDA fp16/bf16, else torch).

    Returns:
        [b, L, h, d] in q's dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q, k, v must be [b, L, h, d], [b, M, h, d], [b, M, h, d] (CP all-gather: M > L); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, _, h, d = q.shape
    if (ck is None) != (cv is None):
        raise ValueError("ck and cv must both be given or both be None")
    if ck is None:
        ck = cv = q.new_empty(b, 0, h, d)
    if ck.dim() != 4 or ck.shape != cv.shape or ck.shape[0] != b or tuple(ck.shape[2:]) != (h, d):
        raise ValueError(f"ck, cv must be [b={b}, N, h={h}, d={d}]; got ck {tuple(ck.shape)}, cv {tuple(cv.shape)}")
    if fused not in FUSED_CHOICES:
        raise ValueError(f"fused must be one of {FUSED_CHOICES}; got {fused!r}")
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}; got {kernels!r}")
    ck, cv = ck.detach().to(q.dtype), cv.detach().to(q.dtype)
    k, v = k.to(q.dtype), v.to(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    fused = _pick_fused(q) if fused == "auto" else fused
    kernels = _pick_kernels(q) if kernels == "auto" else kernels
    out, _ = _fwd_op(q, k, v, ck, cv, scale, fused, kernels)
    return out


def _pick_fused(q: Tensor) -> str:
    d = q.shape[-1]
    ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
    return "flash" if ok else "torch"


def _pick_kernels(q: Tensor) -> str:
    ok = triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    return "triton" if ok else "torch"


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# ---- the two custom ops ----------------------------------------------------------------------------------
@torch.library.custom_op("kvpo::cached_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, ck: Tensor, cv: Tensor, scale: float, fused: str,
            kernels: str) -> tuple[Tensor, Tensor]:
    """-> (out [b, L, h, d] in q's dtype, lse [b, h, L] float32/64 of the merged attention)."""
    qh, kh, vh, ckh, cvh = (_heads_first(t, fused) for t in (q, k, v, ck, cv))
    o_n, lse_n = _part_fwd(qh, kh, vh, scale, fused)
    if ck.shape[1] == 0:
        out, lse = o_n, lse_n
    else:
        o_c, lse_c = _part_fwd(qh, ckh, cvh, scale, fused)
        if kernels == "triton":
            return _triton_merge(o_c, lse_c, o_n, lse_n, q.dtype)
        lse = torch.logaddexp(lse_c, lse_n)
        acc = _acc_dtype(q)
        out = (torch.exp(lse_c - lse).unsqueeze(-1) * o_c.to(acc)
               + torch.exp(lse_n - lse).unsqueeze(-1) * o_n.to(acc))
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.to(_acc_dtype(q)).contiguous()


@_fwd_op.register_fake
def _(q, k, v, ck, cv, scale, fused, kernels):
    b, L, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, L), dtype=_acc_dtype(q))


@torch.library.custom_op("kvpo::cached_attention_bwd", mutates_args=())
def _bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, ck: Tensor, cv: Tensor, out: Tensor, lse: Tensor,
            scale: float, fused: str, kernels: str) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv), each [b, L, h, d] like q, k, v. No gradient for ck, cv is computed."""
    acc, cached = _acc_dtype(q), ck.shape[1] > 0
    qh, kh, vh, ckh, cvh = (_heads_first(t, fused) for t in (q, k, v, ck, cv))
    oh = out.transpose(1, 2)                                   # [b, h, L, d], out is contiguous [b, L, h, d]
    doh = dout.to(q.dtype).contiguous().transpose(1, 2)        # same strides as oh (cuDNN wants that)
    delta = None                                               # D = rowsum(dO * O) [b, h, L] for torch paths
    if fused == "torch" or (cached and kernels == "torch"):
        delta = (doh.to(acc) * oh.to(acc)).sum(-1)
    # 1. current block: a full backward handed the merged out and lse -> dq_current, dk, dv
    if fused == "torch":
        dq, dk, dv = _torch_part_bwd(doh, qh, kh, vh, lse, delta, scale, need_kv=True)
    else:
        dq, dk, dv = _fused_part_bwd(doh, qh, kh, vh, oh, lse, scale, fused)
    # 2. cached keys: dq only, accumulated onto dq_current
    if cached:
        if kernels == "triton":
            dq = _triton_dq(doh, qh, ckh, cvh, oh, lse, scale, dq_init=dq)
        else:
            dq = dq.to(acc) + _torch_part_bwd(doh, qh, ckh, cvh, lse, delta, scale, need_kv=False)[0]
    return tuple(g.to(t.dtype).transpose(1, 2).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


@_bwd_op.register_fake
def _(dout, q, k, v, ck, cv, out, lse, scale, fused, kernels):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, ck, cv, scale, fused, kernels = inputs
    ctx.save_for_backward(q, k, v, ck, cv, *output)
    ctx.args = (scale, fused, kernels)


def _backward(ctx, dout, _dlse):
    q, k, v, ck, cv, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, ck, cv, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _heads_first(t: Tensor, fused: str) -> Tensor:
    """[b, L, h, d] -> [b, h, L, d] view (fused kernels need a unit stride on d)."""
    if fused != "torch" and t.stride(-1) != 1:
        t = t.contiguous()
    return t.transpose(1, 2)


# ---- per-part attention: fused torch ops ---------------------------------------------------------------
def _part_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, fused: str) -> tuple[Tensor, Tensor]:
    """[b, h, Lq, d] x [b, h, Lk, d] -> (out [b, h, Lq, d], lse [b, h, Lq] float32/64, natural log)."""
    if fused == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return res[0], res[1]
    if fused == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                 scale=scale)
        return res[0], res[1].reshape(q.shape[:3])  # cuDNN keeps a trailing 1: [b, h, Lq, 1]
    if fused == "torch":
        return _torch_part_fwd(q, k, v, scale)
    raise ValueError(f"fused must be one of {FUSED_CHOICES[1:]}; got {fused!r}")


def _fused_part_bwd(do, q, k, v, out, lse, scale, fused):
    """Backward of the current block handed the merged (out, lse): -> (dq, dk, dv) [b, h, *, d]."""
    Lq, Lk = q.shape[2], k.shape[2]
    if fused == "flash":
        # dropout_p = 0: the philox seed/offset are not read (torch's flash backward uses them only with dropout)
        unused = torch.empty((), dtype=torch.long)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, None, None, Lq, Lk, 0.0, False, unused, unused, scale=scale)
    unused = torch.zeros((), dtype=torch.long, device=q.device)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse.unsqueeze(-1), unused, unused, None, None, None, Lq, Lk, 0.0, False, scale=scale)[:3]


# ---- per-part attention: pure PyTorch (chunked over keys) -------------------------------------------------
def _torch_part_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Online-softmax attention over key chunks; out and lse in float32 (float64 for float64 inputs)."""
    acc = _acc_dtype(q)
    qf = q.to(acc)
    m = qf.new_full(q.shape[:3], -math.inf)        # running row max      [b, h, L]
    den = qf.new_zeros(q.shape[:3])                # running sum exp      [b, h, L]
    num = qf.new_zeros(q.shape[:3] + v.shape[-1:])  # running sum exp * v [b, h, L, d]
    for s in range(0, k.shape[2], KEY_CHUNK):
        kc, vc = k[:, :, s:s + KEY_CHUNK].to(acc), v[:, :, s:s + KEY_CHUNK].to(acc)
        sc = (qf @ kc.transpose(-1, -2)) * scale   # [b, h, L, c]
        m_new = torch.maximum(m, sc.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(sc - m_new.unsqueeze(-1))
        den = den * alpha + p.sum(-1)
        num = num * alpha.unsqueeze(-1) + p @ vc
        m = m_new
    return num / den.unsqueeze(-1), m + torch.log(den)


def _torch_part_bwd(do, q, k, v, lse, delta, scale, *, need_kv: bool):
    """Attention backward restricted to the keys k, v given the merged lse and D = rowsum(dO * O).
    -> (dq, dk, dv) in float32/64 (dk, dv None when not ``need_kv``)."""
    acc = _acc_dtype(q)
    qf, dof = q.to(acc), do.to(acc)
    dq = torch.zeros_like(qf)
    dks, dvs = [], []
    for s in range(0, k.shape[2], KEY_CHUNK):
        kc, vc = k[:, :, s:s + KEY_CHUNK].to(acc), v[:, :, s:s + KEY_CHUNK].to(acc)
        p = torch.exp((qf @ kc.transpose(-1, -2)) * scale - lse.unsqueeze(-1))  # [b, h, L, c]
        ds = p * (dof @ vc.transpose(-1, -2) - delta.unsqueeze(-1))
        dq += ds @ kc
        if need_kv:
            dks.append(ds.transpose(-1, -2) @ qf * scale)
            dvs.append(p.transpose(-1, -2) @ dof)
    dq *= scale
    if not need_kv:
        return dq, None, None
    empty = k.new_zeros(k.shape, dtype=acc)
    return dq, (torch.cat(dks, 2) if dks else empty), (torch.cat(dvs, 2) if dvs else empty)


# ---- Triton kernels: LSE merge (forward) and dQ-only backward over the cache ---------------------------------
# Every [b, h, seq, d] tensor is addressed by its 4 strides (any layout); LSE tensors are contiguous [b, h, L]
# float32. The batch index is widened to int64 before it multiplies a stride (tensors past 2^31 elements).


def _merge_kernel(OC, ON, LC, LN, OUT, LSE,
                  soc_b, soc_h, soc_m, soc_d, son_b, son_h, son_m, son_d, so_b, so_h, so_m, so_d,
                  H, L, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """OUT = w_c OC + w_n ON, LSE = log(exp(LC) + exp(LN)), w_p = exp(L_p - LSE); math in float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    ob = (pid_bh // H).to(tl.int64)
    oh = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    md_ok = m_ok[:, None] & (offs_d < HEAD_D)[None, :]
    lc = tl.load(LC + pid_bh * L + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    ln = tl.load(LN + pid_bh * L + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    mx = tl.maximum(lc, ln)
    wc = tl.exp(lc - mx)
    wn = tl.exp(ln - mx)
    den = wc + wn
    oc = tl.load(OC + ob * soc_b + oh * soc_h + offs_m[:, None] * soc_m + offs_d[None, :] * soc_d, mask=md_ok,
                 other=0.0).to(tl.float32)
    on = tl.load(ON + ob * son_b + oh * son_h + offs_m[:, None] * son_m + offs_d[None, :] * son_d, mask=md_ok,
                 other=0.0).to(tl.float32)
    out = oc * (wc / den)[:, None] + on * (wn / den)[:, None]
    tl.store(OUT + ob * so_b + oh * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d,
             out.to(OUT.dtype.element_ty), mask=md_ok)
    tl.store(LSE + pid_bh * L + offs_m, (mx + tl.log(den)).to(LSE.dtype.element_ty), mask=m_ok)


def _dq_kernel(Q, K, V, DO, O, LSE, DQ_IN, DQ,
               sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
               sdo_b, sdo_h, sdo_m, sdo_d, so_b, so_h, so_m, so_d, sdi_b, sdi_h, sdi_m, sdi_d,
               sdq_b, sdq_h, sdq_m, sdq_d, H, L, N, scale,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (query block, batch*head) program: DQ = DQ_IN + scale * sum over key blocks of dS K, with
    P = exp(scale Q K^T - LSE), dP = DO V^T, dS = P (dP - D), D = rowsum(DO * O). Matmuls accumulate in
    float32 (also for float64 inputs, which only the CPU interpreter tests use); dS is cast to K's dtype
    for dS K, as FlashAttention does."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    ob = (pid_bh // H).to(tl.int64)
    oh = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + ob * sq_b + oh * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d, mask=md_ok, other=0.0)
    do = tl.load(DO + ob * sdo_b + oh * sdo_h + offs_m[:, None] * sdo_m + offs_d[None, :] * sdo_d,
                 mask=md_ok, other=0.0)
    o = tl.load(O + ob * so_b + oh * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d, mask=md_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)                    # D [M]
    lse2 = tl.load(LSE + pid_bh * L + offs_m, mask=m_ok, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
    qk_scale = scale * 1.4426950408889634                                            # exp(x) = exp2(x log2 e)
    k_base = K + ob * sk_b + oh * sk_h
    v_base = V + ob * sv_b + oh * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < N
        nd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * sk_n + offs_d[None, :] * sk_d, mask=nd_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_n + offs_d[None, :] * sv_d, mask=nd_ok, other=0.0)
        s = tl.dot(q, tl.trans(k))                                                   # [M, N] float32
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(n_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))                                                 # [M, N] float32
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)                                              # [M, D] float32
    dq = dq * scale
    dq += tl.load(DQ_IN + ob * sdi_b + oh * sdi_h + offs_m[:, None] * sdi_m + offs_d[None, :] * sdi_d,
                  mask=md_ok, other=0.0).to(tl.float32)
    tl.store(DQ + ob * sdq_b + oh * sdq_h + offs_m[:, None] * sdq_m + offs_d[None, :] * sdq_d,
             dq.to(DQ.dtype.element_ty), mask=md_ok)


# dq kernel (BLOCK_M, BLOCK_N, num_warps, num_stages), autotuned once per head dim. Compiled offline for sm_90 at
# d = 128 (triton 3.9): all use wgmma; 64x64/4 warps needs ~195 registers and no spill, 128x64/8 warps spills
# ~100 bytes, 64x32/4 warps (~150 registers, 48 KB shared) is the small fallback. Each config costs a compile.
_DQ_CONFIGS = [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)]
_MERGE_BLOCK_M = 32
_INTERPRET_BLOCK = 16
_kernels: dict[str, object] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel(name: str, ref: Tensor):
    """The jitted kernel ``name`` ('dq' autotuned on the GPU); under TRITON_INTERPRET an interpreted one
    (the interpreter must be on before triton is imported: set the variable before starting Python)."""
    if triton is None:
        raise RuntimeError("kernels='triton' needs triton installed")
    interpret = _interpreting()
    if not ref.is_cuda and not interpret:
        raise RuntimeError("kernels='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    key = name + ("/interpret" if interpret else "")
    if key not in _kernels:
        fn = {"dq": _dq_kernel, "merge": _merge_kernel}[name]
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            _kernels[key] = InterpretedFunction(fn)
        elif name == "dq":
            configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                       for m, n, w, s in _DQ_CONFIGS]
            _kernels[key] = triton.autotune(configs, key=["HEAD_D", "BLOCK_D"])(triton.jit(fn))
        else:
            _kernels[key] = triton.jit(fn)
    return _kernels[key]


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _triton_merge(o_c, lse_c, o_n, lse_n, dtype):
    """-> (out [b, L, h, d] contiguous in dtype, lse [b, h, L]); o_* [b, h, L, d], lse_* [b, h, L]."""
    kernel = _kernel("merge", o_c)
    b, h, L, d = o_c.shape
    out = torch.empty((b, L, h, d), dtype=dtype, device=o_c.device)
    lse = torch.empty((b, h, L), dtype=torch.promote_types(dtype, torch.float32), device=o_c.device)
    outh = out.transpose(1, 2)
    block = _INTERPRET_BLOCK if _interpreting() else _MERGE_BLOCK_M
    kernel[(triton.cdiv(L, block), b * h)](
        o_c, o_n, lse_c.contiguous(), lse_n.contiguous(), outh, lse, *o_c.stride(), *o_n.stride(), *outh.stride(),
        h, L, HEAD_D=d, BLOCK_D=_block_d(d), BLOCK_M=block)
    return out, lse


def _triton_dq(do, q, ck, cv, o, lse, scale, *, dq_init):
    """dq_init + dQ of the cached part -> [b, h, L, d] view of a contiguous [b, L, h, d] in q's dtype."""
    kernel = _kernel("dq", q)
    b, h, L, d = q.shape
    dq = q.new_empty((b, L, h, d)).transpose(1, 2)
    args = (q, ck, cv, do, o, lse.float().contiguous(), dq_init, dq, *q.stride(), *ck.stride(), *cv.stride(),
            *do.stride(), *o.stride(), *dq_init.stride(), *dq.stride(), h, L, ck.shape[2], scale)
    meta = dict(HEAD_D=d, BLOCK_D=_block_d(d))
    if _interpreting():
        kernel[(triton.cdiv(L, _INTERPRET_BLOCK), b * h)](*args, **meta, BLOCK_M=_INTERPRET_BLOCK,
                                                          BLOCK_N=_INTERPRET_BLOCK)
    else:
        kernel[lambda m: (triton.cdiv(L, m["BLOCK_M"]), b * h)](*args, **meta)
    return dq
