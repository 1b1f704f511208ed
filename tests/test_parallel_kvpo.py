"""One full KVPO iteration under TP=2, CP=2, DP=2 (prompts), DP=2 (branches) and TP2xCP2 equals a single process.

Each run covers streaming generation across a window roll and a prompt switch (with recache), a CHR rollout,
replay, TVE and loss, one AdamW step, and the updated LoRA weights (gathered to full tensors).
"""
from __future__ import annotations

import json

import torch

from kvpo_megatron.config import deep_merge, from_dict, parse_overrides
from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
from tests.dist_utils import run_workers

TOL = 1e-5
# The tiny model's branches differ by ~1e-6 in reward, so normalised advantages would amplify float round-off
# between layouts; fixed, well-separated per-branch offsets make the advantages well conditioned.
OFFSETS = [0.0, 0.3, -0.2, 0.1]


def _write_prompts(path):
    rows = [{"prompts": ["a fox in snow", "the fox jumps into a river"], "switch_frames": [9]},
            {"prompts": ["a paper boat on a rainy street", "the boat sinks"], "switch_frames": [9]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _run(out, prompts, *overrides) -> dict:
    from kvpo_megatron.kvpo.trainer import KVPOTrainer
    from kvpo_megatron.lora import lora_full_state_dict

    cfg = from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, parse_overrides([
        "train.iterations=1", "train.progress=false", f"train.out_dir={out}", f"data.prompts={prompts}",
        # Adam's first step is ~lr*sign(g): with eps=1e-8, entries whose gradient is ~1e-10 (round-off) move by
        # ~lr/100 differently per layout; eps=1e-3 keeps the update a smooth function of the gradient.
        "optim.warmup_steps=1", "optim.eps=1e-3", "objective.guard=false", *overrides])))
    tr = KVPOTrainer(cfg)
    score = tr._score

    def offset_score(group, sample):
        rewards, anchor = score(group, sample)
        off = torch.tensor([OFFSETS[b.branch] for b in group.branches])
        return {k: v + off for k, v in rewards.items()}, anchor

    tr._score = offset_score
    tr.train()
    res = tr.last_results
    return {
        "lora": lora_full_state_dict(tr.model),
        "grad": lora_full_state_dict(tr.model, grad=True),
        "anchor": [r.group.anchor.latents for r in res],
        "branches": [{b.branch: b.latents for b in r.group.branches} for r in res],
        "tve": [r.tve for r in res],
        "loss": [float(r.terms.total) for r in res],
        "reward": tr.metrics.history[-1]["reward_mean"],
        "routes": [{b.branch: b.routes for b in r.group.branches} for r in res],
    }


def _compare(got: dict, ref: dict, prompt_slice: slice, name: str) -> list[str]:
    errs = []
    for key in ("anchor", "tve", "loss"):
        for a, b in zip(got[key], ref[key][prompt_slice]):
            d = (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item()
            if d > TOL:
                errs.append(f"{name}: {key} differs by {d}")
    for gb, rb in zip(got["branches"], ref["branches"][prompt_slice]):
        for k, lat in gb.items():
            d = (lat - rb[k]).abs().max().item()
            if d > TOL:
                errs.append(f"{name}: branch {k} latents differ by {d}")
    for gr, rr in zip(got["routes"], ref["routes"][prompt_slice]):
        if any(gr[k] != rr[k] for k in gr):
            errs.append(f"{name}: routes differ")
    g_err = max(((got["grad"][k] - ref["grad"][k]).norm() / (ref["grad"][k].norm() + 1e-12)).item()
                for k in ref["grad"])
    if g_err > TOL or max(ref["grad"][k].abs().max().item() for k in ref["grad"]) == 0:
        errs.append(f"{name}: LoRA gradients differ (relative {g_err}) or vanish")
    worst = max((got["lora"][k] - ref["lora"][k]).abs().max().item() for k in ref["lora"])
    if worst > TOL:
        errs.append(f"{name}: updated LoRA differs by {worst}")
    moved = max((got["lora"][k] - ref["lora0"][k]).abs().max().item() for k in ref["lora"])
    if moved < 1e-4:
        errs.append(f"{name}: the optimizer step did not move the LoRA ({moved})")
    return errs


def _worker(rank, world, tmp, prompts, ref, layouts):
    errs = []
    for name, overrides, prompt_slice in layouts:
        got = _run(f"{tmp}/{name}", prompts, *overrides)
        errs += _compare(got, ref, prompt_slice, name)
    torch.save(errs, f"{tmp}/errs-{world}-{rank}.pt")


def test_kvpo_iteration_equal_across_layouts(tmp_path):
    from kvpo_megatron.lora import apply_lora, lora_full_state_dict  # noqa: F401

    prompts = tmp_path / "prompts.jsonl"
    _write_prompts(prompts)
    ref = _run(tmp_path / "ref", prompts, "data.prompts_per_rank=2")
    ref["lora0"] = _run(tmp_path / "ref0", prompts, "data.prompts_per_rank=2", "optim.lr=0.0")["lora"]
    two = [
        ("tp2", ["parallel.tensor_model_parallel_size=2", "data.prompts_per_rank=2"], slice(0, 2)),
        ("cp2", ["parallel.context_parallel_size=2", "data.prompts_per_rank=2"], slice(0, 2)),
        ("dp2", ["data.prompts_per_rank=1"], None),  # rank r gets prompt r
        ("dp2_branches", ["parallel.branches_over_dp=true", "data.prompts_per_rank=2"], slice(0, 2)),
    ]
    run_workers(_worker_two, 2, str(tmp_path), str(prompts), ref, two)
    run_workers(_worker, 4, str(tmp_path), str(prompts), ref,
                [("tp2cp2", ["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2",
                             "parallel.cp_attention=allgather", "data.prompts_per_rank=2"], slice(0, 2))])
    errs = []
    for world, n in ((2, 2), (4, 4)):
        for r in range(n):
            errs += torch.load(tmp_path / f"errs-{world}-{r}.pt")
    assert not errs, "\n".join(errs)


def _worker_two(rank, world, tmp, prompts, ref, layouts):
    fixed = [(n, o, s if s is not None else slice(rank, rank + 1)) for n, o, s in layouts]
    _worker(rank, world, tmp, prompts, ref, fixed)
