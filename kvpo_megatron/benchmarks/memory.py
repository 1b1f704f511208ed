"""Predicted per-GPU memory of one KVPO iteration (``kvpo_megatron/kvpo/memory_model.py``), as JSON lines.

    python tools/memory_model.py --preset wan-14b --tp 2 --frames 147          # one layout
    python tools/memory_model.py --scenarios                                    # the issue-16 layouts
    python tools/memory_model.py --preset wan-14b --tp 2 --cache shared --capacity-gb 140 --fit

``--fit`` prints, when the plan does not fit ``--capacity-gb``, the first cheaper-memory plan that does
(smaller branch batches of the shared cache, then per-layer replay recompute), or ``"fits": false``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from kvpo_megatron.cli import exit_code
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.kvpo.memory_model import MemoryPlan, fit, predict

H200_GB = 140.0
"""An H200 has 143771 MiB = 150.7 GB (nvidia-smi); ~10 GB are kept for the CUDA context, NCCL, the allocator's
fragmentation and CUDA-graph pools, which the model does not count."""

SCENARIOS = {  # name -> plan: the layouts issue 16 asks to predict (G=8, W=5, 480x832, LoRA r=256 everywhere)
    "1.3b-1gpu-147f-bench": MemoryPlan(lora_bytes=2),  # tools/bench_iteration.py casts LoRA to bf16
    "1.3b-1gpu-147f": MemoryPlan(),
    "1.3b-1gpu-147f-legacy-bench": MemoryPlan(cache="legacy", lora_bytes=2, ema=False),  # measured 43.5 GB (no EMA yet)
    "14b-tp2-21f": MemoryPlan(preset="wan-14b", tp=2, frames=21),
    "14b-tp2-27f-script": MemoryPlan(preset="wan-14b", tp=2, frames=27, pivot=4, spec="te", branch_batch=1,
                                     replay_batch=4, recompute="blocks"),  # run_multi_gpu_benchmarks.sh's 14B step
    "14b-tp2-147f": MemoryPlan(preset="wan-14b", tp=2),
    "14b-tp2-147f-batch9": MemoryPlan(preset="wan-14b", tp=2, branch_batch=9),
    "14b-8gpu-tp8": MemoryPlan(preset="wan-14b", tp=8),
    "14b-8gpu-tp4-dp2-branches": MemoryPlan(preset="wan-14b", tp=4, branches_over_dp=2),
    "14b-8gpu-tp2-cp4": MemoryPlan(preset="wan-14b", tp=2, cp=4),
    "14b-8gpu-cp8": MemoryPlan(preset="wan-14b", cp=8),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", action="store_true", help="print the predefined layouts (other flags ignored)")
    ap.add_argument("--capacity-gb", type=float, default=H200_GB)
    ap.add_argument("--fit", action="store_true", help="if it does not fit, search a plan that does")
    for f in dataclasses.fields(MemoryPlan):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name in ("latent_hw", "lora_targets"):
            ap.add_argument(flag, default=",".join(map(str, f.default)), help="comma-separated")
        else:
            typ = {"int": int, "str": str, "int | None": int, "float": float, "float | None": float}[f.type]
            ap.add_argument(flag, type=typ, default=f.default)
    return ap.parse_args(argv)


def plan_from(args) -> MemoryPlan:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(MemoryPlan)}
    kw["latent_hw"] = tuple(int(x) for x in str(kw["latent_hw"]).split(","))
    kw["lora_targets"] = tuple(str(kw["lora_targets"]).split(","))
    return MemoryPlan(**kw)


def report(name: str, plan: MemoryPlan, capacity: float, search: bool) -> dict:
    out = {"name": name, **predict(plan), "capacity_gb": capacity}
    out["fits"] = out["peak_gb"] <= capacity
    if search and not out["fits"]:
        found = fit(plan, capacity)
        out["fitting_plan"] = None if found is None else {"plan": dataclasses.asdict(found[0]),
                                                          "peak_gb": found[1]["peak_gb"]}
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.scenarios:
        rows = [report(n, p, args.capacity_gb, True) for n, p in SCENARIOS.items()]
    else:
        rows = []

        def custom():
            try:
                rows.append(report("custom", plan_from(args), args.capacity_gb, args.fit))
            except ValueError as e:
                raise ConfigError(str(e)) from e

        code = exit_code(custom)  # bad input: one ``error:`` line and exit code 2, as every tool
        if code:
            raise SystemExit(code)
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
