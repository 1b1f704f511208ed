"""TransformerEngine layer spec: TE linears, TE fused attention (bf16 or FP8) and TE RMSNorm for q/k.

Pieces (``te_spec(cfg)`` hands them to ``model/specs.py`` ``block_spec``, the local spec's block builder):

* linears: megatron-core's ``TEColumnParallelLinear``/``TERowParallelLinear`` (parameter names ``weight``/``bias``,
  so checkpoints and ``checkpoint/mappings.py`` are unchanged);
* attention cores: TE ``DotProductAttention`` (``bshd``, no mask; cuDNN fused attention on Hopper) for the cached
  self-attention (same contract as ``CachedSDPA``: read the view's frames, then write the commit pass's K/V,
  attend to ``[cached; current]``) and for cross-attention;
* q/k norm: TE ``RMSNorm`` over the full width when TP == 1 (under TP the statistics need the all-reduce of
  ``FullDimRMSNorm``, which is kept);
* context parallelism: the CP token plan and the Ulysses all-to-all core of ``parallel/cp_attention.py`` around a
  ``TECachedAttention`` of ``h/(TP*CP)`` heads (everything else is token-wise and unchanged).

Precision, per module group, from config fields of megatron's ``TransformerConfig``:
``fp8`` (``e4m3``/``hybrid``; None = everything bf16), ``fp8_recipe`` (``tensorwise`` = current scaling,
``delayed``), ``fp8_dot_product_attention`` (FP8 fused attention, self and cross). Which linears run in FP8 is
``te_spec(cfg, fp8_linears=...)`` (default: all groups when ``cfg.fp8`` is set and
``fp8_dot_product_attention`` is off, none when it is on). FP8 linears lose at Wan-1.3B widths (1536) and win
at 14B widths, hence the per-group choice.

Delayed scaling normally updates its scales only when autograd is on; the FP8 wrappers here also update them in
no-grad rollouts (the first call of a module then runs with scale 1, later calls with the previous amax).

Fast path of the cached core: the gathered context ``[cached frames of the view; current tokens]`` lives in a
per-layer buffer that is reused while the page buffer, its version counter and the view's pages are unchanged
(the solver steps of a block read the same pages): one gather per block instead of one gather plus one
concatenation per step. Inside a CUDA graph capture every replay gathers (plain concatenation). With autograd
on (the replay), the cached part and the current block are attended separately and merged by log-sum-exp
(``model/split_attention.py``), so the detached cache costs no dK/dV.

Under torch.compile the TE calls are opaque (each one a graph break, each break one more compiled region with its
own host cost). The replay -- forwards with autograd, and the no-grad scoring under ``replay_attention`` that must
compute the same function -- is host-bound on an H200 with them (``tools/BENCHMARKS.md``), so with
``model.te_compile=replay`` (``accelerate`` sets :attr:`ReplayTraceable.trace_replay`) the bf16 linears, the q/k
norms and the text attention of those forwards run their torch equivalents instead (``F.linear``, an RMSNorm in
float32 as TE computes it, SDPA), which dynamo traces and inductor fuses; only the cached self-attention core stays
opaque. The no-grad rollout, FP8 modules and TP > 1 keep TE.
TransformerEngine is imported lazily: without it this module imports, and ``te_spec`` raises ``ConfigError``.
"""
from __future__ import annotations

import contextlib
import weakref
from enum import StrEnum
from functools import lru_cache

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import nn

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model.attention import replay_attention_active, sdpa, uses_replay_kernel
from kvpo_megatron.model.kv_cache import LayerKV
from kvpo_megatron.model.split_attention import cached_attention
from kvpo_megatron.model.specs import CausalWanSubmodules, NoTokenSharding, block_spec
from kvpo_megatron.parallel.collectives import group_size
from kvpo_megatron.parallel.cp_attention import CPTokenSharding, UlyssesCachedAttention
from kvpo_megatron.parallel.layout import CPAttention
from kvpo_megatron.parallel.norms import FullDimRMSNorm


class LinearGroup(StrEnum):
    """Groups of linears whose precision is chosen together."""

    self_attn = "self_attn"  # q, k, v, o of self-attention
    cross_attn = "cross_attn"  # q, k, v, o of cross-attention (k, v run once per prompt)
    ffn = "ffn"  # fc1, fc2


class TECompile(StrEnum):
    """What the TE spec's modules do under torch.compile (``model.te_compile``)."""

    opaque = "opaque"  # every TE call is excluded from compilation (a graph break)
    replay = "replay"  # the replay's bf16 forwards trace torch equivalents (module docstring)


class ReplayTraceable:
    """Mixin of the TE modules that have a torch equivalent dynamo can trace (module docstring).

    :meth:`traced` is evaluated while dynamo traces (its inputs become guards): True inside torch.compile when
    ``trace_replay`` is set, the module runs in bf16 (no active FP8 recipe) and the forward is the replay's
    (autograd on, or the replay kernel active for its no-grad scoring)."""

    trace_replay: bool = False
    """Set by ``accelerate`` for ``model.compile`` with ``model.te_compile=replay`` and TP == 1."""

    def traced(self) -> bool:
        if not (self.trace_replay and torch.compiler.is_compiling()):  # te_compile=opaque adds no guards
            return False
        fp8 = getattr(self, "fp8_recipe", None) is not None and getattr(self, "fp8_active", False)
        return not fp8 and (torch.is_grad_enabled() or replay_attention_active())

    def opaque_under_compile(self) -> bool:
        """Whether this call is excluded from compilation (LoRA then runs its adapter in the same eager call)."""
        return not self.traced()


def traced_linear(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A TE linear's bf16 forward in torch ops with megatron's TE contract: ``(x W^T + b, None)``, or
    ``(x W^T, b)`` for a layer that returns its bias (``skip_bias_add``)."""
    bias = getattr(module, "bias", None)
    if bias is not None and bias.numel() == 0:  # TE keeps an empty tensor when the layer has no bias
        bias = None
    if getattr(module, "te_return_bias", False):
        return F.linear(x, module.weight), bias
    return F.linear(x, module.weight, bias), None


class TELinearCall(ReplayTraceable):
    """The call of the TE spec's linears (mixed in before megatron's TE linear): the traced torch equivalent when
    :meth:`traced`, else the TE forward, excluded from compilation, in FP8 when the module's recipe is active.
    Needs ``fp8_recipe`` and ``fp8_active`` on the module."""

    def forward(self, x):
        return traced_linear(self, x) if self.traced() else self._te_forward(x)

    @torch.compiler.disable
    def _te_forward(self, x):
        with quantized(self.fp8_recipe if self.fp8_active else None):
            return super().forward(x)


def traced_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """TE's RMSNorm in torch ops: statistics, scaling and the gain in float32, the result in ``x``'s dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def _te():
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("model.spec=te needs TransformerEngine (pip install 'transformer-engine[pytorch]'); "
                          "use model.spec=local without it") from e
    return te


def fp8_recipe(cfg, *, dpa: bool):
    """TE recipe from ``cfg.fp8`` (format) and ``cfg.fp8_recipe`` (``tensorwise`` | ``delayed``)."""
    from transformer_engine.common import recipe

    formats = {"e4m3": recipe.Format.E4M3, "hybrid": recipe.Format.HYBRID}
    if cfg.fp8 not in formats:
        raise ConfigError(f"model.fp8 must be one of {sorted(formats)} for FP8 modules, got {cfg.fp8!r}")
    fmt = formats[cfg.fp8]
    if cfg.fp8_recipe == "delayed":
        return recipe.DelayedScaling(fp8_format=fmt, amax_history_len=cfg.fp8_amax_history_len,
                                     amax_compute_algo=cfg.fp8_amax_compute_algo, fp8_dpa=dpa)
    if cfg.fp8_recipe == "tensorwise":
        return recipe.Float8CurrentScaling(fp8_format=fmt, fp8_dpa=dpa)
    raise ConfigError(f"model.fp8_recipe must be 'tensorwise' or 'delayed' for the te spec, got {cfg.fp8_recipe!r}")


@contextlib.contextmanager
def quantized(recipe):
    """Run the enclosed TE module call in FP8 under ``recipe`` (no-op for None).

    Delayed-scaling amax/scale updates happen at the exit of TE's autocast only with grad enabled; in no-grad
    calls grad mode is switched on around the autocast and off again inside it, so rollouts update them too."""
    if recipe is None:
        yield
        return
    te = _te()
    if torch.is_grad_enabled():
        with te.autocast(enabled=True, recipe=recipe):
            yield
    else:
        with torch.enable_grad(), te.autocast(enabled=True, recipe=recipe), torch.no_grad():
            yield


@lru_cache(maxsize=None)
def _te_classes():
    """TE-backed module classes (built on first use so that importing this file never needs TE)."""
    te = _te()
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    class TEColumnLinear(TELinearCall, TEColumnParallelLinear):
        """Column-parallel TE linear with the local spec's call signature; optional FP8 recipe."""

        def __init__(self, input_size, output_size, *, config, init_method, bias, gather_output=False,
                     tp_group=None, fp8_recipe=None):
            super().__init__(input_size, output_size, config=config, init_method=init_method,
                             gather_output=gather_output, bias=bias, skip_bias_add=False, is_expert=False,
                             tp_group=tp_group)
            self.fp8_recipe = fp8_recipe
            self.fp8_active = True  # accelerate.fp8_enabled switches it per region
            self.disable_parameter_transpose_cache = True  # weights may change between calls (LoRA, training)
            # megatron ColumnParallelLinear's attributes, which the LoRA layers read (full sizes, group)
            self.gather_output, self.input_size, self.output_size = gather_output, input_size, output_size
            self.tp_group = self._tp_group

    class TERowLinear(TELinearCall, TERowParallelLinear):
        """Row-parallel TE linear with the local spec's call signature; optional FP8 recipe."""

        def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel=True,
                     skip_bias_add=False, tp_group=None, fp8_recipe=None):
            super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                             input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add, is_expert=False,
                             tp_group=tp_group)
            self.fp8_recipe = fp8_recipe
            self.fp8_active = True  # accelerate.fp8_enabled switches it per region
            self.disable_parameter_transpose_cache = True
            # megatron RowParallelLinear's attributes, which the LoRA layers read (full sizes, group)
            self.input_is_parallel, self.input_size, self.output_size = input_is_parallel, input_size, output_size
            self.tp_group = self._tp_group

    class TEQKRMSNorm(ReplayTraceable, te.RMSNorm):
        """TE RMSNorm over the full width (TP == 1 only; ``te_spec`` picks ``FullDimRMSNorm`` under TP)."""

        def __init__(self, hidden_size, eps, *, tp_group=None, device="cpu", dtype=torch.float32):
            if group_size(tp_group) != 1:
                raise ConfigError("TE q/k RMSNorm needs tensor_model_parallel_size == 1")
            super().__init__(hidden_size, eps=eps, device=device, dtype=dtype)
            self.norm_eps = eps

        def forward(self, x):
            return traced_rms_norm(x, self.weight, self.norm_eps) if self.traced() else self._te_forward(x)

        @torch.compiler.disable
        def _te_forward(self, x):
            return super().forward(x)

    return TEColumnLinear, TERowLinear, TEQKRMSNorm


def te_linear_classes():
    """The TE spec's (column, row) parallel linear classes (raises ``ConfigError`` without TransformerEngine)."""
    column, row, _ = _te_classes()
    return column, row


def _dpa(config, pg_collection, heads: int | None = None):
    heads = heads or config.num_attention_heads // group_size(getattr(pg_collection, "tp", None))
    return _te().DotProductAttention(heads, config.head_dim, attention_dropout=0.0, qkv_format="bshd",
                                     attn_mask_type="no_mask", attention_type="cross")


class TECachedAttention(nn.Module):
    """Cached self-attention core on TE fused attention (contract of ``CachedSDPA``). ``heads``: the heads it
    attends (default: all heads of this TP rank; under Ulysses CP the spec gives ``h/(TP*CP)``)."""

    def __init__(self, config, pg_collection=None, fp8_recipe=None, heads: int | None = None):
        super().__init__()
        self.attn = _dpa(config, pg_collection, heads)
        self.split_attention = config.split_attention
        self.fp8_recipe = fp8_recipe
        self.fp8_active = True
        self._ctx_key = None
        self._ctx_src = None  # weakref to the page buffer the context was gathered from
        self._ctx = None  # (k, v) buffers [b, n*T + L, h, d]; the first n*T rows hold the gathered frames

    def forward(self, q, k, v, *, kv: LayerKV | None = None, attn_mask=None):
        """q, k, v: [b, L, h, d] -> [b, L, h, d]."""
        if attn_mask is not None:  # full-sequence mode with a mask: torch SDPA (TE arbitrary masks are slower)
            if kv is not None and kv.view.read_slots.numel():
                raise ValueError("attn_mask is only supported without a KV cache (full-sequence mode)")
            if kv is not None:
                kv.write(k, v)
            return sdpa(q, k, v, attn_mask)
        if kv is not None and uses_replay_kernel(q, k, v):
            ctx = kv.read(q)  # replay: no gradient flows into the detached cache (model/split_attention.py)
            kv.write(k, v)
            if ctx is not None:
                return cached_attention(q, k, v, ctx[0].to(k.dtype), ctx[1].to(v.dtype), fused=self.split_attention)
        elif kv is not None:
            k, v = self._with_context(kv, q, k, v)
        with quantized(self.fp8_recipe if self.fp8_active else None):
            out = self.attn(q, k, v)
        return out.view(q.shape)

    forward = torch.compiler.disable(forward)  # TE calls and the context cache stay eager under torch.compile

    def _with_context(self, kv: LayerKV, q, k, v):
        """Read (before write) the view's cached frames and return [cached; current] K and V."""
        if kv.view.read_slots.numel() == 0:
            kv.write(k, v)
            return k, v
        if k.is_cuda and torch.cuda.is_current_stream_capturing():  # a CUDA graph gathers on every replay
            ck, cv = kv.read(q)
            kv.write(k, v)
            return torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        src = kv.cache.k[kv.layer]
        key = (src._version, kv.cache.v[kv.layer]._version, kv.view.page_key, k.shape, k.dtype)
        sparse = bool(kv.view.sparse_candidates)  # the frames read depend on q: never reuse, never reused
        hit = not sparse and self._ctx_key == key and self._ctx_src is not None and self._ctx_src() is src
        if not hit:
            ck, cv = kv.read(q)
            n = ck.shape[1]
            shape = (k.shape[0], n + k.shape[1], *k.shape[2:])
            if self._ctx is None or self._ctx[0].shape != shape or self._ctx[0].device != k.device:
                self._ctx = (k.new_empty(shape), v.new_empty(shape))
            self._ctx[0][:, :n].copy_(ck)
            self._ctx[1][:, :n].copy_(cv)
            self._ctx_key, self._ctx_src = (None, None) if sparse else (key, weakref.ref(src))
        kv.write(k, v)  # after the read: a commit may overwrite a page this view reads
        kb, vb = self._ctx
        if src._version != key[0]:  # a commit wrote the pages: no later call can hit, so free the buffer rather
            self._ctx = self._ctx_key = self._ctx_src = None  # than hold every layer's through the replay (14B: 7.7 GB)
        n = kb.shape[1] - k.shape[1]
        kb[:, n:].copy_(k)
        vb[:, n:].copy_(v)
        return kb, vb


class TETextAttention(ReplayTraceable, nn.Module):
    """Cross-attention core on TE fused attention: video queries against the prompt's K/V (torch SDPA when
    :meth:`traced`)."""

    def __init__(self, config, pg_collection=None, fp8_recipe=None):
        super().__init__()
        self.attn = _dpa(config, pg_collection)
        self.fp8_recipe = fp8_recipe
        self.fp8_active = True

    def forward(self, q, k, v):
        return sdpa(q, k, v) if self.traced() else self._te_forward(q, k, v)

    @torch.compiler.disable
    def _te_forward(self, q, k, v):
        with quantized(self.fp8_recipe if self.fp8_active else None):
            out = self.attn(q, k.contiguous(), v.contiguous())
        return out.view(q.shape)


def default_fp8_linears(cfg) -> tuple[LinearGroup, ...]:
    """All linear groups in FP8 when ``cfg.fp8`` is set without FP8 attention; none otherwise."""
    if cfg.fp8 is None or cfg.fp8_dot_product_attention:
        return ()
    return tuple(LinearGroup)


def te_spec(cfg, *, fp8_linears=None, cp_attention: CPAttention | None = None) -> CausalWanSubmodules:
    """The TE spec for ``cfg``: TP via megatron's TE linears; context parallelism (``cfg.context_parallel_size``
    > 1) with Ulysses, as the local CP spec (``parallel/cp_attention.py``): the CP token plan at the model boundary
    and the all-to-all core around a ``TECachedAttention`` of ``h/(TP*CP)`` heads. Every token-wise module (TE
    linears, q/k norms, the text attention) works on this rank's tokens unchanged.

    Args:
        cfg: the ``WanConfig``; ``fp8``/``fp8_recipe``/``fp8_dot_product_attention`` select FP8 (module doc).
        fp8_linears: linear groups (``LinearGroup`` names) run in FP8; None = ``default_fp8_linears(cfg)``.
        cp_attention: the CP attention kind as ``check_heads`` resolved it; the TE spec has Ulysses only.
    """
    tp, cp = cfg.tensor_model_parallel_size, cfg.context_parallel_size
    if cp > 1 and cp_attention != CPAttention.ulysses:
        raise ConfigError(f"model.overrides.spec=te with context_parallel_size={cp} needs parallel.cp_attention="
                          f"ulysses (num_attention_heads divisible by TP*CP), got {getattr(cp_attention, 'value', cp_attention)}; "
                          "use model.overrides.spec=local for the all-gather core")
    column, row, te_norm = _te_classes()
    groups = default_fp8_linears(cfg) if fp8_linears is None else tuple(LinearGroup(g) for g in fp8_linears)
    if (groups or cfg.fp8_dot_product_attention) and cfg.fp8 is None:
        raise ConfigError("FP8 linears or model.fp8_dot_product_attention need model.fp8 (e4m3 | hybrid)")
    lin_recipe = fp8_recipe(cfg, dpa=False) if groups else None
    dpa_recipe = fp8_recipe(cfg, dpa=True) if cfg.fp8_dot_product_attention else None

    def linear(parallel: str, group: str) -> ModuleSpec:
        return ModuleSpec(module=column if parallel == "column" else row,
                          params={"fp8_recipe": lin_recipe if group in groups else None})

    if tp == 1:
        device = "cpu" if cfg.use_cpu_initialization else torch.cuda.current_device()
        qk_norm = ModuleSpec(module=te_norm, params={"device": device, "dtype": cfg.params_dtype})
    else:
        qk_norm = FullDimRMSNorm
    core = lambda cls, **kw: ModuleSpec(module=cls, params={"fp8_recipe": dpa_recipe, **kw})  # noqa: E731
    cached, sharder = core(TECachedAttention), NoTokenSharding
    if cp > 1:
        inner = core(TECachedAttention, heads=cfg.num_attention_heads // (tp * cp))
        cached = ModuleSpec(module=UlyssesCachedAttention, params={"inner": inner})
        sharder = CPTokenSharding
    block = block_spec(core_attention=cached, cross_core=core(TETextAttention), linear=linear, qk_norm=qk_norm)
    return CausalWanSubmodules(block=block, token_sharder=sharder)
