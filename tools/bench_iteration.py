"""One KVPO iteration for one prompt: seconds per phase and peak memory (``KVPOTrainer.step``).

Stand-ins, so that the model is what is measured: the weight-free ``hash`` text encoder, the ``preview`` latent
decoder (linear latent -> RGB, no VAE) and the ``brightness`` reward (a fixed, near-zero cost); their time is
reported separately as ``time_reward``. Random weights. The model (base and LoRA) is cast to ``--dtype`` after
the trainer is built (the trainer itself keeps float32 parameters).

    python tools/bench_iteration.py --preset wan-1.3b --frames 147 --branches 8 --window 5
    python tools/bench_iteration.py --preset tiny --frames 18 --latent-h 8 --latent-w 8 --branches 4 --window 2 \
        --lora-rank 8 --device cpu --dtype fp32
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
    p.add_argument("--preset", default="wan-1.3b")
    p.add_argument("--frames", type=int, default=147, help="latent frames of the video")
    p.add_argument("--latent-h", type=int, default=60)
    p.add_argument("--latent-w", type=int, default=104)
    p.add_argument("--branches", type=int, default=8, help="G")
    p.add_argument("--window", type=int, default=5, help="W: routed blocks")
    p.add_argument("--lora-rank", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from kvpo_megatron.config import from_dict
    from kvpo_megatron.kvpo.train_config import KVPOTrainConfig
    from kvpo_megatron.kvpo.trainer import KVPOTrainer

    if args.device == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu with CUDA present is not supported by the trainer")
    out = tempfile.mkdtemp(prefix="bench_iteration_")
    cfg = from_dict(KVPOTrainConfig, {
        "model": {"preset": args.preset},
        "video": {"num_frames": args.frames, "latent_height": args.latent_h, "latent_width": args.latent_w},
        "routing": {"window_blocks": args.window},
        "rollout": {"num_branches": args.branches},
        "lora": {"rank": args.lora_rank, "alpha": float(args.lora_rank)},
        "decoder": {"kind": "preview", "latent_channels": 16 if args.preset != "tiny" else 4},
        "reward": {"components": [{"kind": "brightness", "weight": 1.0, "params": {"target": 1.0}}]},
        "train": {"iterations": 1, "out_dir": out, "progress": False},
    })
    t0 = time.perf_counter()
    trainer = KVPOTrainer(cfg)
    cast_model(trainer.model, DTYPES[args.dtype])
    build_s = time.perf_counter() - t0
    device = trainer.device
    captured: dict = {}

    def phase_times(results, times, grad_norm, stepped, finite):  # the trainer's _metrics, minus its all-reduce
        captured.update(times, grad_norm=grad_norm, stepped=float(stepped))
        return dict(captured)

    trainer._metrics = phase_times  # bench-side: only the phase timers are needed here
    reset_peak(device)
    t0 = time.perf_counter()
    metrics = trainer.step()
    sync(device)
    total = time.perf_counter() - t0
    phases = {k: v for k, v in metrics.items() if k.startswith("time_")}
    res = dict(bench="iteration", preset=args.preset, frames=args.frames, branches=args.branches,
               window=args.window, lora_rank=args.lora_rank, dtype=args.dtype,
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               latent=[args.latent_h, args.latent_w], sec_per_iteration=total, build_s=build_s, **phases,
               time_other=total - sum(phases.values()), peak_mem_gb=peak_memory_gb(device),
               reward_stand_in="brightness + preview decoder (fixed, near-zero cost; time_reward)")
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
