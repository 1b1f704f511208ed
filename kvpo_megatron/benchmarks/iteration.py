"""KVPO iterations (``KVPOTrainer.step``) on one or N processes: seconds per phase, throughput, scaling, memory.

Stand-ins, so that the model is what is measured: the weight-free ``hash`` text encoder, the ``preview`` latent
decoder (linear latent -> RGB, no VAE) and the ``brightness`` reward (a fixed, near-zero cost; ``time_reward``).
Random weights. The model (base and LoRA) is cast to ``--dtype`` after the trainer is built. The guard is off
(every group replays) and every prompt group uses the same pivot (``--pivot``, default the middle of the allowed
range), so every rank and layout does the same work. Trailing ``key=value`` arguments override any config field
(e.g. ``model.overrides.use_cpu_initialization=false``). One JSON line per layout (rank 0).

    python tools/bench_iteration.py --preset wan-1.3b --frames 147 --branches 8 --window 5
    python tools/bench_iteration.py --generator longlive2-5b --frames 64 --branches 8 --window 5 \
        --latent-h 44 --latent-w 80 --lora-rank 128      # LongLive 2.0 (Wan2.2-5B) at 1280x704
    python tools/bench_iteration.py --preset tiny --frames 18 --latent-h 8 --latent-w 8 --branches 4 --window 2 \
        --lora-rank 8 --device cpu --dtype fp32

Several GPUs (``torchrun``): ``--layouts`` runs one trainer per layout, one after the other, in one launch.
A layout is ``dp`` (TP=CP=1, prompts over all ranks) or ``-``-joined parts ``tpN``, ``cpN``, ``branches``
(the G branches of one prompt over the DP ranks), ``allgather`` (CP attention kind); ``tp``/``cp`` without N
take the whole world. The 1-GPU baseline is a run of the same bench with ``--nproc_per_node 1`` whose JSON
line the N-GPU run reads (``--baseline-json``; workload fields must match):

    torchrun --standalone --nproc_per_node 1 tools/bench_iteration.py ... --json-out base.jsonl
    torchrun --standalone --nproc_per_node 2 tools/bench_iteration.py ... --layouts dp,branches,tp,cp \
        --baseline-json base.jsonl --profile-comm --json-out scaling.jsonl

Reported per layout: ``sec_per_iteration`` (mean over ``--repeats`` timed steps after ``--warmup`` untimed
ones, each the slowest rank's wall), the phases ``time_*`` as ``step()`` returns them (means over the DP ranks),
``peak_mem_gb`` per rank (the largest of the trainer's per-phase peaks ``mem_*_peak_gb``, which are means over the
DP ranks), per-GPU throughput (video frames denoised and replay tuples per second, see
``kvpo/workload.py``; a shared prefix counts once, work repeated on several ranks counts once), and against the
baseline ``speedup`` = (prompt groups per second of the job) / (the baseline's) and ``efficiency`` =
speedup / world size: weak scaling for ``dp`` (every rank its own prompts), strong scaling for TP, CP and
``branches`` (one prompt per model replica). ``--profile-comm`` runs one more step under ``torch.profiler`` and
sums, per rank, the device time of NCCL kernels (GPU) or the CPU time of gloo collectives (CPU): ``comm_s``.
NCCL kernel time includes waiting for the slowest peer, so it bounds the communication from above.
``--profile-comm tp,cp`` profiles only those layouts; ``--budget-s S`` skips (with a ``"skipped"`` JSON line) the
layouts that would end past S seconds, judging each by the previous layout's duration. ``--profile-replay PATH``
runs one more step whose replay phase is profiled for 4 tuple batches after its first: kernel tables to ``PATH.rankN``;
the JSON gets the wall and summed kernel time per batch and their ratio ``replay_profile_busy`` (below 1: the GPU
waits on the host).

Pipeline overlap (``train.overlap``, kvpo/pipeline.py): ``--overlap`` times pipelined steps;
``--compare-overlap`` times sequential and pipelined steps alternately in the same process on identical work
(lr 0 so the weights stay put, the same prompts and iteration every time) after ``--warmup`` steps, and
prints their walls, the speedup, the pipeline's phase sums and ``time_overlap_saved``, the largest
difference between the two modes' losses/TVEs/rewards/LoRA gradients, and the last pipelined timeline.

    python tools/bench_iteration.py --preset tiny --frames 18 --latent-h 8 --latent-w 8 --branches 4 --window 2 \
        --lora-rank 8 --device cpu --dtype fp32 --prompts-per-rank 3 --compare-overlap --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time

import torch
import torch._dynamo
import torch.distributed as dist

from kvpo_megatron.benchmarks.common import device_peak_tflops, peak_memory_gb, reset_peak, sync
from kvpo_megatron.config import deep_merge, from_dict, parse_overrides
from kvpo_megatron.dtypes import SHORT_NAMES
from kvpo_megatron.kvpo import replay as replay_mod
from kvpo_megatron.kvpo.train_config import KVPOTrainConfig
from kvpo_megatron.kvpo.trainer import KVPOTrainer
from kvpo_megatron.kvpo.workload import default_pivot, group_workload
from kvpo_megatron.model.config import PRESETS
from kvpo_megatron.parallel.collectives import all_gather_json, comm_device
from kvpo_megatron.parallel.state import init_distributed
from kvpo_megatron.presets import generator_preset

WORKLOAD_KEYS = ("preset", "generator", "layers", "frames", "latent", "branches", "window", "pivot", "lora_rank",
                 "dtype", "prompts_per_rank", "overlap", "overrides")
"""Fields a baseline must share with the run it is the baseline of."""
PHASES = ("time_rollout", "time_reward", "time_replay", "time_update")
"""``step()``'s top-level phases (``time_replay_tuples``/``_rebuild`` are parts of ``time_replay``)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="model preset (default: the --generator's, else wan-1.3b)")
    p.add_argument("--generator", default=None, help="generator preset under the bench's settings (e.g. "
                   "longlive2-5b: its model, cache layout, sampler and routing slots)")
    p.add_argument("--layers", type=int, default=None, help="override the model's number of layers")
    p.add_argument("--frames", type=int, default=None, help="latent frames of the video (default: the "
                   "--generator's video, else 147)")
    p.add_argument("--latent-h", type=int, default=None, help="default: the --generator's, else 60")
    p.add_argument("--latent-w", type=int, default=None, help="default: the --generator's, else 104")
    p.add_argument("--branches", type=int, default=8, help="G")
    p.add_argument("--window", type=int, default=5, help="W: routed blocks")
    p.add_argument("--pivot", type=int, default=None, help="pivot block of every group (default: mid range)")
    p.add_argument("--lora-rank", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(SHORT_NAMES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts-per-rank", type=int, default=1, help="prompt groups per DP rank and iteration")
    p.add_argument("--layouts", default="dp", help="comma-separated layouts (see above); 'dp' on 1 process = 1 GPU")
    p.add_argument("--baseline-json", default=None, help="JSON lines of a 1-process run of this bench")
    p.add_argument("--profile-comm", nargs="?", const="all", default=None, metavar="LAYOUTS",
                   help="one more step under torch.profiler: comm_s (all layouts, or only these, comma-separated)")
    p.add_argument("--profile-replay", default=None, metavar="PATH",
                   help="one more step with 4 of its replay batches under torch.profiler: tables to PATH.rankN")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the remaining layouts when the next one (timed as the last) would end past this")
    p.add_argument("--overlap", action="store_true", help="time pipelined steps (train.overlap=true)")
    p.add_argument("--compare-overlap", action="store_true",
                   help="sequential vs pipelined steps on identical work, alternately, same process")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps (default 1; per mode with --compare-overlap, default 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first: compile, graphs, allocator (default 0; 1 with --compare-overlap)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json-out", default=None, help="also append the JSON line(s) to this file")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.compare_overlap else 1
    if args.warmup is None:
        args.warmup = 1 if args.compare_overlap else 0
    return args


# ---- layouts ----------------------------------------------------------------------------------------
def parse_layout(name: str, world: int) -> dict:
    """``dp`` | parts ``tpN``/``cpN``/``tp``/``cp``/``branches``/``allgather`` joined by ``-`` -> sizes."""
    out = {"name": name, "tp": 1, "cp": 1, "branches_over_dp": False, "cp_attention": "auto"}
    parts = [] if name == "dp" else name.split("-")
    whole = [p for p in parts if p in ("tp", "cp")]
    for part in parts:
        m = re.fullmatch(r"(tp|cp)(\d*)", part)
        if m and m.group(2):
            out[m.group(1)] = int(m.group(2))
        elif part == "branches":
            out["branches_over_dp"] = True
        elif part in ("allgather", "ulysses"):
            out["cp_attention"] = part
        elif not m:
            raise SystemExit(f"error: unknown layout part {part!r} in {name!r} (dp | tpN | cpN | branches | allgather)")
    if len(whole) > 1:
        raise SystemExit(f"error: layout {name!r}: only one of tp/cp may take the whole world")
    for k in whole:
        out[k] = world // (out["tp"] * out["cp"])
    mp = out["tp"] * out["cp"]
    if world % mp:
        raise SystemExit(f"error: layout {name!r} needs TP*CP ({mp}) to divide the world size ({world})")
    out["dp"] = world // mp
    out["dp_prompts"] = 1 if out["branches_over_dp"] else out["dp"]  # model replicas with their own prompts
    return out


def train_config(args, layout: dict, out_dir: str):
    base = generator_preset(args.generator) if args.generator else {}
    args.preset = args.preset or base.get("model", {}).get("preset", "wan-1.3b")
    video = base.get("video", {})
    args.frames = args.frames or video.get("num_frames", 147)
    args.latent_h = args.latent_h or video.get("latent_height", 60)
    args.latent_w = args.latent_w or video.get("latent_width", 104)
    tree = {
        "model": {"preset": args.preset, "overrides": {  # the model is built in the bench's dtype (LoRA: fp32 master)
            "params_dtype": SHORT_NAMES[args.dtype], "bf16": args.dtype == "bf16",
            **({} if args.layers is None else {"num_layers": args.layers})}},
        "parallel": {"tensor_model_parallel_size": layout["tp"], "context_parallel_size": layout["cp"],
                     "cp_attention": layout["cp_attention"], "branches_over_dp": layout["branches_over_dp"]},
        "video": {"num_frames": args.frames, "latent_height": args.latent_h, "latent_width": args.latent_w},
        "routing": {"window_blocks": args.window},
        "rollout": {"num_branches": args.branches},
        "lora": {"rank": args.lora_rank, "alpha": float(args.lora_rank)},
        "data": {"prompts_per_rank": args.prompts_per_rank},
        "optim": {"lr": 0.0} if args.compare_overlap else {},
        "objective": {"guard": False},  # every group replays: the work is the same every step
        "decoder": {"kind": "preview", "latent_channels": PRESETS.get(args.preset, {}).get("in_channels", 16)},
        "reward": {"components": [{"kind": "brightness", "weight": 1.0, "params": {"target": 1.0}}]},
        "train": {"iterations": 1, "out_dir": out_dir, "progress": False,
                  "overlap": args.overlap or args.compare_overlap},
    }
    tree = deep_merge(deep_merge(base, tree), parse_overrides(args.overrides))
    if args.pivot is None:
        args.pivot = default_pivot(from_dict(KVPOTrainConfig, tree))
    tree = deep_merge(tree, {"routing": {"pivot_min_block": args.pivot, "pivot_max_block": args.pivot}})
    return from_dict(KVPOTrainConfig, tree)


# ---- measuring ----------------------------------------------------------------------------------------
def timed_step(trainer) -> tuple[float, dict]:
    """One ``step()``: (this rank's wall, the step's metrics). Each step's wall, phases and peaks also go to stderr
    as they finish (a run cut short by a time limit still tells what its steps took)."""
    sync(trainer.device)
    t0 = time.perf_counter()
    metrics = trainer.step()
    sync(trainer.device)
    wall = time.perf_counter() - t0
    print(json.dumps({"step_s": wall, **{k: v for k, v in metrics.items() if k.startswith(("time_", "mem_"))}}),
          file=sys.stderr, flush=True)
    return wall, metrics


def comm_seconds(prof, device: torch.device) -> tuple[float, int]:
    """Time in collectives from a profile: NCCL kernels' device time (GPU) or gloo ops' CPU time (CPU)."""
    total, calls = 0.0, 0
    for e in prof.key_averages():
        name = e.key.lower()
        if device.type == "cuda" and "nccl" in name and e.device_type == torch.autograd.DeviceType.CUDA:
            total += e.device_time_total
            calls += e.count
        elif device.type != "cuda" and name.startswith("gloo:"):
            total += e.cpu_time_total
            calls += e.count
    return total / 1e6, calls


def profile_comm(trainer) -> dict:
    from torch.profiler import ProfilerActivity, profile

    dev = trainer.device
    acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        wall, _ = timed_step(trainer)
    comm, calls = comm_seconds(prof, dev)
    return {"comm_s": comm, "comm_calls": calls, "profiled_step_s": wall}


def profile_replay(trainer, path: str, batches: int = 4) -> dict:
    """One more step whose replay phase (``trainer._replay``; not the rollout's no-grad scoring, which runs the same
    ``replay_terms``) is profiled from its second tuple batch for ``batches`` batches (forwards, backwards and the
    context commits between them): kernel tables by device and by host time to ``path``; returned: the profiled
    wall and device kernel time per batch and their ratio (busy < 1: the GPU waits on the host)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    terms, group_replay, state = replay_mod.replay_terms, trainer._replay, {"n": 0}

    def counted(*a, **kw):
        state["n"] += 1
        if state["n"] in (2, 2 + batches):  # start before the 2nd batch's forward, stop before the last+1's
            sync(trainer.device)
            if state["n"] == 2:
                state["prof"] = profile(activities=acts)
                state["prof"].start()
                state["t0"] = time.perf_counter()
            else:
                state["wall"] = time.perf_counter() - state["t0"]
                state["prof"].stop()
        return terms(*a, **kw)

    def replay(*a, **kw):
        replay_mod.replay_terms = counted
        try:
            return group_replay(*a, **kw)
        finally:
            replay_mod.replay_terms = terms

    trainer._replay = replay
    try:
        timed_step(trainer)
    finally:
        del trainer._replay
    if "wall" not in state:
        raise SystemExit(f"error: --profile-replay needs more than {batches + 1} replay batches in the step")
    events = state["prof"].key_averages()
    kernel = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    with open(path, "w") as f:
        if trainer.device.type == "cuda":
            f.write(events.table(sort_by="self_cuda_time_total", row_limit=50) + "\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=50))
    wall = state["wall"] / batches
    return {"replay_profile_wall_s": wall, "replay_profile_kernel_s": kernel / batches,
            "replay_profile_busy": kernel / batches / wall}


def peak_of(metrics: dict, device: torch.device) -> float:
    """Peak device memory of a step: the largest of the trainer's per-phase peaks (it resets the counter at each
    phase; pass this rank's, ``trainer.last_times``), or the process's max RSS on the CPU."""
    mem = [v for k, v in metrics.items() if k.startswith("mem_") and k.endswith("_peak_gb")]
    return max(mem) if mem and device.type == "cuda" else peak_memory_gb(device)


def model_flops_summary(tflop: float, sec: float, device: torch.device) -> dict:
    """The iteration's model TFLOP per GPU (the engine's count: ``kvpo_megatron/flops.py``), MFU against the dense
    bf16 peak, and the time the work would take at 800 TFLOP/s (the measured H100/H200 bf16 matmul rate)."""
    peak = device_peak_tflops(device)
    bound = tflop / 800.0
    return {"tflop_per_gpu": tflop, "mfu": tflop / sec / peak if peak and sec else None,
            "bound_800_s": bound, "sec_over_bound": sec / bound if bound else None}


def gather(value) -> list:
    """``value`` (JSON-serialisable) of every rank, in rank order (nothing unpickled)."""
    return all_gather_json(value, device=comm_device())


def scaling(res: dict, baseline: dict | None) -> dict:
    """Speedup (prompt groups per second of the job vs the 1-process baseline's) and efficiency (/ world)."""
    if baseline is None:
        return {}
    if baseline.get("world_size") != 1:
        raise SystemExit("error: --baseline-json must come from a 1-process run of this bench")
    diff = {k: (res[k], baseline.get(k)) for k in WORKLOAD_KEYS if res[k] != baseline.get(k)}
    if diff:
        raise SystemExit(f"error: baseline workload differs from this run's: {diff}")
    speedup = (res["groups_per_iteration"] / res["sec_per_iteration"]) / \
              (baseline["groups_per_iteration"] / baseline["sec_per_iteration"])
    kind = "weak" if res["dp_prompts"] == res["world_size"] else "strong" if res["dp_prompts"] == 1 else "mixed"
    return {"baseline_sec_per_iteration": baseline["sec_per_iteration"], "scaling": kind, "speedup": speedup,
            "efficiency": speedup / res["world_size"]}


def load_baseline(path: str | None) -> dict | None:
    if path is None:
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("bench") == "iteration" and r.get("world_size") == 1]
    if not rows:
        raise SystemExit(f"error: no 1-process iteration result in {path}")
    return rows[-1]


# ---- one layout -------------------------------------------------------------------------------------
def bench_layout(args, layout: dict, baseline: dict | None) -> dict:
    out_dir = tempfile.mkdtemp(prefix="bench_iteration_")
    cfg = train_config(args, layout, out_dir)
    t0 = time.perf_counter()
    trainer = KVPOTrainer(cfg)
    build_s = time.perf_counter() - t0
    dev, world = trainer.device, dist.get_world_size()
    warm = [timed_step(trainer)[0] for _ in range(args.warmup)]
    walls, metrics = [], {}
    for _ in range(args.repeats):
        wall, metrics = timed_step(trainer)
        walls.append(wall)
    peak = peak_of(trainer.last_times, dev)  # this rank's (the metrics' phase peaks are DP means)
    profiled = args.profile_comm == "all" or layout["name"] in (args.profile_comm or "").split(",")
    comm = profile_comm(trainer) if profiled else {}
    if args.profile_replay:
        comm.update(profile_replay(trainer, f"{args.profile_replay}.rank{dist.get_rank()}"))
    ranks = gather({"walls": walls, "peak_mem_gb": peak, **comm,
                    "phases": {k: round(v, 3) for k, v in trainer.last_times.items() if k.startswith("time_")}})
    steps = [max(r["walls"][i] for r in ranks) for i in range(args.repeats)]  # the slowest rank's wall
    sec = sum(steps) / len(steps)
    phases = {k: v for k, v in metrics.items()  # per-rank work (tflop, block_forwards) as DP means
              if k.startswith(("time_", "mem_")) or k in ("tflop", "block_forwards")}
    pipelined = cfg.train.overlap
    top = ("time_pipeline", "time_update") if pipelined else PHASES  # pipelined phases overlap: use its wall
    work = group_workload(cfg, args.pivot)
    groups = args.prompts_per_rank * layout["dp_prompts"]  # distinct prompt groups of the whole job
    res = dict(
        bench="iteration", layout=layout["name"], world_size=world, tp=layout["tp"], cp=layout["cp"],
        dp=layout["dp"], branches_over_dp=layout["branches_over_dp"], dp_prompts=layout["dp_prompts"],
        cp_attention=layout["cp_attention"] if layout["cp"] > 1 else None,
        preset=args.preset, generator=args.generator, layers=trainer.model.config.num_layers, frames=args.frames,
        latent=[args.latent_h, args.latent_w], branches=args.branches,
        window=args.window, pivot=args.pivot, lora_rank=args.lora_rank, dtype=args.dtype,
        prompts_per_rank=args.prompts_per_rank, overlap=args.overlap, overrides=list(args.overrides),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        build_s=build_s, warmup_s=warm, step_s=steps, sec_per_iteration=sec, **phases,
        time_other=sec - sum(phases.get(k, 0.0) for k in top),
        workload=work.to_dict(), groups_per_iteration=groups,
        video_fps_per_gpu=groups * work.video_frames / sec / world,
        tuples_per_s_per_gpu=groups * work.tuples / sec / world,
        rollout_video_fps_per_gpu=groups * work.video_frames / phases["time_rollout"] / world
        if phases.get("time_rollout") else None,
        replay_s_per_tuple=phases["time_replay_tuples"] / (groups * work.tuples / world)
        if phases.get("time_replay_tuples") else None,
        rank_phases=[r["phases"] for r in ranks],  # the phases above are DP means; ranks may differ (branches)
        peak_mem_gb=[r["peak_mem_gb"] for r in ranks], peak_mem_gb_max=max(r["peak_mem_gb"] for r in ranks),
        # every rank of a TP/CP group records the model FLOPs of the forwards it takes part in: its own share is
        # 1/(TP*CP) of them
        **model_flops_summary(phases.get("tflop", 0.0) / (layout["tp"] * layout["cp"]), sec, dev),
        reward_stand_in="brightness + preview decoder (fixed, near-zero cost; time_reward)")
    if profiled:
        res.update(comm_s=[r["comm_s"] for r in ranks], comm_s_max=max(r["comm_s"] for r in ranks),
                   comm_calls=ranks[0]["comm_calls"], profiled_step_s=max(r["profiled_step_s"] for r in ranks))
    if args.profile_replay:
        res.update({k: ranks[0][k] for k in ranks[0] if k.startswith("replay_profile_")})
    res.update(scaling(res, baseline))
    del trainer
    gc.collect()
    torch._dynamo.reset()  # compiled blocks would keep this layout's model alive
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        res["leftover_mem_gb"] = torch.cuda.memory_allocated(dev) / 1e9  # rank 0's, after the cleanup
    return res


def main(argv=None) -> dict | list[dict]:
    args = parse_args(argv)

    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu with CUDA present is not supported by the trainer")
    if args.threads:
        torch.set_num_threads(args.threads)
    _, world = init_distributed()
    if args.compare_overlap:
        if world != 1:
            raise SystemExit("error: --compare-overlap runs on one process")
        return compare_overlap(args)
    baseline = load_baseline(args.baseline_json)
    results, t_start, last = [], time.perf_counter(), 0.0
    for name in args.layouts.split(","):
        layout = parse_layout(name, world)
        if over_budget(args.budget_s, time.perf_counter() - t_start, last):
            res = {"bench": "iteration", "layout": name, "world_size": world, "skipped": "--budget-s"}
        else:
            t0 = time.perf_counter()
            res = bench_layout(args, layout, baseline)
            last = time.perf_counter() - t0
        if dist.get_rank() == 0:
            emit(args, res)
        results.append(res)
    return results[0] if len(results) == 1 else results


def over_budget(budget: float | None, elapsed: float, last: float) -> bool:
    """Rank 0's decision (every rank follows it): would the next layout, lasting as the last one, overrun?"""
    if budget is None:
        return False
    decision = torch.tensor([float(elapsed + last > budget)], device=comm_device())
    dist.broadcast(decision, src=0)
    return bool(decision.item())


def emit(args, res: dict) -> None:
    print(json.dumps(res), flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(res) + "\n")


# ---- sequential vs pipelined (one process) ---------------------------------------------------------------
def _fingerprint(trainer) -> dict[str, torch.Tensor]:
    """What both modes must agree on: per-group rollout/objective values and the accumulated LoRA gradient."""
    rs = trainer.last_results
    f = lambda xs: torch.stack([torch.as_tensor(x, dtype=torch.float64).cpu() for x in xs])  # noqa: E731
    return {"tve": torch.cat([r.tve.double() for r in rs]), "reward": torch.cat([r.total.double() for r in rs]),
            "loss": f([float(r.terms.total.detach()) for r in rs]),
            "coeffs": torch.cat([r.coeffs.double() for r in rs]),
            "anchor_latents": torch.cat([r.group.anchor.latents.double().cpu().flatten() for r in rs]),
            "branch_latents": torch.cat([b.latents.double().cpu().flatten() for r in rs for b in r.group.branches]),
            "lora_grad": torch.cat([p.grad.double().cpu().flatten() for p in trainer.params])}


def compare_overlap(args) -> dict:
    """Sequential and pipelined steps alternately on identical work (same prompts, iteration 0, lr 0)."""
    cfg = train_config(args, parse_layout("dp", 1), tempfile.mkdtemp(prefix="bench_iteration_"))
    t0 = time.perf_counter()
    trainer = KVPOTrainer(cfg)
    build_s = time.perf_counter() - t0
    device = trainer.device
    cursor = trainer.loader.cursor

    def one(overlap: bool) -> tuple[float, dict]:
        trainer.cfg.train.overlap = overlap
        trainer.loader.cursor = cursor  # the same prompts every time
        return timed_step(trainer)  # trainer.iteration stays 0: the same pivots and routes every time

    for _ in range(args.warmup):
        one(False)
    reset_peak(device)
    walls: dict[str, list[float]] = {"sequential": [], "pipelined": []}
    phases: dict[str, dict] = {}
    prints: dict[str, dict] = {}
    peak = 0.0
    for _ in range(args.repeats):
        for mode in ("sequential", "pipelined"):
            wall, m = one(mode == "pipelined")
            peak = max(peak, peak_of(m, device))
            walls[mode].append(wall)
            phases[mode] = {k: v for k, v in m.items() if k.startswith("time_")}
            prints[mode] = _fingerprint(trainer)
    diff = {k: float((prints["sequential"][k] - prints["pipelined"][k]).abs().max()) for k in prints["sequential"]}
    seq, pip = min(walls["sequential"]), min(walls["pipelined"])
    res = dict(bench="iteration_overlap", preset=args.preset, generator=args.generator,
               layers=trainer.model.config.num_layers, frames=args.frames, branches=args.branches,
               window=args.window, pivot=args.pivot, lora_rank=args.lora_rank, dtype=args.dtype,
               prompts_per_rank=args.prompts_per_rank, threads=torch.get_num_threads(),
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               latent=[args.latent_h, args.latent_w], build_s=build_s, walls=walls, sequential_s=seq,
               pipelined_s=pip, speedup=seq / pip, phases=phases, max_abs_diff=diff,
               peak_mem_gb=peak, timeline=trainer.last_timeline.to_dict()["spans"])
    emit(args, res)
    return res


if __name__ == "__main__":
    main()
