"""Branches over DP: which rank rolls out and replays which branch, and the hand-offs that balance them.

With ``parallel.branches_over_dp`` the N ranks of the DP group share one prompt: every rank generates the
prefix and rolls out G/N of its branches (``b`` each). The unrouted anchor is needed once -- its reward is
only the advantages' baseline -- so DP rank 0 alone rolls it out and broadcasts that reward. Rank 0 then ends
its rollout about one sample's suffix after the others, and nobody can weight a replay before the slowest
rollout (the coefficients c_k = dLoss/dTVE_k need every branch's reward and energy). Two moves, both exact,
fill that gap and balance the replays:

* **replay ahead.** The other ranks replay ``k`` of their own branches *before* the coefficients exist, while
  rank 0 still rolls out the anchor. Each such branch's gradient g_k = dTVE_k/dtheta is captured on its own
  (:class:`GradStash`) and added as ``c_k * g_k`` once the coefficients arrive: the loss gradient is linear in
  the c_k, so this is the weighted backward's sum, in another fp32 summation order.
* **hand-off.** Rank 0 hands the replay of ``n`` of its branches to the other ranks (round robin). A replay
  needs the branch's clean latents, routed tuples (x, t, v_target), routes and commit views -- tens of MB,
  sent over the DP group (:func:`exchange`; tensors plus a JSON header, nothing unpickled) -- and the
  prefix cache, which every rank already holds.

The counts (``parallel.replay_ahead`` / ``parallel.replay_handoff``; by default :func:`plan_counts`) come from
forward-equivalents: the anchor's suffix is A = (blocks after the pivot) x (solver steps + 1 commit)
forwards; one branch's replay is R = its tuples x (forward + backward ~ 3, + 1 with recompute) + one commit per
window block. A branch replayed ahead runs alone (its gradient must stay apart), which on an H200 took
``AHEAD_COST`` = 1.2x a branch of the batched replay, so k = floor(A / (1.2 R)) branches fit in the gap.
After the coefficients rank 0 has b - n replays left and every other rank b - k + n / (N - 1): n = k (N - 1) / N.
Measured (wan-1.3b, 147 frames, G=8, 2 H200s): k = 4, n = 2 -- more ahead than the gap holds -- left rank 0
waiting 5.7 s for the others, 1.60x against one GPU (``tools/BENCHMARKS.md``); hence the cap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kvpo_megatron.parallel.collectives import broadcast_json

if TYPE_CHECKING:  # the counts stay importable without megatron (tools/memory_model.py)
    from kvpo_megatron.kvpo.types import BranchRollout

ANCHOR_RANK = 0
"""The DP rank that rolls out the anchor (and hands off replays)."""
AHEAD_COST = 1.2
"""A branch replayed alone (ahead) over one in the batched replay, in time (H200, wan-1.3b: 2.95 vs 2.45 s)."""

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def plan_counts(*, dp_size: int, per_rank: int, suffix_blocks: int, steps: int, window_blocks: int,
                routed_steps: int, recompute: bool) -> tuple[int, int]:
    """(k, n): branches the other ranks replay ahead, and branch replays rank 0 hands off (the balance above)."""
    if dp_size < 2:
        return 0, 0
    anchor = suffix_blocks * (steps + 1)
    replay = max(1, window_blocks * (routed_steps * (3 + int(recompute)) + 1))
    k = max(0, min(per_rank, math.floor(anchor / (AHEAD_COST * replay))))
    return k, max(0, min(per_rank, round(k * (dp_size - 1) / dp_size)))


@dataclass(frozen=True)
class ReplayAssignment:
    """Branch ids this rank replays: ``ahead`` (before the coefficients), then ``own`` and ``received``."""

    ahead: list[int]
    own: list[int]
    received: list[int]
    handed: dict[int, list[int]]
    """DP rank -> the rank-0 branches it replays (the same on every rank)."""


def assign(*, dp_rank: int, dp_size: int, num_branches: int, n: int, k: int = 0) -> ReplayAssignment:
    """Rank r rolls out branches [r b, (r + 1) b); ranks other than 0 replay their first ``k`` ahead; rank 0's last
    ``n`` go round robin to ranks 1..N-1."""
    per = num_branches // dp_size
    mine = list(range(dp_rank * per, (dp_rank + 1) * per))
    given = list(range(per - n, per)) if dp_size > 1 else []
    handed: dict[int, list[int]] = {r: [] for r in range(1, dp_size)}
    for i, g in enumerate(given):
        handed[1 + i % (dp_size - 1)].append(g)
    if dp_rank == ANCHOR_RANK:
        return ReplayAssignment(ahead=[], own=[g for g in mine if g not in given], received=[], handed=handed)
    return ReplayAssignment(ahead=mine[:k], own=mine[k:], received=handed[dp_rank], handed=handed)


# ---- the hand-off ----------------------------------------------------------------------------------------
def _header(br: BranchRollout, xs: torch.Tensor | None, vs: torch.Tensor | None) -> dict:
    return {"branch": br.branch, "tve_old": br.tve_old, "tve_ref": br.tve_ref,
            "routes": {str(b): list(v) for b, v in br.routes.items()},
            "commit_frames": {str(b): v for b, v in br.commit_frames.items()},
            "tuples": [[t.block, t.step, t.start, t.timestep] for t in br.tuples],
            "latents": _spec(br.latents), "x": None if xs is None else _spec(xs), "v": None if vs is None else _spec(vs)}


def _spec(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype)]


def _bcast(t: torch.Tensor, src: int, group) -> torch.Tensor:
    dist.broadcast(t, src=src, group=group)
    return t


def _send_or_receive(br: BranchRollout | None, *, src: int, group, device) -> BranchRollout:
    """Broadcast one branch's replay inputs from global rank ``src`` over ``group``."""
    xs = vs = None
    if br is not None and br.tuples:  # the sender's tuples, stacked once (x and v_target keep their own dtypes)
        xs, vs = torch.cat([t.x for t in br.tuples]), torch.cat([t.v_target for t in br.tuples])
    meta = broadcast_json(_header(br, xs, vs) if br is not None else None, src=src, group=group, device=device)

    def tensor(spec, value: torch.Tensor | None) -> torch.Tensor:
        shape, dtype = spec
        if dtype not in _DTYPES:
            raise ValueError(f"hand-off: unexpected dtype {dtype!r}")
        out = value.contiguous() if value is not None else torch.empty(shape, dtype=_DTYPES[dtype], device=device)
        return _bcast(out, src, group)

    latents = tensor(meta["latents"], br.latents if br is not None else None)
    if meta["tuples"]:
        xs, vs = tensor(meta["x"], xs), tensor(meta["v"], vs)
    if br is not None:
        return br
    from kvpo_megatron.kvpo.types import BranchRollout, ReplayTuple

    tuples = [ReplayTuple(block=b, step=s, start=f, timestep=ts, x=xs[i:i + 1], v_target=vs[i:i + 1])
              for i, (b, s, f, ts) in enumerate(meta["tuples"])]
    return BranchRollout(branch=meta["branch"], latents=latents, tuples=tuples, tve_old=meta["tve_old"],
                         tve_ref=meta["tve_ref"], routes={int(b): v for b, v in meta["routes"].items()},
                         commit_frames={int(b): v for b, v in meta["commit_frames"].items()})


def exchange(branches: list[BranchRollout], plan: ReplayAssignment, *, dp_rank: int, group,
             device) -> list[BranchRollout]:
    """Every DP rank calls this: rank 0 sends the branches it hands off (its rollouts, found in ``branches``),
    and each rank returns the ones it now replays (``plan.received``, in branch order)."""
    src = dist.get_global_rank(group, ANCHOR_RANK)
    mine = {b.branch: b for b in branches}
    got: dict[int, BranchRollout] = {}
    for rank, ids in sorted(plan.handed.items()):
        for g in ids:
            br = _send_or_receive(mine[g] if dp_rank == ANCHOR_RANK else None, src=src, group=group, device=device)
            if rank == dp_rank:
                got[g] = br
    return [got[g] for g in plan.received]


# ---- gradients before their coefficients -----------------------------------------------------------------
class GradStash:
    """Per-branch gradients captured from the accumulation buffers (``main_grad``), weighted later.

    ``__init__`` saves what the buffers already hold (earlier prompt groups) and zeroes them; after branch k's
    backward, :meth:`capture` moves the buffers into part k; :meth:`combine` restores the saved sum and adds
    ``w_k * part_k``; :meth:`discard` restores it alone. Memory: (parts + 1) copies of the trainable gradients.
    """

    def __init__(self, grads: list[torch.Tensor]):
        self.grads = grads
        self.base = [g.clone() for g in grads]
        self.parts: dict[int, list[torch.Tensor]] = {}
        torch._foreach_zero_(grads)

    def capture(self, key: int) -> None:
        self.parts[key] = [g.clone() for g in self.grads]
        torch._foreach_zero_(self.grads)

    def combine(self, weights: dict[int, float]) -> None:
        if set(weights) != set(self.parts):
            raise ValueError(f"weights for {sorted(weights)} but parts {sorted(self.parts)}")
        self.discard()
        for k, w in weights.items():
            torch._foreach_add_(self.grads, self.parts[k], alpha=w)
        self.parts = {}

    def discard(self) -> None:
        torch._foreach_copy_(self.grads, self.base)
