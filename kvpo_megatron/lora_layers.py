"""peft LoRA layers for megatron-core's ``ColumnParallelLinear`` and ``RowParallelLinear``.

peft's own megatron LoRA (``peft.tuners.lora.tp_layer.LoraParallelLinear``, peft >= 0.14) breaks on these
linears: ``KeyError 'fan_in_fan_out'``, ``KeyError 'default'`` on ``lora_bias``, and the ``(output, bias)``
tuple multiplied by a float. Instead of pinning peft, the two classes here are registered through peft's
custom-module mechanism (``LoraConfig._register_custom_module``), so everything else (injection, naming,
``set_adapter``, save/load key conventions) stays peft's.

Sharding follows the base linear (torchtitan's ``components/lora.py``):

=====================  ==================================  ==================================
base                   ``lora_A`` (in -> r)                 ``lora_B`` (r -> out)
=====================  ==================================  ==================================
column (out sharded)   replicated ``[r, in]``               sharded on dim 0 ``[out/tp, r]``
row (in sharded)       sharded on dim 1 ``[r, in/tp]``      replicated ``[out, r]``
=====================  ==================================  ==================================

Forward, for this rank's input ``x`` (``s = alpha / r``)::

    column: h = copy_to_tp(A x)         y = base(x) + s * B_local h      (backward: dL/dh all-reduced)
    row:    h = reduce_from_tp(A_local x_local)   y = base(x) + s * B h   (forward: h all-reduced)

Both collectives act on the rank-``r`` activation, not on the output (``r`` is smaller than every Wan
linear's output width), and give replicated halves identical gradients on every TP rank. Init is
seeded per layer from ``(init_seed, adapter, module name)`` on CPU over the *full* tensor, then sliced,
so TP=N starts from exactly the TP=1 weights. LoRA weights are float32 whatever the base dtype.
"""
from __future__ import annotations

import math
import warnings
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)
from megatron.core.tensor_parallel.layers import (set_defaults_if_not_set_tensor_model_parallel_attributes,
                                                  set_tensor_model_parallel_attributes)
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from kvpo_megatron.lora_tensors import delta_weight, merged_weight
from kvpo_megatron.model.te_spec import te_linear_classes
from kvpo_megatron.parallel.collectives import group_rank, group_size


def layer_seed(init_seed: int, adapter_name: str, module_name: str) -> int:
    """Seed of one layer's LoRA init: a pure function of the config seed and the module's name."""
    return (init_seed * 1_000_003 + zlib.crc32(f"{adapter_name}:{module_name}".encode())) % (2**63)


class ParallelLoraLinear(nn.Module, LoraLayer):
    """LoRA around a megatron parallel linear; returns the base layer's ``(output, bias)`` tuple."""

    row_parallel: bool = False  # set by the two concrete subclasses

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, *, init_seed: int = 0, target_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        unsupported = {"lora_bias": config.lora_bias, "fan_in_fan_out": config.fan_in_fan_out,
                       "init_lora_weights": config.init_lora_weights is not True}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"{type(self).__name__} ({target_name}): unsupported LoraConfig option(s) {bad}")
        if getattr(base_layer, "sequence_parallel", False):
            raise ValueError(f"{target_name}: LoRA on a sequence-parallel megatron linear is not supported")
        if self.row_parallel and not base_layer.input_is_parallel:
            raise ValueError(f"{target_name}: LoRA needs RowParallelLinear(input_is_parallel=True)")
        if not self.row_parallel and base_layer.gather_output:
            raise ValueError(f"{target_name}: LoRA needs ColumnParallelLinear(gather_output=False)")
        self.tp_group = base_layer.tp_group
        self.tp_size, self.tp_rank = group_size(self.tp_group), group_rank(self.tp_group)
        self.init_seed = init_seed
        self.module_name = target_name
        self._active_adapter = adapter_name
        self._unmerged_weight: torch.Tensor | None = None  # exact-merge backup (not a buffer: not saved)
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, target_name=target_name)

    # ---- construction --------------------------------------------------------------------------
    @property
    def sharded_half(self) -> str:
        """Which of ``lora_A``/``lora_B`` is split over TP (the other is replicated)."""
        return "lora_A" if self.row_parallel else "lora_B"

    @property
    def partition_dim(self) -> int:
        """Dim of the sharded half's weight that is split: in (1) for row, out (0) for column."""
        return 1 if self.row_parallel else 0

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {r}")
        if self.resolve_lora_variant(config=config) is not None:  # DoRA etc.: raises for any variant
            raise ValueError(f"{type(self).__name__} supports plain LoRA only")
        base = self.get_base_layer()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        device = base.weight.device
        # full shapes; the sharded half keeps 1/tp of its partition dim
        full = {"lora_A": (r, self.in_features), "lora_B": (self.out_features, r)}
        for half, (o, i) in full.items():
            shape = [o, i]
            if half == self.sharded_half:
                shape[self.partition_dim] //= self.tp_size
            lin = nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=torch.float32)
            getattr(self, half)[adapter_name] = lin
            if half == self.sharded_half:
                set_tensor_model_parallel_attributes(lin.weight, is_parallel=True, dim=self.partition_dim, stride=1)
            else:
                set_defaults_if_not_set_tensor_model_parallel_attributes(lin.weight)
        self.reset_lora_parameters(adapter_name, True)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights=True) -> None:
        """A: kaiming-uniform(a=sqrt(5)) over the full [r, in] (peft's default, fan_in = full in); B: zeros."""
        if adapter_name not in self.lora_A:
            return
        a_full = torch.empty(self.r[adapter_name], self.in_features)
        gen = torch.Generator().manual_seed(layer_seed(self.init_seed, adapter_name, self.module_name))
        nn.init.kaiming_uniform_(a_full, a=math.sqrt(5), generator=gen)
        with torch.no_grad():
            self.lora_A[adapter_name].weight.copy_(self.shard("lora_A", a_full))
            self.lora_B[adapter_name].weight.zero_()

    # ---- full <-> local ------------------------------------------------------------------------
    def shard(self, half: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full ``half`` weight (identity for the replicated half)."""
        if half != self.sharded_half or self.tp_size == 1:
            return full
        return full.chunk(self.tp_size, dim=self.partition_dim)[self.tp_rank]

    def full_shape(self, half: str, adapter_name: str = "default") -> tuple[int, int]:
        shape = list(getattr(self, half)[adapter_name].weight.shape)
        if half == self.sharded_half:
            shape[self.partition_dim] *= self.tp_size
        return tuple(shape)

    def gather(self, half: str, local: torch.Tensor) -> torch.Tensor:
        """Full tensor of ``half`` from every rank's slice (collective over the TP group when sharded)."""
        if half != self.sharded_half or self.tp_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=self.partition_dim)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [..., in_local] -> (y [..., out_local], bias or None), exactly the base layer's contract.

        Under ``torch.compile``, a base layer dynamo cannot trace (TE's linears are ``torch.compiler.disable``d)
        splits a traced adapter into a graph before and a graph after the base call: one more compiled autograd
        function per linear, each with its own host cost, in a replay that is host-bound on an H200
        (``tools/BENCHMARKS.md``). Such a layer runs its whole adapter eagerly inside one opaque call (on the
        trainer's batch-1 replay no gain was measured: one timed step each, 46.6 s with it vs 45.0 s without).
        A TE linear that traces its torch equivalent in this call (``model.te_compile=replay``) keeps its adapter
        in the caller's graph."""
        if self.opaque_base:
            return self._forward_eager(x, *args, **kwargs)
        return self._forward(x, *args, **kwargs)

    @property
    def opaque_base(self) -> bool:
        """Whether this call of the base linear is excluded from torch.compile: its ``opaque_under_compile()``
        (the TE spec's linears, ``model/te_spec.py``), or a ``torch.compiler.disable``d forward."""
        base = self.get_base_layer()
        check = getattr(base, "opaque_under_compile", None)
        if check is not None:
            return bool(check())
        return bool(getattr(base.forward, "_torchdynamo_disable", False))

    @torch.compiler.disable
    def _forward_eager(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        return self._forward(x, *args, **kwargs)

    def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("mixed-adapter batches (adapter_names=...) are not supported on parallel linears")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.lora_A.parameters()):
                raise RuntimeError(f"{self.module_name}: forward with grad on merged LoRA weights gives LoRA no "
                                   "gradient; call unmerge_lora(model) before training forwards")
            return self.base_layer(x, *args, **kwargs)
        y, bias = self.base_layer(x, *args, **kwargs)
        # compute in the activations' dtype when it is a low-precision one (bf16 models: bf16 matmuls, float32
        # master weights and gradients); float32 otherwise
        dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name].weight.to(dt), self.lora_B[name].weight.to(dt)
            h = F.linear(self.lora_dropout[name](x.to(dt)), a)  # [..., r] (partial sum on row)
            if self.row_parallel:
                h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
            else:
                h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
            y = y + (F.linear(h, b) * self.scaling[name]).to(y.dtype)
        return y, bias

    # ---- merge ---------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scale * B @ A for this rank's slice of the base weight ([out_local, in_local], float32)."""
        return delta_weight(self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None, *, exact: bool = True) -> None:
        """W += scale * B @ A in place (same storage). ``exact`` keeps a copy of the unmerged W so that
        :meth:`unmerge` restores it bitwise; without it unmerge subtracts the delta (rounding residue)."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        weight = self.get_base_layer().weight
        for name in names:
            if exact and self._unmerged_weight is None and not self.merged:
                self._unmerged_weight = weight.detach().clone()
            merged = merged_weight(weight.data, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"{self.module_name}: NaN/Inf in merged weights of adapter {name!r}")
            weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn(f"{self.module_name}: already unmerged, nothing to do")
            return
        weight = self.get_base_layer().weight
        if self._unmerged_weight is not None:
            weight.data.copy_(self._unmerged_weight)
            self._unmerged_weight = None
            self.merged_adapters.clear()
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data -= self.get_delta_weight(name).to(weight.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class LoraColumnParallelLinear(ParallelLoraLinear):
    """Column-parallel base: ``lora_A`` replicated, ``lora_B`` sharded on its output dim."""

    row_parallel = False


class LoraRowParallelLinear(ParallelLoraLinear):
    """Row-parallel base: ``lora_A`` sharded on its input dim, ``lora_B`` replicated, rank-r sum all-reduced."""

    row_parallel = True


CUSTOM_MODULES: dict[type[nn.Module], type[ParallelLoraLinear]] = {
    ColumnParallelLinear: LoraColumnParallelLinear,
    RowParallelLinear: LoraRowParallelLinear,
}
"""Base megatron linear type -> our LoRA layer (what ``LoraConfig._register_custom_module`` receives)."""


def lora_base_types() -> dict[type[nn.Module], type[ParallelLoraLinear]]:
    """Every adaptable linear type: megatron's parallel linears and, when TransformerEngine is installed, the TE
    column/row parallel linears of the TE spec (``model/te_spec.py``), which keep the same contract (local input,
    ``(output, bias)`` result, ``weight`` [out/tp, in] or [out, in/tp], ``input_size``/``output_size`` full sizes,
    ``tp_group``), so the same LoRA layers wrap them."""
    types = dict(CUSTOM_MODULES)
    try:
        column, row = te_linear_classes()
    except Exception:  # TransformerEngine absent (CPU machines): local-spec linears only
        return types
    types[column] = LoraColumnParallelLinear
    types[row] = LoraRowParallelLinear
    return types
