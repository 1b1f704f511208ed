"""One full KVPO iteration under TP=2, CP=2, DP=2 (prompts), DP=2 (branches) and TP2xCP2 equals a single process.

Each run covers streaming generation across a window roll and a prompt switch (with recache), a CHR rollout,
replay, TVE and loss, one AdamW step, and the updated LoRA weights (gathered to full tensors).
The runs are tools/kvpo_equivalence.py's, here on gloo; the same tool runs them with NCCL on GPUs.
"""
from __future__ import annotations

import torch

from tests.dist_utils import run_workers
from tools.kvpo_equivalence import LAYOUTS, compare, passes, run_layout, write_prompts

TOL = 1e-5


def _worker(rank, world, tmp, prompts, ref, lora0, names):
    errs = []
    for name in names:
        e = compare(run_layout(f"{tmp}/{name}", prompts, *LAYOUTS[name]), ref, lora0)
        if not passes(e, TOL):
            errs.append(f"{name} rank {rank}: {e}")
    torch.save(errs, f"{tmp}/errs-{world}-{rank}.pt")


def test_kvpo_iteration_equal_across_layouts(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    ref = run_layout(tmp_path / "ref", prompts, *LAYOUTS["ref"])
    lora0 = run_layout(tmp_path / "ref0", prompts, *LAYOUTS["ref0"])["lora"]
    run_workers(_worker, 2, str(tmp_path), str(prompts), ref, lora0, ["tp2", "cp2", "dp2", "dp2_branches"])
    run_workers(_worker, 4, str(tmp_path), str(prompts), ref, lora0, ["tp2cp2"])
    errs = [e for world in (2, 4) for r in range(world) for e in torch.load(tmp_path / f"errs-{world}-{r}.pt")]
    assert not errs, "\n".join(errs)
