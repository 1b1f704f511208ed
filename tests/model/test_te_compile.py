"""``model.te_compile``: under torch.compile the TE spec's replay forwards trace torch equivalents of their TE calls.

TransformerEngine is not installed on the CPU, so the dispatch (``te_spec.ReplayTraceable``) is tested here on a
stand-in: the TE spec's linear call ``te_spec.TELinearCall`` mixed into megatron's CPU column linear instead of
TE's (its base forward, excluded from compilation, plays the opaque TE call). The TE classes themselves are
compared with eager TE on the GPU (``tests/kvpo/test_gpu_fast_path.py``)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
from megatron.core.tensor_parallel import ColumnParallelLinear

from kvpo_megatron.accelerate import accelerate
from kvpo_megatron.lora import LoRAConfig, apply_lora, lora_parameters
from kvpo_megatron.model.attention import replay_attention
from kvpo_megatron.model.build import ModelSection
from kvpo_megatron.model.te_spec import TECompile, TELinearCall, traced_rms_norm
from tests.helpers import tiny_model


class StandInTELinear(TELinearCall, ColumnParallelLinear):
    """The TE spec's linear call (``TELinearCall``, as ``TEColumnLinear`` mixes it in) around megatron's CPU column
    linear in place of TE's."""

    fp8_recipe = None
    fp8_active = True


def _stand_in(pgs):
    """A tiny model whose block-0 ffn_fc1 is the stand-in TE linear (same weights, same call contract)."""
    model = tiny_model(pgs)
    model.blocks[0].ffn_fc1.__class__ = StandInTELinear
    return model


def _probe(module):
    """A compiled function returning 1 where ``module.traced()`` held while dynamo traced it (eager backend: no code
    generation). One function for every state: its guards must send each state to the right graph."""

    @torch.compile(backend="eager", fullgraph=True)
    def probe(x):
        return x + 1.0 if module.traced() else x

    def traced_when(*, grad: bool = True, replay: bool = False) -> bool:
        ctx = replay_attention() if replay else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), ctx:
            return bool(probe(torch.zeros(1)).item() == 1.0)
    return traced_when


def test_traced_only_for_the_replays_bf16_forwards_inside_compile(pgs):
    """The state flips between calls of one compiled function (no dynamo reset): a graph traced in one state must
    not serve another (grad mode, the replay kernel, the FP8 switch and ``trace_replay`` are guarded)."""
    torch._dynamo.reset()
    lin = _stand_in(pgs).blocks[0].ffn_fc1
    traced_when = _probe(lin)
    assert not lin.traced()  # eager: the TE call
    assert not traced_when(grad=True)  # te_compile=opaque (trace_replay unset)
    lin.trace_replay = True
    assert not lin.traced()  # still eager outside compile
    assert traced_when(grad=True)  # the replay's forwards with autograd
    assert traced_when(grad=False, replay=True)  # its no-grad scoring (replay kernel): the same function
    assert not traced_when(grad=False)  # the no-grad rollout keeps TE
    assert traced_when(grad=True)
    lin.fp8_recipe = object()
    assert not traced_when(grad=True)  # an active FP8 recipe keeps TE
    lin.fp8_active = False
    assert traced_when(grad=True)  # the recipe switched off for this region: bf16
    lin.fp8_active = True
    assert not traced_when(grad=True)
    lin.fp8_recipe, lin.trace_replay = None, False
    assert not traced_when(grad=True)  # back to opaque
    torch._dynamo.reset()


def test_accelerate_sets_tracing_from_the_config(pgs):
    for section, want in ((ModelSection(compile=True), True),
                          (ModelSection(compile=True, te_compile=TECompile.opaque), False),
                          (ModelSection(compile=False), False)):
        model = _stand_in(pgs)
        accelerate(model, section, device=torch.device("cpu"))
        assert model.blocks[0].ffn_fc1.trace_replay is want, section
    torch._dynamo.reset()


def test_traced_rms_norm_is_te_s_float32_rms_norm():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=g) * 4).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(torch.bfloat16)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    got = traced_rms_norm(x, w, 1e-6)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.float32).to(torch.bfloat16)) or \
        (got.double() - want).abs().max() <= 2 ** -8 * want.abs().max()


@pytest.mark.parametrize("trace", [True, False])
def test_lora_on_a_traced_te_linear_compiles_into_the_callers_graph(pgs, trace):
    """Traced: the base's linear and the adapter's rank-r math are one graph with the caller (the adapter no longer
    runs eagerly beside an opaque call). Opaque: the caller's graph holds its own op only. Outputs and LoRA
    gradients equal eager either way."""
    model = apply_lora(_stand_in(pgs), LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.normal_(0, 0.2)
    layer = model.blocks[0].ffn_fc1
    layer.get_base_layer().trace_replay = trace
    x = torch.randn(2, 5, model.config.hidden_size)

    def caller(inp):
        return layer(inp)[0] * 2.0

    torch._dynamo.reset()
    report = torch._dynamo.explain(caller)(x)
    assert report.graph_count == 1, report.break_reasons
    if trace:  # base linear + the adapter's two matmuls, scaling and sum + the caller's multiply
        assert report.op_count >= 5, report.ops_per_graph
    else:
        assert report.op_count == 1, report.ops_per_graph
    grads, outs = [], []
    for fn in (caller, torch.compile(caller, backend="aot_eager")):
        layer.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for n, p in layer.named_parameters() if "lora_" in n]))
    assert torch.allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
