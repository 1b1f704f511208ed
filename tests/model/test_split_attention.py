"""Split attention (model/split_attention.py): equal to plain attention over [cache; current] in float64
(forward and gradients to q, k, v), no gradient to the cache, the Triton dq kernel (CPU interpreter) equal to
the PyTorch fallback, torch.compile, bad input; on the GPU, bf16 against torch SDPA (fwd + bwd)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kvpo_megatron.model import split_attention as sa


# (b, L, N, h, d): N = 0, L and N not multiples of any block (16, 32, 64) or of the key chunk (8), several
# heads, b > 1, a head dim that is not a power of two (24 -> a padded, masked BLOCK_D of 32 in Triton)
SHAPES = [(1, 5, 0, 1, 8), (2, 7, 13, 3, 16), (2, 33, 70, 2, 24), (1, 17, 1, 4, 8), (3, 20, 41, 2, 32)]


def reference(q, k, v, ck, cv, scale=None):
    """softmax(scale q [ck; k]^T) [cv; v] with the cache detached, written out: [b, L, h, d]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk, vv = torch.cat([ck.detach(), k], 1), torch.cat([cv.detach(), v], 1)
    s = torch.einsum("blhd,bnhd->bhln", q, kk) * scale
    return torch.einsum("bhln,bnhd->blhd", s.softmax(-1), vv)


def make(b, L, N, h, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(b, L, h, d, generator=g, dtype=dtype, device=device).requires_grad_() for _ in range(3))
    ck, cv = (torch.randn(b, N, h, d, generator=g, dtype=dtype, device=device) for _ in range(2))
    dout = torch.randn(b, L, h, d, generator=g, dtype=dtype, device=device)
    return q, k, v, ck, cv, dout


def out_and_grads(fn, q, k, v, ck, cv, dout):
    out = fn(q, k, v, ck, cv)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def max_err(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_split_equals_plain_attention_float64(shape, monkeypatch):
    monkeypatch.setattr(sa, "KEY_CHUNK", 8)  # several chunks of the fallback's online softmax / backward
    args = make(*shape)
    got = out_and_grads(lambda *a: sa.cached_attention(*a, fused="torch", kernels="torch"), *args)
    want = out_and_grads(reference, *args)
    assert max_err(got, want) < 1e-10
    assert all(float(w.abs().max()) > 1e-3 for w in want)  # nothing compared is trivially zero


def test_more_current_keys_than_queries_float64(monkeypatch):
    """CP all-gather: a rank's queries attend every rank's current keys (M > L), gradients to all of them."""
    monkeypatch.setattr(sa, "KEY_CHUNK", 8)
    q, _, _, ck, cv, dout = make(2, 7, 13, 3, 16)
    k, v = (t.requires_grad_() for t in make(2, 19, 0, 3, 16, seed=1)[1:3])
    got = out_and_grads(lambda *a: sa.cached_attention(*a, fused="torch", kernels="torch"), q, k, v, ck, cv, dout)
    want = out_and_grads(reference, q, k, v, ck, cv, dout)
    assert got[2].shape == (2, 19, 3, 16) and max_err(got, want) < 1e-10


def test_no_cache_is_plain_attention_and_scale_is_honoured():
    q, k, v, _, _, dout = make(2, 9, 0, 2, 8)
    got = out_and_grads(lambda q, k, v, *_: sa.cached_attention(q, k, v, scale=0.3, fused="torch"), q, k, v, None,
                        None, dout)
    empty = q.new_empty(2, 0, 2, 8)
    want = out_and_grads(lambda *a: reference(*a, scale=0.3), q, k, v, empty, empty, dout)
    assert max_err(got, want) < 1e-10


def test_cache_gets_no_gradient():
    q, k, v, ck, cv, dout = make(2, 6, 11, 2, 8)
    ck.requires_grad_(True)
    cv.requires_grad_(True)
    sa.cached_attention(q, k, v, ck, cv, fused="torch").backward(dout)
    assert ck.grad is None and cv.grad is None
    assert q.grad is not None and k.grad is not None and v.grad is not None
    # the same inputs through plain attention with a live cache do give it a gradient (the test can fail)
    kk, vv = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2))
    sdpa.transpose(1, 2).backward(dout)
    assert float(ck.grad.abs().max()) > 0


_INTERPRET_SCRIPT = r"""
import importlib.util, json, sys
import torch
spec = importlib.util.spec_from_file_location("split_attention", sys.argv[1])
sa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sa)
res = []
for dtype in (torch.float64, torch.float32, torch.float16):
    for shape in [(2, 37, 53, 3, 24), (1, 16, 16, 2, 16), (1, 5, 70, 1, 32)]:
        b, L, N, h, d = shape
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, L, h, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
        ck, cv, dout = (torch.randn(b, n, h, d, generator=g).to(dtype) for n in (N, N, L))
        got = {}
        for kern in ("triton", "torch"):
            out = sa.cached_attention(q, k, v, ck, cv, fused="torch", kernels=kern)
            got[kern] = (out, *torch.autograd.grad(out, (q, k, v), dout))
        t, f = got["triton"], got["torch"]
        rel = [float((a - b).double().norm() / b.double().norm()) for a, b in zip(t[1:], f[1:])]
        rel = [float((t[0] - f[0]).detach().double().norm() / f[0].detach().double().norm())] + rel
        res.append(dict(dtype=str(dtype), shape=shape, out=rel[0], dq=rel[1], dk=rel[2], dv=rel[3]))
print(json.dumps(res))
"""


def test_triton_kernels_interpreter_equal_fallback():
    """The Triton LSE-merge and dq-only kernels on CPU under TRITON_INTERPRET=1 (fixed 16 x 16 blocks: ragged L,
    N and a masked head dim) against the PyTorch fallback, float64 / float32 / float16 inputs. The interpreter
    must be on before triton is imported, hence a subprocess (it loads the module file alone, without megatron).
    The kernels compute in float32 (so ~1e-7 in float64); float16 rounds dS to float16 before dS K, as the GPU
    path does in bf16 (triton 3.9's interpreter computes tl.dot of bf16 operands on their raw bits, so bf16 is
    not tried)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT, sa.__file__], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    tol = {"torch.float64": 1e-6, "torch.float32": 1e-5, "torch.float16": 3e-3}
    assert len(res) == 9
    for r in res:
        assert max(r["out"], r["dq"], r["dk"], r["dv"]) < tol[r["dtype"]], r


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, ck, cv, _ = make(1, 4, 4, 1, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sa.cached_attention(q, k, v, ck, cv, kernels="triton")


def test_auto_picks_fallbacks_on_cpu():
    q = torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16)
    assert sa._pick_fused(q) == "torch" and sa._pick_kernels(q) == "torch"


def test_torch_compile_treats_the_op_as_one_call():
    """aot_eager runs dynamo + fake tensors + the registered autograd formula (no code generation)."""
    args = make(2, 10, 19, 2, 8)
    fn = torch.compile(lambda *a: sa.cached_attention(*a, fused="torch") * 2.0, backend="aot_eager", fullgraph=True)
    got = out_and_grads(fn, *args)
    want = out_and_grads(lambda *a: reference(*a) * 2.0, *args)
    assert max_err(got, want) < 1e-10


def test_custom_op_registration_passes_opcheck():
    q, k, v, ck, cv, _ = make(1, 6, 7, 2, 8)
    torch.library.opcheck(sa._fwd_op, (q, k, v, ck, cv, 0.25, "torch", "torch"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=torch.zeros(1, 4, 3, 8)), "q, k, v"),
    (dict(v=torch.zeros(1, 5, 2, 8)), "q, k, v"),
    (dict(ck=torch.zeros(1, 3, 2, 8), cv=None), "both"),
    (dict(ck=torch.zeros(1, 3, 1, 8), cv=torch.zeros(1, 3, 1, 8)), "ck, cv must be"),
    (dict(fused="fa3"), "fused"),
    (dict(kernels="cuda"), "kernels"),
])
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(q=torch.zeros(1, 4, 2, 8), k=torch.zeros(1, 4, 2, 8), v=torch.zeros(1, 4, 2, 8), ck=None, cv=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sa.cached_attention(**args)


def test_bench_attention_tiny_cpu_prints_one_json_line(capsys):
    from kvpo_megatron.benchmarks import attention as bench_attention

    res = bench_attention.main(["--device", "cpu", "--dtype", "fp64", "--batch", "1,2", "--tokens-per-frame", "8",
                                "--heads", "2", "--head-dim", "16", "--warmup", "1", "--iters", "2"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads(json.dumps(res))
    assert [r["batch"] for r in res["results"]] == [1, 2]
    for r in res["results"]:
        L, lk = 3 * 8, 12 * 8
        assert r["tflop_fwd"] == pytest.approx(4 * r["batch"] * L * lk * 16 * 2 / 1e12)
        assert r["max_rel_err_vs_plain"] < 1e-10  # float64: the split op equals plain SDPA
        for name in ("plain", "split"):
            assert r[name]["ms_fwd"] > 0 and r[name]["ms_bwd"] > 0
        assert r["speedup"] == pytest.approx(r["plain"]["ms_total"] / r["split"]["ms_total"], rel=1e-3)


# ---- GPU ---------------------------------------------------------------------------------------------------
def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.gpu
@pytest.mark.parametrize("fused", ["flash", "cudnn"])
@pytest.mark.parametrize("shape", [(2, 1000, 3000, 12, 128), (1, 4680, 14040, 12, 128), (2, 333, 777, 4, 64),
                                   (1, 500, 0, 12, 128)])
def test_gpu_bf16_against_sdpa(shape, fused):
    """bf16 on CUDA (Triton dq kernel). Reference: float32 SDPA on the same bf16 inputs. Tolerance: the
    relative Frobenius error of out, dq, dk, dv is at most 1.5 x that of bf16 torch SDPA over the
    concatenation, + 2e-3, and below 2e-2."""
    args = make(*shape, dtype=torch.bfloat16, device="cuda")
    ours = out_and_grads(lambda *a: sa.cached_attention(*a, fused=fused, kernels="triton"), *args)

    def sdpa(q, k, v, ck, cv):
        kk, vv = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        return F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)).transpose(1, 2)

    plain = out_and_grads(sdpa, *args)
    f32 = [a.detach().float().requires_grad_(a.requires_grad) for a in args]
    ref = out_and_grads(sdpa, *f32)
    for name, o, p, r in zip(("out", "dq", "dk", "dv"), ours, plain, ref):
        e_ours, e_plain = _rel(o, r), _rel(p, r)
        assert e_ours <= 1.5 * e_plain + 2e-3 and e_ours < 2e-2, (name, e_ours, e_plain)


def test_the_models_cached_core_uses_the_configured_split_attention(pgs, monkeypatch):
    """``model.overrides.split_attention`` reaches the cached self-attention core: a replay-style forward with grad
    under a filled cache calls the split attention with that backend (``torch`` here: the only one on the CPU),
    and a value that is not a backend is refused naming the field."""
    from kvpo_megatron import model as model_pkg
    from kvpo_megatron.errors import ConfigError
    from kvpo_megatron.model import CacheConfig, attention
    from kvpo_megatron.sampling import FlowMatchSampler, SamplerConfig, StreamingGenerator
    from tests.helpers import tiny_model

    seen = []

    def spy(*a, **kw):
        seen.append(kw.get("fused"))
        return sa.cached_attention(*a, **kw)

    monkeypatch.setattr(attention, "cached_attention", spy)
    m = tiny_model(pgs, split_attention="torch")
    gen = StreamingGenerator(m, FlowMatchSampler(SamplerConfig()), CacheConfig(history_frames=9))
    cache = gen.new_cache()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 12, 8, 8, generator=g)
    text = m.encode_text(torch.randn(1, 16, 32, generator=g))
    with torch.no_grad():
        for s in range(0, 9, 3):
            gen.commit_block(cache, x[:, :, s:s + 3], s, text)
    view = cache.view(CacheConfig().default_read_frames(9))
    m(x[:, :, 9:12], torch.tensor([500.0]), text=text, frame_offset=9, cache=cache, view=view).sum().backward()
    assert seen == ["torch"] * m.config.num_layers
    with pytest.raises(ConfigError, match="model.overrides.split_attention"):
        model_pkg.model_config("tiny", split_attention="flash2")
