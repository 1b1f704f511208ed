"""Execution features chosen by config and applied by one function, in the spirit of torchtitan's ``parallelize``:
``accelerate(model, section, device)`` compiles the DiT blocks (with ``model.te_compile=replay``, the TE spec's
replay forwards trace torch equivalents of its TE calls: ``model/te_spec.py``), sets per-block activation
recompute, and returns the *runner* through which the streaming engine issues every forward (eager, or CUDA-graph
replays).

CUDA graphs (``model.cuda_graphs``): a no-grad streaming forward is captured once per *shape key* -- batch,
frames, pages read, pages written, head on/off, text length, the KV page pool it reads (id and generation) and
the model's execution state (LoRA merged / active / disabled, FP8 on/off) -- and replayed for every later
forward with that key. Everything that differs between forwards of one key is *data* in static buffers copied
in before the replay: the latents, the timesteps, the frame offset (RoPE tables are gathered on the device),
the pages each sample reads (so CHR's routed views and a batch of branches each reading its own frames of the
shared prefix are one graph, not a graph per route) and the pages the commit writes, and the prompt's
cross-attention K/V. The first forward of a key runs eagerly (warm-up); graphs are captured from its second
forward on. Forwards with autograd, on the CPU, or logging sparse reads run eagerly. All graphs share one memory
pool; every replay's output is cloned before the next replay, so sharing is safe.

FP8 (TE spec): the module groups the spec built with FP8 recipes (``model.overrides.fp8*`` and
``model.fp8_linears``) run FP8 inside :func:`fp8_enabled` regions only; the trainer enables it for the no-grad
rollout and keeps scoring and replay in bf16 unless ``model.fp8_replay`` (see :func:`fp8_enabled`).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.lora import lora_state
from kvpo_megatron.model.attention import TextKV, replay_attention_active
from kvpo_megatron.model.kv_cache import AttentionView
from kvpo_megatron.model.te_spec import ReplayTraceable, TECompile
from kvpo_megatron.sampling.streaming import eager_runner

log = logging.getLogger(__name__)


def check_accel(section, *, device: torch.device) -> None:
    """One message naming the field when a requested feature cannot run here."""
    spec = str(section.overrides.get("spec", "local"))
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if section.cuda_graphs and not cuda:
        raise ConfigError("model.cuda_graphs=true needs a CUDA device (this run is on the CPU)")
    fp8 = section.overrides.get("fp8") or section.fp8_linears or section.overrides.get("fp8_dot_product_attention")
    if fp8 and spec != "te":
        raise ConfigError("FP8 (model.overrides.fp8 / model.fp8_linears / fp8_dot_product_attention) needs "
                          "model.overrides.spec=te")
    if spec == "te" and not cuda:
        raise ConfigError("model.overrides.spec=te needs a CUDA device with TransformerEngine")


def accelerate(model: nn.Module, section, *, device: torch.device):
    """Apply ``section``'s execution features to ``model`` (in place); return the forward runner."""
    check_accel(section, device=device)
    model.recompute_blocks = False
    if section.compile:
        import torch._dynamo

        # every block shares its code; shapes (batch, cached frames) vary between forwards, so dynamo's automatic
        # dynamic shapes keep the variants few (grad / no grad, LoRA state)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for blk in model.blocks:
            blk.compile()
    trace = section.compile and section.te_compile == TECompile.replay and model.config.tensor_model_parallel_size == 1
    for m in model.modules():
        if isinstance(m, ReplayTraceable):
            m.trace_replay = trace
    return GraphRunner() if section.cuda_graphs else eager_runner


def _fp8_modules(model: nn.Module):
    return [m for m in model.modules() if getattr(m, "fp8_recipe", None) is not None]


@contextlib.contextmanager
def fp8_enabled(model: nn.Module, on: bool = True):
    """Run the model's FP8-capable TE modules in FP8 (``on``) or in bf16 inside this region."""
    mods = _fp8_modules(model)
    before = [getattr(m, "fp8_active", False) for m in mods]
    for m in mods:
        m.fp8_active = on
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.fp8_active = b


def execution_state(model: nn.Module) -> tuple:
    """What a captured forward depends on besides shapes: LoRA state, the FP8 switch of each module, and whether
    cached attention runs the replay's kernel (``model.attention.replay_attention``)."""
    return (lora_state(model), tuple(bool(getattr(m, "fp8_active", False)) for m in _fp8_modules(model)),
            replay_attention_active())


class _Graph:
    """One captured forward and its static inputs."""

    def __init__(self, model, x, t, text, frame_offset, cache, view, compute_output, pool):
        dev = x.device
        self.x, self.t = x.clone(), t.clone()
        self.offset = torch.tensor(int(frame_offset), dtype=torch.long, device=dev)
        self.read = view.read_slots.to(dev).clone()
        self.write = None if view.write_slots is None else view.write_slots.to(dev).clone()
        self.text = [(k[:1].clone() if k.stride(0) == 0 else k.clone(), v[:1].clone() if v.stride(0) == 0 else v.clone())
                     for k, v in text.layers]
        self.text_src = None
        b = x.shape[0]
        stext = TextKV(layers=[(k.expand(b, *k.shape[1:]), v.expand(b, *v.shape[1:])) for k, v in self.text])
        sview = AttentionView(read_frames=view.read_frames, read_slots=self.read, write_frames=view.write_frames,
                              write_slots=self.write, bank_entries=view.bank_entries,
                              sparse_candidates=view.sparse_candidates, sparse_top_k=view.sparse_top_k)

        def run():
            return model(self.x, self.t, text=stext, frame_offset=self.offset, cache=cache, view=sview,
                         compute_output=compute_output)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # warm-up on a side stream (workspaces, cuDNN plans, compiled kernels); writes what replay writes
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = run()

    def __call__(self, x, t, text, frame_offset, view):
        self.x.copy_(x)
        self.t.copy_(t)
        self.offset.fill_(int(frame_offset))
        self.read.copy_(view.read_slots)
        if self.write is not None:
            self.write.copy_(view.write_slots)
        if self.text_src is not text.layers[0][0]:  # a new prompt: copy its K/V in (unexpanded rows)
            for (k, v), (sk, sv) in zip(text.layers, self.text):
                sk.copy_(k[:sk.shape[0]])
                sv.copy_(v[:sv.shape[0]])
            self.text_src = text.layers[0][0]
        self.graph.replay()
        return None if self.out is None else self.out.clone()


class GraphRunner:
    """Runs no-grad CUDA forwards from captured graphs keyed by shape (module docstring); others eagerly."""

    reuse_pool = True
    """The engine keeps one KV page pool across rollouts, so graphs stay valid between iterations."""

    def __init__(self):
        self.graphs: dict = {}
        self.seen: set = set()
        self.mempool = None
        self.captures = 0
        self._pools: dict[int, int] = {}  # pool id -> the generation graphs were captured at

    def _forget(self, pool_id: int) -> None:
        """Drop the graphs captured over the page pool ``pool_id`` (it grew; a graph keeps its cache, hence its pool,
        alive, so a pool id cannot be reused while graphs of it exist)."""
        self.graphs = {k: g for k, g in self.graphs.items() if k[5] != pool_id}
        self.seen = {k for k in self.seen if k[5] != pool_id}
        self._pools.pop(pool_id, None)
        if not any(g is not None for g in self.graphs.values()):
            # No graph holds the CUDA graph memory pool any more: PyTorch releases it, and capturing into its
            # handle again fails an allocator assertion (seen on the H200 when a larger batch grew the page pool
            # of the 5B trainer's rollout): the next capture takes a new handle.
            self.mempool = None

    def key(self, model, x, t, text, cache, view, compute_output) -> tuple:
        pool = cache.pool
        ws = None if view.write_slots is None else tuple(view.write_slots.shape)
        return (tuple(x.shape), x.dtype, tuple(view.read_slots.shape), ws, compute_output, id(pool), pool.generation,
                text.layers[0][0].shape[1], text.layers[0][0].shape[0], view.bank_entries, view.sparse_candidates,
                view.sparse_top_k, execution_state(model))

    def __call__(self, model, x, t, *, text, frame_offset, cache, view, compute_output):
        if torch.is_grad_enabled() or not x.is_cuda or cache is None or cache.sparse_log is not None:
            return eager_runner(model, x, t, text=text.expand(x.shape[0]), frame_offset=frame_offset, cache=cache,
                                view=view, compute_output=compute_output)
        pool = (id(cache.pool), cache.pool.generation)
        if self._pools.get(pool[0], pool[1]) != pool[1]:  # the pool grew: its graphs read freed buffers
            self._forget(pool[0])
        self._pools[pool[0]] = pool[1]
        key = self.key(model, x, t, text, cache, view, compute_output)
        if key not in self.graphs:
            if key not in self.seen:  # first forward of this shape: eager (warms kernels and caches up)
                self.seen.add(key)
                return eager_runner(model, x, t, text=text.expand(x.shape[0]), frame_offset=frame_offset,
                                    cache=cache, view=view, compute_output=compute_output)
            if self.mempool is None:
                self.mempool = torch.cuda.graph_pool_handle()
            try:
                g = _Graph(model, x, t, text, frame_offset, cache, view, compute_output, self.mempool)
            except RuntimeError as e:  # a forward that cannot be captured runs eagerly (logged once per shape)
                log.warning("CUDA graph capture failed for %s; running it eagerly: %s", key[:5], e)
                g = None
            self.graphs[key] = g
            self.captures += g is not None
        g = self.graphs[key]
        if g is None:
            return eager_runner(model, x, t, text=text.expand(x.shape[0]), frame_offset=frame_offset, cache=cache,
                                view=view, compute_output=compute_output)
        return g(x, t, text, frame_offset, view)
