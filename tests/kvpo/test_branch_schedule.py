"""Branches over DP (kvpo/branch_schedule.py): the hand-off count and assignment, the gradient stash, and the
hand-off of replay inputs between two gloo ranks. The whole schedule against one process (fp32 within 1e-5) is
tests/parallel/test_kvpo_layouts.py's dp2_branches layout."""
from __future__ import annotations

import pytest
import torch

from kvpo_megatron.kvpo import branch_schedule as bs
from kvpo_megatron.kvpo.types import BranchRollout, ReplayTuple
from tests.dist_utils import run_workers


def test_plan_counts_fit_the_ahead_replays_in_the_anchor_gap():
    # the 147-frame bench: 23 blocks after the pivot, 4 steps, W=5, 2 routed steps: A=115, R=35; a replay alone
    # costs 1.2 R, so 2 fit ahead (not 4: the measured over-fill), and rank 0 hands 1 of its 4 to balance the rest
    kw = dict(per_rank=4, suffix_blocks=23, steps=4, window_blocks=5, routed_steps=2, recompute=False)
    assert bs.plan_counts(dp_size=2, **kw) == (2, 1)
    assert bs.plan_counts(dp_size=1, **kw) == (0, 0)  # no other rank
    assert bs.plan_counts(dp_size=8, **{**kw, "per_rank": 1}) == (1, 1)  # clipped to one branch per rank
    assert bs.plan_counts(dp_size=2, **{**kw, "recompute": True}) == (2, 1)  # 115 / (1.2 * 45) -> 2
    assert bs.plan_counts(dp_size=2, **{**kw, "suffix_blocks": 2}) == (0, 0)  # a short anchor: nothing fits


def test_assign_gives_every_branch_to_exactly_one_rank():
    for dp, g, n, k in [(2, 8, 2, 2), (4, 8, 2, 1), (4, 16, 3, 4), (2, 4, 0, 0), (8, 8, 1, 1)]:
        plans = [bs.assign(dp_rank=r, dp_size=dp, num_branches=g, n=n, k=k) for r in range(dp)]
        done = sorted(x for p in plans for x in p.ahead + p.own + p.received)
        assert done == list(range(g)), (dp, g, n, k)
        assert len(plans[0].own) == g // dp - n and plans[0].ahead == []
        assert all(len(p.ahead) == k for p in plans[1:]) and all(p.handed == plans[0].handed for p in plans)
    p = bs.assign(dp_rank=1, dp_size=3, num_branches=6, n=2, k=1)
    assert (p.ahead, p.own, p.received, p.handed) == ([2], [3], [0], {1: [0], 2: [1]})


def test_grad_stash_combines_to_the_weighted_backward():
    torch.manual_seed(0)
    w = torch.randn(5, 3, requires_grad=True)
    xs = [torch.randn(4, 5) for _ in range(3)]
    loss = lambda x: (x @ w).pow(2).mean()  # noqa: E731
    coeffs, earlier = [0.7, -1.3, 2.1], torch.randn(5, 3)
    want = earlier + sum(c * torch.autograd.grad(loss(x), w)[0] for c, x in zip(coeffs, xs))

    grad = earlier.clone()  # the buffer already holds an earlier group's gradient
    stash = bs.GradStash([grad])
    assert grad.abs().max() == 0
    for k, x in enumerate(xs):
        grad += torch.autograd.grad(loss(x), w)[0]  # an unweighted backward into the buffer
        stash.capture(k)
    stash.combine({k: c for k, c in enumerate(coeffs)})
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-6)

    grad2 = earlier.clone()
    stash2 = bs.GradStash([grad2])
    grad2 += 1.0
    stash2.capture(0)
    with pytest.raises(ValueError, match="weights for"):
        stash2.combine({0: 1.0, 1: 1.0})
    stash2.discard()  # the guard skipped the group: only the earlier groups' sum remains
    assert torch.equal(grad2, earlier)


def _branch(g: int, dtype) -> BranchRollout:
    """A branch whose tuples' x is ``dtype`` and v_target fp32 (as a bf16 model's rollout stores them)."""
    gen = torch.Generator().manual_seed(g)
    tuples = [ReplayTuple(block=b, step=s, start=3 * b, timestep=0.1 * (s + 1) + 1e-9 * g,
                          x=torch.randn(1, 4, 3, 2, 2, generator=gen).to(dtype),
                          v_target=torch.randn(1, 4, 3, 2, 2, generator=gen)) for b in (2, 3) for s in (0, 1)]
    return BranchRollout(branch=g, latents=torch.randn(1, 4, 15, 2, 2, generator=gen).to(dtype), tuples=tuples,
                         routes={2: [3, 4, 5], 3: [1, 6, 7]}, commit_frames={2: [0, 1, 2, 3], 3: [[0, 1], [2, 3]]},
                         tve_old=0.1 + g / 3, tve_ref=0.2 - g / 7)


def _exchange_worker(rank, world, out):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    group = dist.new_group([0, 1, 2])
    plan = bs.assign(dp_rank=rank, dp_size=world, num_branches=6, n=2)  # rank 0 hands 0 -> rank 1, 1 -> rank 2
    mine = [_branch(g, torch.bfloat16) for g in range(2 * rank, 2 * rank + 2)]
    got = bs.exchange(mine, plan, dp_rank=rank, group=group, device=torch.device("cpu"))
    torch.save({"plan": plan.received, "received": [_plain(b) for b in got]}, f"{out}/rank{rank}.pt")


def _plain(b: BranchRollout) -> dict:
    """A branch as tensors and builtins (the test's files load with ``weights_only=True``)."""
    return {"branch": b.branch, "latents": b.latents, "routes": b.routes, "commit_frames": b.commit_frames,
            "tve": [b.tve_old, b.tve_ref], "meta": [[t.block, t.step, t.start, t.timestep] for t in b.tuples],
            "x": [t.x for t in b.tuples], "v": [t.v_target for t in b.tuples]}


def test_exchange_sends_rank0_branches_bitwise(tmp_path):
    run_workers(_exchange_worker, 3, str(tmp_path))
    for rank, gid in ((1, 0), (2, 1)):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        (got,) = res["received"]
        want = _plain(_branch(gid, torch.bfloat16))
        assert res["plan"] == [gid] and got["latents"].dtype == torch.bfloat16
        assert torch.equal(got.pop("latents"), want.pop("latents"))
        for k in ("x", "v"):
            assert all(torch.equal(a, b) for a, b in zip(got.pop(k), want.pop(k), strict=True)), k
        assert got == want  # branch, routes, commit views, TVEs and the tuples' (block, step, start, t) exactly
    assert torch.load(tmp_path / "rank0.pt")["received"] == []
