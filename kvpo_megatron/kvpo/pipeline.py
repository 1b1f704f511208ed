"""Pipelined KVPO iteration: the rollout of prompt group j+1 overlaps reward, coefficients and replay of group j.

Why it is exact. A rank may hold several prompt groups per iteration (``data.prompts_per_rank > 1``). All of
an iteration's rollouts and replays use the same parameters: there is one optimizer update per iteration, and
the replay gradients of every group are accumulated into megatron DDP's ``main_grad`` before it. So running

    main thread:    rollout(0) | rollout(1)                          | rollout(2)               | ...
    worker thread:             | reward(0) coefficients(0) replay(0) | reward(1) ... replay(1)  | ...

computes exactly what the sequential loop computes: pi_old (TVE_old, scored inline by each rollout with the
current weights) and pi_ref are unchanged, no rollout sees a parameter that a replay of the same iteration
changed (replays only write ``main_grad``), and the worker accumulates the groups' gradients in the
sequential order (group 0's branches, then group 1's, ...), so ``main_grad`` is the same sum bit for bit.
The VAE decode and the reward models of group j run in the worker too, so they also hide behind rollout(j+1).
The objective is unchanged: this is a schedule, not an approximation.

The unit is the prompt group. Splitting the G branches of one prompt into branch groups would only let
decode + reward of branch group j overlap the rollout of branch group j+1: the advantages (normalised over all
G rewards) and the coefficients ``c_k = dLoss/dTVE_k`` (softmax over all G energies) need every branch first,
so no replay of that prompt can start before its last branch is rolled out.

Not chosen: a one-step-stale asynchronous rollout (roll out iteration i+1 with the parameters of iteration i
while iteration i replays and updates). It overlaps across iterations, also with one prompt per rank, but the
rollout's TVE_old would be scored with stale parameters theta_{i-1}; the ratio rho_k = pi_theta(k)/pi_old(k)
would then have to be corrected for the staleness (an importance weight pi_{theta_i}(k)/pi_{theta_{i-1}}(k),
i.e. re-scoring every routed tuple with the current weights, or accepting the bias), and the samples would be
off-policy by one update. The in-iteration pipeline here needs none of that.

Execution. On a GPU the worker's work runs on its own CUDA stream (``torch.cuda.Stream``), which waits for an
event recorded on the main stream after each rollout (the group's tensors are ready) and is joined by the main
stream before the update. On the CPU the worker is a plain thread: torch ops release the GIL.

Thread safety (what the two threads share and how):

* model parameters: read only during the pipeline (replays write ``main_grad``/``.grad`` only);
* ``adapters_disabled`` (the reference policy pi_ref) flips a flag on every LoRA layer of the shared model.
  The rollout thread only flips it while holding :class:`ModelGuard`'s lock, and the replay thread holds the
  same lock for each forward (Python-side dispatch; on a GPU kernels stay asynchronous), so a replay forward
  never sees disabled adapters. Backward passes need no lock (the autograd graph is already built);
* KV caches: ``Rollout.run`` and ``replay_gradients`` each create their own (separate page pools);
* ``StreamingGenerator.forward_count``: the replay runs on a second generator over the same model
  (:func:`replay_generator`), so ``RolloutGroup.forwards`` counts rollout forwards only;
* megatron DDP's grad hooks: only the worker runs backward passes, one replay at a time;
* grad mode is thread local: ``Rollout.run`` is ``no_grad``, the replay enables grad itself;
* randomness: rollout noise (initial and re-noising) is keyed (``sampling/noise.py``) and routes are pure
  functions of (seed, iteration, prompt, branch, block); neither thread draws from the global RNG.

Also refused (:func:`check_overlap_supported`): TP or CP > 1 (both threads would issue collectives on the
same model-parallel groups in an order that can differ between ranks), the TE spec (its cached-attention
core keeps a per-module context buffer), merged-LoRA rollouts (``rollout.merge_lora``: the rollout would change
the weights the replay differentiates) and CUDA graphs (shared static buffers). DP collectives (branches over DP) run in the worker only.

Timers: every phase records wall-clock (start, end) per group (:class:`Timeline`; on a GPU the phase's stream
is synchronised at its end so that the span covers the device work). ``time_overlap_saved`` = sum of the
phase times - wall time of the pipeline; the spans are written to ``out_dir/timeline.jsonl`` by the trainer.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.sampling import StreamingGenerator

T = TypeVar("T")
R = TypeVar("R")

PHASES = ("rollout", "reward", "coefficients", "replay")
"""Phase names of the timeline, in pipeline order."""


def check_overlap_supported(*, tp: int, cp: int, te_spec: bool, merge_lora: bool, cuda_graphs: bool) -> None:
    """Raise ``ConfigError`` (naming ``train.overlap`` and the conflicting field) where overlap is not exact."""
    if tp * cp > 1:
        raise ConfigError(f"train.overlap=true needs tensor_model_parallel_size=1 and context_parallel_size=1 "
                          f"(got {tp} and {cp}): rollout and replay threads would interleave model-parallel "
                          f"collectives differently on different ranks")
    if te_spec:
        raise ConfigError("train.overlap=true is not supported with model spec 'te' (its attention core keeps a "
                          "per-module context buffer that two threads would share); use the local spec")
    if merge_lora:
        raise ConfigError("train.overlap=true needs rollout.merge_lora=false: the rollout thread would fold the "
                          "adapters into the weights that the replay thread differentiates")
    if cuda_graphs:
        raise ConfigError("train.overlap=true needs model.cuda_graphs=false (the graphs' static buffers and KV page "
                          "pool would be shared by both threads)")


# ---- timeline ----------------------------------------------------------------------------------------------
@dataclass(kw_only=True, slots=True)
class Span:
    phase: str
    """One of ``PHASES``."""
    group: int
    """Index of the prompt group within the iteration (0-based)."""
    start: float
    """Seconds since the timeline's origin."""
    end: float
    """Seconds since the timeline's origin."""


class Timeline:
    """Per-phase wall-clock spans of one pipelined iteration (thread safe)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device if device is not None else torch.device("cpu")
        self.spans: list[Span] = []
        self.wall = 0.0
        """Seconds from the origin to the end of the last phase (set by :func:`run_overlapped`)."""
        self._lock = threading.Lock()
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    @contextlib.contextmanager
    def phase(self, name: str, group: int) -> Iterator[None]:
        """Time a phase of ``group``; on a GPU the current stream is synchronised at the end."""
        start = self.now()
        yield
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        span = Span(phase=name, group=group, start=start, end=self.now())
        with self._lock:
            self.spans.append(span)

    def phase_times(self) -> dict[str, float]:
        """``time_<phase>``: summed seconds of each phase over the groups."""
        out: dict[str, float] = {}
        for s in self.spans:
            out[f"time_{s.phase}"] = out.get(f"time_{s.phase}", 0.0) + (s.end - s.start)
        return out

    def metrics(self) -> dict[str, float]:
        """Phase sums plus ``time_pipeline`` (wall) and ``time_overlap_saved`` (sum of phases - wall)."""
        times = self.phase_times()
        return {**times, "time_pipeline": self.wall, "time_overlap_saved": sum(times.values()) - self.wall}

    def overlaps(self, a: str, group_a: int, b: str, group_b: int) -> float:
        """Seconds during which phase ``a`` of ``group_a`` and phase ``b`` of ``group_b`` both ran."""
        sa = [s for s in self.spans if s.phase == a and s.group == group_a]
        sb = [s for s in self.spans if s.phase == b and s.group == group_b]
        return sum(max(0.0, min(x.end, y.end) - max(x.start, y.start)) for x in sa for y in sb)

    def to_dict(self) -> dict:
        spans = sorted(self.spans, key=lambda s: (s.start, PHASES.index(s.phase) if s.phase in PHASES else 99))
        return {"wall": self.wall, "spans": [[s.phase, s.group, s.start, s.end] for s in spans],
                **self.metrics()}

    def append_jsonl(self, path: str | Path, **extra) -> None:
        """Append one JSON line ``{**extra, wall, spans: [[phase, group, start, end], ...], time_...}``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({**extra, **self.to_dict()}) + "\n")


# ---- shared model ------------------------------------------------------------------------------------------
class ModelGuard:
    """Serialises the reference policy (adapters disabled on the shared model) against replay forwards."""

    def __init__(self, model, disable: Callable[[object], contextlib.AbstractContextManager]):
        """``disable(model)``: a context manager that disables the adapters (``lora.adapters_disabled``)."""
        self.model, self.disable = model, disable
        self.lock = threading.RLock()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The rollout's ``reference`` context: adapters off, no other thread in a forward meanwhile."""
        with self.lock, self.disable(self.model):
            yield


class GuardedModel:
    """The shared model as the replay thread sees it: forwards and prompt encodings hold the guard's lock."""

    def __init__(self, model, guard: ModelGuard):
        self._model, self._guard = model, guard

    def __call__(self, *args, **kwargs):
        with self._guard.lock:
            return self._model(*args, **kwargs)

    def encode_text(self, *args, **kwargs):
        with self._guard.lock:
            return self._model.encode_text(*args, **kwargs)

    def __getattr__(self, name):  # config, modules(), ... pass through
        return getattr(self._model, name)


class _GuardedGenerator(StreamingGenerator):
    """The replay thread's generator: a whole forward holds the guard's lock -- the model call and its FLOP record,
    which reads the adapters' state (the rollout thread's reference disables them meanwhile otherwise)."""

    def __init__(self, *args, guard: ModelGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self._guard = guard

    def forward(self, *args, **kwargs):
        with self._guard.lock:
            return super().forward(*args, **kwargs)


def replay_generator(gen: StreamingGenerator, guard: ModelGuard) -> StreamingGenerator:
    """A second generator over the same model (own ``forward_count``) whose forwards hold ``guard.lock``."""
    return _GuardedGenerator(GuardedModel(gen.model, guard), gen.sampler, gen.cache_cfg,
                             recache_on_switch=gen.recache_on_switch, bank_reduction=gen.bank_reduction, guard=guard)


# ---- the pipeline ------------------------------------------------------------------------------------------
def run_overlapped(n: int, produce: Callable[[int], T], consume: Callable[[int, T], R], *,
                   device: torch.device, timeline: Timeline | None = None) -> list[R]:
    """``[consume(j, produce(j)) for j in range(n)]`` with ``produce(j+1)`` overlapping ``consume(j)``.

    ``produce`` runs on the calling thread (and CUDA stream); every ``consume`` runs, in order, on one worker
    thread (on a GPU: on a side stream that waits for ``produce(j)``'s work). On return the caller's stream
    has waited for all of the worker's work. The first exception of either side is re-raised after the
    worker has finished what it had already started; no further groups are produced after a failure.
    """
    cuda = device.type == "cuda"
    main = torch.cuda.current_stream(device) if cuda else None
    side = torch.cuda.Stream(device) if cuda else None
    dev_index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else None)

    failed = threading.Event()

    def work(j: int, item: T, ready) -> R | None:
        if failed.is_set():  # an earlier group failed: skip the rest
            return None
        try:
            if not cuda:
                return consume(j, item)
            torch.cuda.set_device(dev_index)  # the current device is thread local
            with torch.cuda.stream(side):
                side.wait_event(ready)
                return consume(j, item)
        except BaseException:
            failed.set()
            raise

    futures: list[Future] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpo-pipeline") as pool:
        try:
            for j in range(n):
                if failed.is_set():
                    break
                item = produce(j)
                ready = None
                if cuda:
                    ready = torch.cuda.Event()
                    ready.record(main)
                futures.append(pool.submit(work, j, item, ready))
        except BaseException:
            failed.set()
            raise
    if cuda:
        main.wait_stream(side)
    if timeline is not None:
        timeline.wall = timeline.now()
    return [f.result() for f in futures]  # re-raises the first failure, in group order
