"""KVPO replay: TVE scores without grad (rollout) and the gradient phase, in batches of tuples.

The loss depends on the parameters only through the branch energies TVE_1..TVE_G, so with
``c_k = dLoss/dTVE_k`` (objective.tve_coefficients):

    dLoss/dtheta = sum_k c_k * sum_{tuples of k} d/dtheta (1/D)||v_target - v_replay(theta)||^2

Gradient phase (:func:`replay_gradients`), per chunk of branches: fork the rollout's frozen prefix into one
sample per branch, then stream the window blocks with the engine (``StreamingGenerator.run``) taking each
block's clean latents as given; between "denoise" and commit, the block's tuples of every branch in the chunk
are replayed with grad in batches of ``replay.batch_size`` under each branch's own unrouted view (prompt K/V
re-encoded with grad: the cross-attention adapters act on them) and ``sum c_k * term`` is backpropagated; the
commit (no grad, the view the rollout's commit used) then advances every branch's context at once. Gradients
flow only through the current block's forward (cached K/V are detached); memory is one tuple batch's
activations plus the chunk's private pages, whatever G and W (the private ring holds the local window; it only
grows with W under ``routing.commit_pass=routed``, whose commits read older routed frames).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from kvpo_megatron.errors import ConfigError
from kvpo_megatron.kvpo.config import CommitPass, Recompute, ReplayConfig
from kvpo_megatron.kvpo.objective import tve_term
from kvpo_megatron.kvpo.types import ReplayTuple, RolloutGroup
from kvpo_megatron.model.attention import replay_attention
from kvpo_megatron.model.kv_cache import AttentionView, KVCache
from kvpo_megatron.sampling.streaming import BlockPlan, StreamingGenerator, active_at


def replay_terms(gen: StreamingGenerator, cache: KVCache, view: AttentionView, tuples: list[ReplayTuple],
                 text) -> torch.Tensor:
    """Per-tuple TVE terms [n]: the model on the tuples' latents under ``view`` (one row per tuple, no write)."""
    x = torch.cat([t.x for t in tuples])
    ts = torch.tensor([t.timestep for t in tuples], dtype=torch.float32)
    v = gen.forward(x, ts, tuples[0].start, text, cache, view)
    return tve_term(torch.cat([t.v_target for t in tuples]), v)


def score_block(gen: StreamingGenerator, cache: KVCache, view: AttentionView, tuples: list[ReplayTuple],
                text) -> torch.Tensor:
    """TVE terms [n] without grad (the rollout's TVE_old / TVE_ref scoring), computed with the replay's attention
    kernel (``model.attention.replay_attention``) so that TVE_old is the function the replay differentiates."""
    with torch.no_grad(), replay_attention():
        return replay_terms(gen, cache, view, tuples, text)


def replay_private_frames(gen: StreamingGenerator, group: RolloutGroup, commit_pass: CommitPass) -> int:
    """Private ring of a replay fork: the local window (unrouted commits), or the rollout's (routed commits)."""
    return group.private_frames if commit_pass == CommitPass.routed else gen.cache_cfg.local_attn_frames


@dataclass(frozen=True)
class ReplayPlan:
    batch_size: int | None
    """Tuples per forward + backward (None: every tuple of a block at once)."""
    recompute: bool
    """Per-block activation recompute in the backward."""


def activation_bytes(model_cfg, tokens: int, *, recompute: bool) -> int:
    """Estimated activations one replay tuple keeps for its backward (bf16): per layer and token about 34
    hidden-wide and 4 FFN-wide values (q/k/v/o and their norms, adaLN inputs in float32, cross-attention,
    FFN input/GELU/output, LoRA's rank-r inputs); with recompute only each block's input, plus one block's
    activations while it is recomputed."""
    d, f, layers = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.num_layers
    tp = model_cfg.tensor_model_parallel_size * model_cfg.context_parallel_size
    per_layer = tokens * (34 * d + 4 * f) * 2 // tp
    return (layers * tokens * d * 2 + per_layer) if recompute else layers * per_layer


def plan_replay(cfg: ReplayConfig, model_cfg, video, device: torch.device) -> ReplayPlan:
    """Batch size and recompute for ``cfg`` (``auto`` values from the activation estimate and the budget)."""
    tokens = model_cfg.tokens_per_frame(video.latent_height, video.latent_width) * 3
    full, rc = (activation_bytes(model_cfg, tokens, recompute=r) for r in (False, True))
    budget = cfg.memory_budget_gb * 1e9
    if device.type != "cuda":
        return ReplayPlan(batch_size=cfg.batch_size, recompute=cfg.recompute == Recompute.blocks)
    total = torch.cuda.get_device_properties(device).total_memory
    if cfg.recompute == Recompute.auto:
        want = cfg.batch_size or 1
        recompute = want * full > budget
    else:
        recompute = cfg.recompute == Recompute.blocks
    per = rc if recompute else full
    batch = cfg.batch_size or max(1, int(budget // per))
    if batch * per > total:
        field = "replay.batch_size" if cfg.batch_size else "replay.memory_budget_gb"
        raise ConfigError(f"{field}: {batch} replay tuple(s) need about {batch * per / 1e9:.1f} GB of activations "
                          f"({'with' if recompute else 'without'} replay.recompute) but the GPU has "
                          f"{total / 1e9:.1f} GB; lower it or set replay.recompute=blocks")
    return ReplayPlan(batch_size=batch, recompute=recompute)


def replay_gradients(gen: StreamingGenerator, group: RolloutGroup, coeffs: torch.Tensor, *, loss_scale: float = 1.0,
                     batch_size: int | None = None, commit_pass: CommitPass = CommitPass.unrouted,
                     generation: Callable[[], ContextManager] | None = None,
                     training: Callable[[], ContextManager] | None = None, times: dict | None = None) -> list[float]:
    """Accumulate ``sum_k coeffs[k] * dTVE_k/dtheta * loss_scale`` into ``.grad`` for this rank's branches.

    ``batch_size``: tuples per forward + backward (None: every tuple of a block in the chunk at once); the
    branches of a chunk are the ones whose tuples fill one batch. ``generation`` wraps the no-grad context
    rebuild (as it wrapped the rollout, e.g. merged LoRA, so the rebuilt K/V equal the rollout's); ``training``
    wraps the forwards with grad (the unmerged trainable form). ``times`` (optional) receives
    ``time_replay_tuples`` (forwards + backwards with grad) and ``time_replay_rebuild`` (the no-grad context
    rebuild: forks, commits, recaches), device-synchronised. Returns each branch's TVE (grad weights)."""
    clock = _Clock(times)
    generation = generation or contextlib.nullcontext
    training = training or contextlib.nullcontext
    branches = group.branches
    tve = [0.0] * len(branches)
    steps_per_block = max(1, max((sum(1 for t in br.tuples if t.block == group.window[0]) for br in branches),
                                 default=1))
    per_chunk = len(branches) if batch_size is None else max(1, batch_size // steps_per_block)
    private = replay_private_frames(gen, group, commit_pass)
    fpb = gen.cache_cfg.frames_per_block
    for c0 in range(0, len(branches), per_chunk):
        chunk = list(range(c0, min(len(branches), c0 + per_chunk)))
        cache = group.fork_state.fork(len(chunk), private)
        lat = torch.cat([branches[i].latents for i in chunk])

        def after(cache, b, _text, chunk=chunk):
            s = b * fpb
            items = [(row, i, t) for row, i in enumerate(chunk) for t in branches[i].tuples if t.block == b]
            if not items:
                return
            n = len(items) if batch_size is None else batch_size
            clock.lap("time_replay_rebuild")
            with training():
                view = cache.view(cache.default_read_frames(s, fpb), device=items[0][2].x.device)
                for j in range(0, len(items), n):
                    part = items[j:j + n]
                    with torch.enable_grad():
                        text = gen.model.encode_text(active_at(group.contexts, s).context)
                        terms = replay_terms(gen, cache, view.for_samples([r for r, _, _ in part]),
                                             [t for _, _, t in part], text)
                        w = torch.tensor([float(coeffs[i]) for _, i, _ in part], device=terms.device)
                        ((terms * w).sum() * loss_scale).backward()
                    for (_, i, _), term in zip(part, terms.detach().tolist()):
                        tve[i] += term
            clock.lap("time_replay_tuples")

        def plan(b, chunk=chunk, cache=cache):
            frames = [branches[i].commit_frames.get(b, cache.default_read_frames(b * fpb, fpb)) for i in chunk]
            commit = frames if any(f != frames[0] for f in frames) else frames[0]
            return BlockPlan(given=True, after_denoise=after, commit_frames=commit)

        with torch.no_grad(), generation():
            gen.run(cache, lat, None, group.prompts, group.window, plan_for=plan)
        clock.lap("time_replay_rebuild")
    return tve


class _Clock:
    """Accumulates device-synchronised wall time between laps into ``times`` (no-op without it)."""

    def __init__(self, times: dict | None):
        self.times = times
        self.t0 = self._now() if times is not None else 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, key: str) -> None:
        if self.times is None:
            return
        t = self._now()
        self.times[key] = self.times.get(key, 0.0) + t - self.t0
        self.t0 = t
