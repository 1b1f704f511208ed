"""Per-iteration metrics: JSONL + TensorBoard on rank 0, and a reward-curve PNG at the end.

One run, one history: a resumed run cuts ``metrics.jsonl`` (and ``timeline.jsonl``) back to the resumed
iteration and TensorBoard hides the events after it (``purge_step``); a fresh run refuses an ``out_dir`` that
already holds a run's files unless told to overwrite them (:func:`check_out_dir`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

from kvpo_megatron.errors import ConfigError

log = logging.getLogger(__name__)
METRICS, TIMELINE, TENSORBOARD = "metrics.jsonl", "timeline.jsonl", "tensorboard"
RUN_FILES = (METRICS, TIMELINE, TENSORBOARD, "reward_curve.png", "final_adapter", "final_adapter_ema",
             "final_lora.safetensors", "samples", "wandb_run_id")
"""What a run writes into ``train.out_dir`` (besides checkpoints, if ``checkpoint.dir`` is inside it)."""


def check_out_dir(out_dir: str | Path, *, overwrite: bool) -> list[Path]:
    """A fresh run's ``out_dir``: the run files already there. Raises unless ``overwrite`` (then the caller deletes
    them with :func:`remove_run_files`)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir={str(out)!r} is a file, not a directory")
    found = [out / n for n in RUN_FILES if (out / n).exists()]
    if found and not overwrite:
        raise ConfigError(f"train.out_dir={str(out)!r} already holds a run ({', '.join(p.name for p in found)}) and "
                          "there is no checkpoint to resume from; set train.overwrite=true to replace it, or choose "
                          "another train.out_dir")
    return found


def remove_run_files(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        log.warning("train.overwrite: removed %s", p)


def truncate_jsonl(path: Path, keep) -> int:
    """Keep the rows of a JSONL file for which ``keep(row)`` holds (atomic rewrite); returns rows dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: drop it
            continue
        if isinstance(row, dict) and keep(row):
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def dp_mean(local: dict[str, float], *, group, device) -> dict[str, float]:
    """Mean over the ranks of ``group`` of every metric any of them has (a rank without a key counts 0 for it:
    e.g. replay timings of a rank whose groups all failed the guard). Three collectives; no pickling."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    data = json.dumps(sorted(local)).encode()
    n = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    buf = torch.zeros(int(max(sizes).item()), dtype=torch.uint8, device=device)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    keys = sorted({k for b, m in zip(bufs, sizes) for k in json.loads(bytes(b[:int(m.item())].cpu().tolist()))})
    vec = torch.tensor([float(local.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(vec, group=group)
    return {k: float(v) / world for k, v in zip(keys, vec.cpu())}


def iteration_line(iteration: int, m: dict, *, num_branches: int) -> str:
    """The trainer's log line of one iteration's metrics: rewards, advantages, TVE, the Gibbs policy's entropy H
    against its maximum ln G (a uniform policy), the KL to the reference, the clip fraction, timings."""
    return (f"it {iteration} | reward {m['reward_mean']:.4f} anchor {m['anchor_reward']:.4f} | adv "
            f"{m['adv_mean']:.2f}+-{m['adv_std']:.2f} | tve {m['tve_mean']:.3e} (spread {m['tve_spread']:.2e}) | "
            f"H {m['entropy']:.3f} (ln G {math.log(num_branches):.3f}) kl {m['kl']:.2e} clip {m['clip_frac']:.2f} | "
            f"gnorm {m['grad_norm']:.2e} | guard-skip {m['skipped_by_guard']:.2f} | rollout "
            f"{m.get('time_rollout', 0):.1f}s reward {m.get('time_reward', 0):.1f}s replay "
            f"{m.get('time_replay', 0):.1f}s update {m.get('time_update', 0):.2f}s")


class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool = True):
        self.out = Path(out_dir)
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.history: list[dict] = []
        self._tb = None

    def open(self, iteration: int = 0) -> None:
        """Start logging after ``iteration`` completed iterations: rows and events past it are dropped."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        dropped = truncate_jsonl(self.out / METRICS, lambda r: r.get("iteration", 0) <= iteration)
        dropped += truncate_jsonl(self.out / TIMELINE, lambda r: r.get("iteration", 0) < iteration)
        if dropped:
            log.info("resume at iteration %d: dropped %d log rows written after it", iteration, dropped)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out / TENSORBOARD), purge_step=iteration + 1 if iteration else None)
            except ImportError:  # tensorboard is an optional extra
                self._tb = None

    @property
    def writer(self):
        """The TensorBoard ``SummaryWriter`` (None when disabled or tensorboard is not installed)."""
        return self._tb

    def log(self, iteration: int, metrics: dict) -> None:
        row = {"iteration": iteration, **{k: (float(v) if isinstance(v, (int, float)) else v)
                                          for k, v in metrics.items()}}
        self.history.append(row)
        if not self.enabled:
            return
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, iteration)
            self._tb.flush()

    def plot(self, keys=("reward_mean", "anchor_reward"), name: str = "reward_curve.png") -> Path | None:
        if not self.enabled or not self.history:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        its = [r["iteration"] for r in self.history]
        for k in keys:
            ax.plot(its, [r.get(k, float("nan")) for r in self.history], label=k, marker=".")
        ax.set_xlabel("iteration")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
