"""The CPU adaptations megatron-core needs, in one place, applied only when CUDA is absent.

megatron-core assumes a GPU in a few spots that the CPU (gloo) path here reaches:

* ``torch.cuda.current_device()`` is used as a ``device=`` argument when buffers are allocated
  (e.g. in DistributedDataParallel's grad buffers); without CUDA it must name the CPU.
* ``torch.cuda.synchronize()`` is called around timers and checkpoint saves; on CPU it is a no-op.
* ``tensor_parallel.random`` keeps a *CUDA* RNG state tracker (``get_cuda_rng_tracker``) that forks
  ``torch.cuda`` RNG states; on CPU we fork the CPU generator instead, which has the same semantics
  for our purposes (per-region reproducible streams).
* ``torch.cuda.current_stream()`` is read by DistributedDataParallel's grad sync (``start_grad_sync``
  waits on CUDA-graph events of that stream); on CPU it returns a stream stand-in whose waits are no-ops.

``apply_cpu_shims()`` is idempotent and does nothing when ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class _CpuRngTracker:
    """Stand-in for megatron's CudaRNGStatesTracker that forks the CPU generator."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}

    def reset(self):
        self.states = {}

    def is_initialized(self):
        return bool(self.states)

    def get_states(self):
        return dict(self.states)

    def set_states(self, states):
        self.states = dict(states)

    def add(self, name, seed):
        if name in self.states:
            raise Exception(f"cpu rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states:
            self.add(name, 1234)
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: work is synchronous, so waits are no-ops."""

    def wait_event(self, event=None):
        return None

    def wait_stream(self, stream=None):
        return None

    def synchronize(self):
        return None


def apply_cpu_shims() -> bool:
    """Patch megatron-core's CUDA assumptions for CPU runs. Returns True if patches were applied."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _CpuStream()
    from megatron.core.tensor_parallel import random as mrandom

    tracker = _CpuRngTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom.get_cuda_rng_tracker = lambda *a, **k: tracker
    _APPLIED = True
    return True
