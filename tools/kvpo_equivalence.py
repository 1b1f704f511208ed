"""One KVPO iteration under several parallel layouts, compared with a single-rank reference.

Runs the real trainer (tiny config, 2 two-prompt samples with a prompt switch and recache, a window roll, a
CHR rollout, replay, TVE, loss, one AdamW step) and saves per rank: anchor/branch latents, routes, TVEs, loss,
full (TP-gathered) LoRA gradients and updated LoRA weights. Works with gloo on CPU and NCCL on GPUs.

    torchrun --nproc_per_node 1 tools/kvpo_equivalence.py run --layouts ref,ref0 --out DIR [--dtype bf16]
    torchrun --nproc_per_node 2 tools/kvpo_equivalence.py run --layouts tp2,cp2,dp2,dp2_branches --out DIR
    torchrun --nproc_per_node 4 tools/kvpo_equivalence.py run --layouts tp2cp2 --out DIR
    python tools/kvpo_equivalence.py compare DIR --tol 1e-5        # prints one JSON line, exit 1 on a failure
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# The tiny model's branches differ by ~1e-6 in reward, so normalised advantages would amplify float round-off
# between layouts; fixed, well-separated per-branch offsets make the advantages well conditioned.
OFFSETS = [0.0, 0.3, -0.2, 0.1]
LAYOUTS: dict[str, list[str]] = {  # name -> overrides; every layout processes the same two prompts
    "ref": ["data.prompts_per_rank=2"],
    "ref0": ["data.prompts_per_rank=2", "optim.lr=0.0"],  # the LoRA before the step
    "tp2": ["parallel.tensor_model_parallel_size=2", "data.prompts_per_rank=2"],
    "cp2": ["parallel.context_parallel_size=2", "data.prompts_per_rank=2"],
    "cp2_allgather": ["parallel.context_parallel_size=2", "parallel.cp_attention=allgather", "data.prompts_per_rank=2"],
    "dp2": ["data.prompts_per_rank=1"],  # rank r gets prompt r
    "dp2_branches": ["parallel.branches_over_dp=true", "data.prompts_per_rank=2"],
    "tp2cp2": ["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2",
               "parallel.cp_attention=allgather", "data.prompts_per_rank=2"],
}


def write_prompts(path: Path) -> Path:
    rows = [{"prompts": ["a fox in snow", "the fox jumps into a river"], "switch_frames": [9]},
            {"prompts": ["a paper boat on a rainy street", "the boat sinks"], "switch_frames": [9]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run_layout(out: str | Path, prompts: str | Path, *overrides: str, dtype: str = "fp32") -> dict:
    from kvpo_megatron.config import deep_merge, from_dict, parse_overrides
    from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
    from kvpo_megatron.kvpo.trainer import KVPOTrainer
    from kvpo_megatron.lora import lora_full_state_dict

    dt = ["model.overrides.params_dtype=bfloat16", "model.overrides.bf16=true"] if dtype == "bf16" else []
    if dtype == "fp32":  # true fp32 on GPUs (TF32 would dominate the differences)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, parse_overrides([
        "train.iterations=1", "train.progress=false", f"train.out_dir={out}", f"data.prompts={prompts}",
        # Adam's first step is ~lr*sign(g): with eps=1e-8 entries whose gradient is ~1e-10 (round-off) move by
        # ~lr/100 differently per layout; eps=1e-3 keeps the update a smooth function of the gradient.
        "optim.warmup_steps=1", "optim.eps=1e-3", "objective.guard=false", *dt, *overrides])))
    tr = KVPOTrainer(cfg)
    score = tr._score

    def offset_score(group, sample):
        rewards, anchor = score(group, sample)
        off = torch.tensor([OFFSETS[b.branch] for b in group.branches])
        return {k: v + off for k, v in rewards.items()}, anchor

    tr._score = offset_score
    tr.train()
    res = tr.last_results
    cpu = lambda t: t.detach().float().cpu()  # noqa: E731
    return {
        "lora": {k: cpu(v) for k, v in lora_full_state_dict(tr.model).items()},
        "grad": {k: cpu(v) for k, v in lora_full_state_dict(tr.model, grad=True).items()},
        "prompt_index": [r.group.prompt_index for r in res],
        "anchor": [cpu(r.group.anchor.latents) for r in res],
        "branches": [{b.branch: cpu(b.latents) for b in r.group.branches} for r in res],
        "tve": [cpu(r.tve) for r in res],
        "loss": [float(r.terms.total) for r in res],
        "routes": [{b.branch: b.routes for b in r.group.branches} for r in res],
    }


def compare(got: dict, ref: dict, lora0: dict) -> dict:
    """Max errors of one rank's results against the reference (matched by prompt index)."""
    idx = [ref["prompt_index"].index(p) for p in got["prompt_index"]]
    err = {"latents": 0.0, "tve": 0.0, "loss": 0.0, "routes_equal": True}
    for j, i in enumerate(idx):
        err["latents"] = max(err["latents"], (got["anchor"][j] - ref["anchor"][i]).abs().max().item(),
                             *[(lat - ref["branches"][i][k]).abs().max().item() for k, lat in got["branches"][j].items()])
        err["tve"] = max(err["tve"], (got["tve"][j] - ref["tve"][i]).abs().max().item())
        err["loss"] = max(err["loss"], abs(got["loss"][j] - ref["loss"][i]))
        err["routes_equal"] &= all(got["routes"][j][k] == ref["routes"][i][k] for k in got["routes"][j])
    err["grad_rel"] = max(((got["grad"][k] - ref["grad"][k]).norm() / (ref["grad"][k].norm() + 1e-12)).item()
                          for k in ref["grad"])
    err["lora"] = max((got["lora"][k] - ref["lora"][k]).abs().max().item() for k in ref["lora"])
    err["lora_step"] = max((ref["lora"][k] - lora0[k]).abs().max().item() for k in ref["lora"])
    return err


def passes(err: dict, tol: float) -> bool:
    return (err["routes_equal"] and err["lora_step"] > 10 * tol and
            all(err[k] <= tol for k in ("latents", "tve", "loss", "grad_rel", "lora")))


def _main_run(args):
    import torch.distributed as dist

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    if int(os.environ.get("RANK", "0")) == 0:
        write_prompts(prompts)
    for name in args.layouts.split(","):
        res = run_layout(out / f"run-{name}", prompts, *LAYOUTS[name], dtype=args.dtype)
        torch.save(res, out / f"{name}-{args.dtype}-rank{dist.get_rank() if dist.is_initialized() else 0}.pt")


def _main_compare(args):
    out = Path(args.out)
    report = {}
    for dtype in ("fp32", "bf16"):
        if not (out / f"ref-{dtype}-rank0.pt").exists():
            continue
        ref = torch.load(out / f"ref-{dtype}-rank0.pt")
        lora0 = torch.load(out / f"ref0-{dtype}-rank0.pt")["lora"]
        for f in sorted(out.glob(f"*-{dtype}-rank*.pt")):
            name = f.name.split(f"-{dtype}-")[0]
            if name in ("ref", "ref0"):
                continue
            e = compare(torch.load(f), ref, lora0)
            key = f"{name}/{dtype}"
            prev = report.get(key, {})
            report[key] = {k: (max(v, prev.get(k, v)) if isinstance(v, float) else v and prev.get(k, True))
                           for k, v in e.items()}
    tol = {"fp32": args.tol, "bf16": args.tol_bf16}
    for key, e in report.items():
        e["pass"] = passes(e, tol[key.split("/")[1]])
    print(json.dumps({"tolerance": tol, "layouts": report}))
    return 0 if report and all(e["pass"] for e in report.values()) else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--layouts", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    c = sub.add_parser("compare")
    c.add_argument("out")
    c.add_argument("--tol", type=float, default=1e-5)
    c.add_argument("--tol-bf16", type=float, default=5e-2)
    a = ap.parse_args()
    if a.cmd == "run":
        from kvpo_megatron.cli import setup_logging
        setup_logging()
        _main_run(a)
    else:
        sys.exit(_main_compare(a))
