"""Per-iteration metrics: JSONL + TensorBoard on rank 0, and a reward-curve PNG at the end."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool = True):
        self.out = Path(out_dir)
        self.enabled = enabled
        self.history: list[dict] = []
        self._tb = None
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._tb = SummaryWriter(str(self.out / "tensorboard"))
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
        with open(self.out / "metrics.jsonl", "a") as f:
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
