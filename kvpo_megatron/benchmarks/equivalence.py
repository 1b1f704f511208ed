"""One KVPO iteration under several parallel layouts, compared with a single-rank reference.

Runs the real trainer (tiny config, 2 two-prompt samples with a prompt switch and recache, a window roll, a
CHR rollout, replay, TVE, loss, one AdamW step) and saves per rank: anchor/branch latents, routes, TVEs, loss,
full (TP-gathered) LoRA gradients, the LoRA before and after the step. Works with gloo on CPU and NCCL on GPUs.

    torchrun --standalone --nproc_per_node 1 tools/kvpo_equivalence.py run --layouts ref,ref_split2,ref_split3 \
        --out DIR --dtype fp32,bf16
    torchrun --standalone --nproc_per_node 2 tools/kvpo_equivalence.py run \
        --layouts tp2,cp2,cp2_allgather,dp2,dp2_branches --out DIR --dtype fp32,bf16
    torchrun --standalone --nproc_per_node 4 tools/kvpo_equivalence.py run --layouts tp2cp2 --out DIR
    python tools/kvpo_equivalence.py compare DIR      # prints one JSON line, exit 1 on a failure

``run --set KEY=VALUE ...`` adds config overrides to every layout (run ``ref`` and the layouts with the same ones),
e.g. the TE spec: ``--set model.overrides.spec=te model.overrides.use_cpu_initialization=false``. The fp32 rule
below cannot hold there: TE's GEMMs compute fp32 inputs in TF32 (cuBLASLt ``CUBLAS_COMPUTE_32F_FAST_TF32``), so its
layouts differ at TF32's resolution (~5e-4; ``tools/BENCHMARKS.md``). The bf16 rule does run there, with the floor from
``ref_split2``/``ref_split3`` under the same ``--set``: they split the aten matmuls (LoRA, embeddings, the backward's)
but not TE's GEMMs, so that floor is below the TE layouts' true one and the rule is stricter, not looser.

Pass rules (``compare``; the ``ref*`` layouts need a world of one process):

* fp32: every error (max abs over latents, TVEs, losses and LoRA weights after the step; relative L2 of the
  LoRA gradients) <= ``--tol`` (1e-5), routes equal, and the LoRA step itself > 10x ``--tol`` (not vacuous).
* bf16: a fixed tolerance cannot work. The rollout streams 6 blocks through a chaotic map (each block's latents
  feed the next block's cache), so one bf16 rounding difference in any matmul grows to ~2e-2 in the latents, and
  the TVE is the squared residual of two nearly equal bf16 velocities, so the LoRA gradients move by ~9%
  relative; the LoRA step (~6e-3 at lr 1e-2) is no larger than that noise in absolute terms. What a correct
  layout may change is the *order of reductions*: TP=2 sums two bf16 partial products of every row-parallel
  linear (the all-reduce), CP shards tokens and all-gathers or all-to-alls K/V, DP sums fp32 gradients across
  ranks. So the noise floor is measured, per metric, as the largest deviation from ``ref`` of two single-process
  runs of the same iteration whose matmuls re-associate their reduction: ``ref_split2``/``ref_split3`` run
  ``ref`` with every matmul (mm/addmm/bmm, forward and backward, model and LoRA) computed as the sum of two
  partial products over the inner dimension split at 1/2 resp. 1/3, each partial rounded to the working dtype --
  exactly the extra rounding TP=2's row-parallel all-reduce introduces, applied to every linear. That is a fair
  floor: it is the same function evaluated in a different but equally valid order, on the same device and
  kernels as the layouts (the splits are two independent samples of that noise; the floor is their max).
  A layout passes when routes are equal and every error <= ``K_BF16`` (4) x max(floor, ``--tol``), and the LoRA
  step exceeds ``K_BF16`` x the LoRA floor (the update is visible above the noise). Measured on CPU/gloo, the
  largest error/floor ratio over tp2, cp2, cp2_allgather, dp2 and dp2_branches was 1.9 (tp2's loss; DP layouts
  generate bitwise equal videos); a doubled gradient (a missing average), another prompt's videos or a doubled
  LoRA step fail (tests/parallel/test_kvpo_layouts.py). bf16 cannot see a bug smaller than its noise: on the tiny model
  two branches differ by ~3e-2 (routing barely matters to random weights), so swapping them passes, and the LoRA
  floor is ~4% of the step, so only step errors above ~15% show; fp32 at 1e-5 is the exact check.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvpo_megatron.cli import setup_logging
from kvpo_megatron.config import deep_merge, from_dict, parse_overrides
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
from kvpo_megatron.kvpo.trainer import KVPOTrainer
from kvpo_megatron.lora import lora_full_state_dict
from kvpo_megatron.parallel.state import init_distributed

# The tiny model's branches differ by ~1e-6 in reward, so normalised advantages would amplify float round-off
# between layouts; fixed, well-separated per-branch offsets make the advantages well conditioned.
OFFSETS = [0.0, 0.3, -0.2, 0.1]
LAYOUTS: dict[str, list[str]] = {  # name -> overrides; every layout processes the same two prompts
    "ref": ["data.prompts_per_rank=2"],
    "ref_split2": ["data.prompts_per_rank=2"],  # ref with reductions split at 1/2 (SPLITS)
    "ref_split3": ["data.prompts_per_rank=2"],  # ... at 1/3
    "tp2": ["parallel.tensor_model_parallel_size=2", "data.prompts_per_rank=2"],
    "cp2": ["parallel.context_parallel_size=2", "data.prompts_per_rank=2"],
    "cp2_allgather": ["parallel.context_parallel_size=2", "parallel.cp_attention=allgather", "data.prompts_per_rank=2"],
    "dp2": ["data.prompts_per_rank=1"],  # rank r gets prompt r
    "dp2_branches": ["parallel.branches_over_dp=true", "data.prompts_per_rank=2", "parallel.replay_handoff=1",
                     "parallel.replay_ahead=1"],  # rank 1: branch 2 ahead, then 3 and rank 0's 1
    "dp4_branches": ["parallel.branches_over_dp=true", "data.prompts_per_rank=2", "parallel.replay_handoff=1",
                     "parallel.replay_ahead=1"],  # one branch per rank: rank 0's goes to rank 1
    "tp2cp2": ["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2",
               "parallel.cp_attention=allgather", "data.prompts_per_rank=2"],
}
SPLITS = {"ref_split2": 2, "ref_split3": 3}
"""Noise-floor references: the inner dimension of every matmul split at ``k // n``."""
K_BF16 = 4.0
"""A bf16 layout may deviate from ``ref`` by this multiple of the measured noise floor."""
METRICS = ("latents", "tve", "loss", "grad_rel", "lora")


class SplitReduction(TorchDispatchMode):
    """Evaluate every floating mm/addmm/bmm as the sum of two partial products over the inner dimension split
    at ``k // parts``, each rounded to the working dtype (TP's row-parallel all-reduce, on every linear).

    A dispatch mode sits below autograd, so the backward's matmuls (torch's and megatron's) are split too.
    ``calls`` counts the split ops (a run with none measured nothing)."""

    def __init__(self, parts: int):
        super().__init__()
        self.parts, self.calls = parts, 0

    def _split(self, mm, a, b):
        h = a.shape[-1] // self.parts
        self.calls += 1
        return mm(a[..., :h], b[..., :h, :]) + mm(a[..., h:], b[..., h:, :])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.mm.default, aten.bmm.default) and args[0].is_floating_point() and \
                args[0].shape[-1] >= self.parts:
            return self._split(func, *args)
        if func is aten.addmm.default and args[1].is_floating_point() and args[1].shape[-1] >= self.parts and \
                kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1:
            return self._split(aten.mm.default, args[1], args[2]) + args[0]
        return func(*args, **kwargs)


class OffsetRewardTrainer(KVPOTrainer):
    """The trainer with fixed per-branch reward offsets (:data:`OFFSETS`) added to every reward component."""

    def score_group(self, group, sample):
        rewards, anchor = super().score_group(group, sample)
        off = torch.tensor([OFFSETS[b.branch] for b in group.branches])
        return {k: v + off for k, v in rewards.items()}, anchor


def write_prompts(path: Path) -> Path:
    rows = [{"prompts": ["a fox in snow", "the fox jumps into a river"], "switch_frames": [9]},
            {"prompts": ["a paper boat on a rainy street", "the boat sinks"], "switch_frames": [9]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run_layout(out: str | Path, prompts: str | Path, *overrides: str, dtype: str = "fp32",
               split: int | None = None) -> dict:
    """One iteration under ``overrides``; ``split``: run it under :class:`SplitReduction` (noise-floor refs)."""

    dt = ["model.overrides.params_dtype=bfloat16", "model.overrides.bf16=true"] if dtype == "bf16" else []
    if dtype == "fp32":  # true fp32 on GPUs (TF32 would dominate the differences)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, parse_overrides([
        "train.iterations=1", "train.progress=false", f"train.out_dir={out}", f"data.prompts={prompts}",
        # Adam's first step is ~lr*sign(g): with eps=1e-8 entries whose gradient is ~1e-10 (round-off) move by
        # ~lr/100 differently per layout; eps=1e-3 keeps the update a smooth function of the gradient.
        "optim.warmup_steps=1", "optim.eps=1e-3", "objective.guard=false",
        # The layouts are compared at the method's objective (tau 1, beta 10) and a 1e-2 step, not the tiny default's
        # demo temperature (tau 3e-3), under which bf16 round-off of the TVEs moves the coefficients as much as the
        # update itself and the bf16 rule could not tell a layout bug from noise.
        "objective.tau=1.0", "objective.beta=10.0", "optim.lr=1e-2", "routing.steps=first_half", *dt, *overrides])))
    tr = OffsetRewardTrainer(cfg)
    cpu = lambda t: t.detach().float().cpu()  # noqa: E731
    lora_init = {k: cpu(v) for k, v in lora_full_state_dict(tr.model).items()}
    mode = SplitReduction(split) if split else nullcontext()
    with mode:
        tr.train()
    if split and not mode.calls:
        raise RuntimeError("SplitReduction split no matmul: the noise-floor reference measured nothing")
    res = tr.last_results
    return {
        "lora_init": lora_init,
        "lora": {k: cpu(v) for k, v in lora_full_state_dict(tr.model).items()},
        "grad": {k: cpu(v) for k, v in lora_full_state_dict(tr.model, grad=True).items()},
        "prompt_index": [r.group.prompt_index for r in res],
        "anchor": [None if r.group.anchor is None else cpu(r.group.anchor.latents) for r in res],
        "replayed": [r.replayed for r in res],
        "branches": [{b.branch: cpu(b.latents) for b in r.group.branches} for r in res],
        "tve": [cpu(r.tve) for r in res],
        "loss": [float(r.terms.total) for r in res],
        "routes": [{b.branch: b.routes for b in r.group.branches} for r in res],
    }


def run_named(name: str, out: str | Path, prompts: str | Path, *, dtype: str = "fp32",
              extra: list[str] = ()) -> dict:
    """Run the layout ``name`` of :data:`LAYOUTS` (the ``ref*`` ones only in a world of one process); ``extra``:
    overrides added to the layout's."""
    import torch.distributed as dist

    if name.startswith("ref") and dist.is_initialized() and dist.get_world_size() != 1:
        raise SystemExit(f"layout {name} is a single-process reference: run it with --nproc_per_node 1")
    return run_layout(out, prompts, *LAYOUTS[name], *extra, dtype=dtype, split=SPLITS.get(name))


def compare(got: dict, ref: dict, lora0: dict | None = None) -> dict:
    """Max errors of one rank's results against the reference (matched by prompt index)."""
    lora0 = ref["lora_init"] if lora0 is None else lora0
    idx = [ref["prompt_index"].index(p) for p in got["prompt_index"]]
    err = {"latents": 0.0, "tve": 0.0, "loss": 0.0, "routes_equal": True}
    for j, i in enumerate(idx):
        anchor = [] if got["anchor"][j] is None else [got["anchor"][j] - ref["anchor"][i]]  # on one DP rank only
        err["latents"] = max(err["latents"], *[d.abs().max().item() for d in anchor],
                             *[(lat - ref["branches"][i][k]).abs().max().item() for k, lat in got["branches"][j].items()])
        err["tve"] = max(err["tve"], (got["tve"][j] - ref["tve"][i]).abs().max().item())
        err["loss"] = max(err["loss"], abs(got["loss"][j] - ref["loss"][i]))
        err["routes_equal"] &= all(got["routes"][j][k] == ref["routes"][i][k] for k in got["routes"][j])
    err["grad_rel"] = max(((got["grad"][k] - ref["grad"][k]).norm() / (ref["grad"][k].norm() + 1e-12)).item()
                          for k in ref["grad"])
    err["lora"] = max((got["lora"][k] - ref["lora"][k]).abs().max().item() for k in ref["lora"])
    err["lora_step"] = max((ref["lora"][k] - lora0[k]).abs().max().item() for k in ref["lora"])
    return err


def noise_floor(ref: dict, alternates: list[dict]) -> dict:
    """Per metric, the largest deviation of the re-associated references from ``ref``."""
    errs = [compare(a, ref) for a in alternates]
    if not errs or not all(e["routes_equal"] for e in errs):
        raise ValueError("noise floor needs >= 1 alternate reference with the reference's routes")
    return {k: max(e[k] for e in errs) for k in METRICS}


def limits(dtype: str, tol: float, floor: dict | None = None) -> dict:
    """Allowed error per metric (and the least LoRA step, under ``lora_step``)."""
    if dtype == "fp32":
        return {**{k: tol for k in METRICS}, "lora_step": 10 * tol}
    if floor is None:
        raise ValueError("the bf16 rule needs the noise floor (run ref_split2,ref_split3 in bf16)")
    lim = {k: K_BF16 * max(floor[k], tol) for k in METRICS}
    return {**lim, "lora_step": lim["lora"]}


def passes(err: dict, lim: dict | float) -> bool:
    """``lim``: :func:`limits`'s dict, or a number (the fp32 rule at that tolerance)."""
    lim = limits("fp32", lim) if isinstance(lim, (int, float)) else lim
    return err["routes_equal"] and err["lora_step"] > lim["lora_step"] and all(err[k] <= lim[k] for k in METRICS)


def _main_run(args):
    import torch.distributed as dist


    init_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    if dist.get_rank() == 0 and not prompts.exists():
        write_prompts(prompts)
    dist.barrier()
    for dtype in args.dtype.split(","):
        for name in args.layouts.split(","):
            res = run_named(name, out / f"run-{name}-{dtype}", prompts, dtype=dtype, extra=args.set)
            torch.save(res, out / f"{name}-{dtype}-rank{dist.get_rank()}.pt")


def compare_dir(out: Path, tol: dict[str, float]) -> dict:
    """Compare every saved layout file with ``ref``; see the module docstring for the rules."""
    report, floors, lims = {}, {}, {}
    for dtype in ("fp32", "bf16"):
        if not (out / f"ref-{dtype}-rank0.pt").exists():
            continue
        ref = torch.load(out / f"ref-{dtype}-rank0.pt")
        alts = [torch.load(out / f"{n}-{dtype}-rank0.pt") for n in SPLITS if (out / f"{n}-{dtype}-rank0.pt").exists()]
        floors[dtype] = noise_floor(ref, alts) if alts else None
        try:
            lim = limits(dtype, tol[dtype], floors[dtype])
        except ValueError as e:  # bf16 without its noise-floor references: every bf16 layout fails
            lim, floors[dtype] = None, str(e)
        lims[dtype] = lim
        for f in sorted(out.glob(f"*-{dtype}-rank*.pt")):
            name = f.name.split(f"-{dtype}-")[0]
            if name.startswith("ref"):
                continue
            e = compare(torch.load(f), ref)
            key = f"{name}/{dtype}"
            prev = report.get(key, {})
            report[key] = {k: (max(v, prev.get(k, v)) if isinstance(v, float) else v and prev.get(k, True))
                           for k, v in e.items() if k != "pass"}
            report[key]["pass"] = lim is not None and passes(report[key], lim)
    return {"tolerance": tol, "k_bf16": K_BF16, "noise_floor": floors, "limits": lims, "layouts": report}


def _main_compare(args):
    out = compare_dir(Path(args.out), {"fp32": args.tol, "bf16": args.tol})
    print(json.dumps(out))
    return 0 if out["layouts"] and all(e["pass"] for e in out["layouts"].values()) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--layouts", required=True, help=f"comma-separated names of {sorted(LAYOUTS)}")
    r.add_argument("--out", required=True)
    r.add_argument("--dtype", default="fp32", help="fp32, bf16 or both (fp32,bf16)")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides added to every layout (e.g. model.overrides.spec=te "
                        "model.overrides.use_cpu_initialization=false); run ref and the layouts with the same ones")
    c = sub.add_parser("compare")
    c.add_argument("out")
    c.add_argument("--tol", type=float, default=1e-5, help="fp32 tolerance; also the bf16 floor's minimum")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        setup_logging()
        bad = [n for n in a.layouts.split(",") if n not in LAYOUTS] + \
            [d for d in a.dtype.split(",") if d not in ("fp32", "bf16")]
        if bad:
            print(f"error: unknown layout(s)/dtype(s) {bad}; layouts: {sorted(LAYOUTS)}, dtypes: fp32, bf16",
                  file=sys.stderr)
            return 2
        try:
            from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, parse_overrides(a.set)))
        except ConfigError as e:
            print(f"error: --set: {e}", file=sys.stderr)
            return 2
        _main_run(a)
        return 0
    return _main_compare(a)
