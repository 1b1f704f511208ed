"""One KVPO iteration for one prompt: seconds per phase and peak memory (``KVPOTrainer.step``).

Stand-ins, so that the model is what is measured: the weight-free ``hash`` text encoder, the ``preview`` latent
decoder (linear latent -> RGB, no VAE) and the ``brightness`` reward (a fixed, near-zero cost); their time is
reported separately as ``time_reward``. Random weights. The model (base and LoRA) is cast to ``--dtype`` after
the trainer is built (the trainer itself keeps float32 parameters).

    python tools/bench_iteration.py --preset wan-1.3b --frames 147 --branches 8 --window 5
    python tools/bench_iteration.py --generator longlive2-5b --frames 64 --branches 8 --window 5 \
        --latent-h 44 --latent-w 80 --lora-rank 128      # LongLive 2.0 (Wan2.2-5B) at 1280x704
    python tools/bench_iteration.py --preset tiny --frames 18 --latent-h 8 --latent-w 8 --branches 4 --window 2 \
        --lora-rank 8 --device cpu --dtype fp32

Pipeline overlap (``train.overlap``, kvpo/pipeline.py): ``--overlap`` times one pipelined step;
``--compare-overlap`` times sequential and pipelined steps alternately in the same process on identical work
(lr 0 so the weights stay put, the same prompts and iteration every time) after ``--warmup`` steps, and
prints their walls, the speedup, the pipeline's phase sums and ``time_overlap_saved``, the largest
difference between the two modes' losses/TVEs/rewards/LoRA gradients, and the last pipelined timeline.

    python tools/bench_iteration.py --preset tiny --frames 18 --latent-h 8 --latent-w 8 --branches 4 --window 2 \
        --lora-rank 8 --device cpu --dtype fp32 --prompts-per-rank 3 --compare-overlap --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # noqa: E402
from bench_common import cast_model, peak_memory_gb, reset_peak, sync  # noqa: E402
from bench_rollout import DTYPES  # noqa: E402


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
    p.add_argument("--lora-rank", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts-per-rank", type=int, default=1, help="prompt groups per iteration")
    p.add_argument("--overlap", action="store_true", help="time one pipelined step (train.overlap=true)")
    p.add_argument("--compare-overlap", action="store_true",
                   help="sequential vs pipelined steps on identical work, alternately, same process")
    p.add_argument("--repeats", type=int, default=2, help="--compare-overlap: timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="--compare-overlap: untimed sequential steps first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json-out", default=None, help="also write the JSON line(s) to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from kvpo_megatron.config import deep_merge, from_dict
    from kvpo_megatron.kvpo.train_config import KVPOTrainConfig
    from kvpo_megatron.kvpo.trainer import KVPOTrainer
    from kvpo_megatron.model.config import PRESETS
    from kvpo_megatron.model.memory_bank import generator_preset

    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu with CUDA present is not supported by the trainer")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="bench_iteration_")
    overlap = args.overlap or args.compare_overlap
    base = generator_preset(args.generator) if args.generator else {}
    args.preset = args.preset or base.get("model", {}).get("preset", "wan-1.3b")
    video = base.get("video", {})
    args.frames = args.frames or video.get("num_frames", 147)
    args.latent_h = args.latent_h or video.get("latent_height", 60)
    args.latent_w = args.latent_w or video.get("latent_width", 104)
    model = {"preset": args.preset, "overrides": {} if args.layers is None else {"num_layers": args.layers}}
    cfg = from_dict(KVPOTrainConfig, deep_merge(base, {
        "model": model,
        "video": {"num_frames": args.frames, "latent_height": args.latent_h, "latent_width": args.latent_w},
        "routing": {"window_blocks": args.window},
        "rollout": {"num_branches": args.branches},
        "lora": {"rank": args.lora_rank, "alpha": float(args.lora_rank)},
        "data": {"prompts_per_rank": args.prompts_per_rank},
        "optim": {"lr": 0.0} if args.compare_overlap else {},
        "objective": {"guard": False} if args.compare_overlap else {},
        "decoder": {"kind": "preview", "latent_channels": PRESETS.get(args.preset, {}).get("in_channels", 16)},
        "reward": {"components": [{"kind": "brightness", "weight": 1.0, "params": {"target": 1.0}}]},
        "train": {"iterations": 1, "out_dir": out, "progress": False, "overlap": overlap},
    }))
    t0 = time.perf_counter()
    trainer = KVPOTrainer(cfg)
    cast_model(trainer.model, DTYPES[args.dtype])
    build_s = time.perf_counter() - t0
    device = trainer.device
    captured: dict = {}

    def phase_times(results, times, grad_norm, stepped, finite):  # the trainer's _metrics, minus its all-reduce
        captured.clear()
        captured.update(times, grad_norm=grad_norm, stepped=float(stepped))
        return dict(captured)

    trainer._metrics = phase_times  # bench-side: only the phase timers are needed here
    if args.compare_overlap:
        return compare_overlap(args, trainer, build_s)
    reset_peak(device)
    t0 = time.perf_counter()
    metrics = trainer.step()
    sync(device)
    total = time.perf_counter() - t0
    phases = {k: v for k, v in metrics.items() if k.startswith("time_")}
    res = dict(bench="iteration", preset=args.preset, generator=args.generator,
               layers=trainer.model.config.num_layers, frames=args.frames, branches=args.branches,
               window=args.window, lora_rank=args.lora_rank, dtype=args.dtype,
               prompts_per_rank=args.prompts_per_rank, overlap=args.overlap,
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               latent=[args.latent_h, args.latent_w], sec_per_iteration=total, build_s=build_s, **phases,
               time_other=total - (phases["time_pipeline"] + phases.get("time_update", 0.0) if args.overlap
                                   else sum(phases.values())),  # pipelined phases overlap: use its wall
               peak_mem_gb=peak_memory_gb(device),
               reward_stand_in="brightness + preview decoder (fixed, near-zero cost; time_reward)")
    emit(args, res)
    return res


def emit(args, res: dict) -> None:
    print(json.dumps(res), flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(res) + "\n")


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


def compare_overlap(args, trainer, build_s: float) -> dict:
    """Sequential and pipelined steps alternately on identical work (same prompts, iteration 0, lr 0)."""
    device = trainer.device
    cursor = trainer.loader.cursor

    def one(overlap: bool) -> tuple[float, dict]:
        trainer.cfg.train.overlap = overlap
        trainer.loader.cursor = cursor  # the same prompts every time
        sync(device)
        t0 = time.perf_counter()
        m = trainer.step()  # trainer.iteration stays 0: the same pivots and routes every time
        sync(device)
        return time.perf_counter() - t0, m

    for _ in range(args.warmup):
        one(False)
    reset_peak(device)
    walls: dict[str, list[float]] = {"sequential": [], "pipelined": []}
    phases: dict[str, dict] = {}
    prints: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode in ("sequential", "pipelined"):
            wall, m = one(mode == "pipelined")
            walls[mode].append(wall)
            phases[mode] = {k: v for k, v in m.items() if k.startswith("time_")}
            prints[mode] = _fingerprint(trainer)
    diff = {k: float((prints["sequential"][k] - prints["pipelined"][k]).abs().max()) for k in prints["sequential"]}
    seq, pip = min(walls["sequential"]), min(walls["pipelined"])
    res = dict(bench="iteration_overlap", preset=args.preset, frames=args.frames, branches=args.branches,
               window=args.window, lora_rank=args.lora_rank, dtype=args.dtype,
               prompts_per_rank=args.prompts_per_rank, threads=torch.get_num_threads(),
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               latent=[args.latent_h, args.latent_w], build_s=build_s, walls=walls, sequential_s=seq,
               pipelined_s=pip, speedup=seq / pip, phases=phases, max_abs_diff=diff,
               peak_mem_gb=peak_memory_gb(device), timeline=trainer.last_timeline.to_dict()["spans"])
    emit(args, res)
    return res


if __name__ == "__main__":
    main()
