"""KVPO replay with gradients, one tuple's activations at a time.

The loss depends on the parameters only through the branch energies TVE_1..TVE_G, so with
``c_k = dLoss/dTVE_k`` (objective.tve_coefficients):

    dLoss/dtheta = sum_k c_k * sum_{tuples of k} d/dtheta (1/D)||v_target - v_replay(theta)||^2

For every branch: restore the fork state, then for each window block in order replay its tuples with grad
under the unrouted view of the branch's own history (prompt K/V re-encoded with grad) and
backpropagate ``c_k * term``; then commit the
branch's clean block (no grad, the same view the rollout used) to advance the context. Gradients flow only
through the current block's forward (cached K/V are detached), and only for tuples in the window.
"""
from __future__ import annotations

import torch

from kvpo_megatron.kvpo.objective import tve_term
from kvpo_megatron.kvpo.rollout import BlockDriver, BranchRollout, RolloutGroup, active_at, replay_velocity
from kvpo_megatron.sampling import StreamingGenerator


def replay_branch(gen: StreamingGenerator, group: RolloutGroup, branch: BranchRollout, coeff: float,
                  *, loss_scale: float = 1.0) -> float:
    """Accumulate ``coeff * dTVE_branch/dtheta`` into ``.grad``; returns the branch's TVE under grad weights."""
    cache = gen.new_cache()
    cache.restore(group.fork_state)
    driver = BlockDriver(gen, group.prompts)
    tve = 0.0
    for b in group.window:
        with torch.no_grad():
            driver.enter(cache, branch.latents, b)
        for tup in (t for t in branch.tuples if t.block == b):
            with torch.enable_grad():
                # the prompt's K/V depend on the cross-attention adapters: re-encode with grad per tuple
                text = gen.model.encode_text(active_at(group.contexts, tup.start).context)
                term = tve_term(tup.v_target, replay_velocity(gen, cache, tup, text)).sum()
                (term * (coeff * loss_scale)).backward()
            tve += float(term.detach())
        with torch.no_grad():
            driver.commit(cache, branch.latents, b, branch.commit_frames.get(b))
    return tve


def replay_gradients(gen: StreamingGenerator, group: RolloutGroup, coeffs: torch.Tensor, *,
                     loss_scale: float = 1.0) -> list[float]:
    """Gradient phase for all branches of a group on this rank; returns per-branch TVE (with grad weights)."""
    return [replay_branch(gen, group, br, float(c), loss_scale=loss_scale) for br, c in zip(group.branches, coeffs)]
