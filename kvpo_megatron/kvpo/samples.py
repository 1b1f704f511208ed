"""What a person looks at during training: sample videos, branch tables, and Weights & Biases.

Every ``logging.sample_every`` iterations, global rank 0 decodes the anchor and the best and the worst branch
(by total reward, among the branches it rolled out) of its first prompt group, and logs

* ``out_dir/samples/iter_NNNNNNN_{anchor,best,worst}.mp4`` (``conditioning/video_io.py``; needs the ``media``
  extra: without PyAV, which ``pip install .`` leaves out, the mp4s are skipped with one warning and the rest is
  logged);
* TensorBoard: ``samples/anchor_best_worst`` -- an image grid, one row per video, one column per frame (the
  ``add_video`` path needs moviepy, which this project does not depend on) -- and ``samples/branches``, a text
  table with each branch's route (routed frames per window block), every reward component, the total, the
  advantage, TVE and the Gibbs probability;
* Weights & Biases (when ``logging.wandb`` is set): the same videos and table, plus every iteration's scalars.

``wandb`` is an optional package: setting ``logging.wandb`` without it installed is a configuration error.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch

from kvpo_megatron.conditioning.video_io import write_mp4
from kvpo_megatron.errors import ConfigError

log = logging.getLogger(__name__)
SAMPLES_DIR = "samples"
WANDB_ID_FILE = "wandb_run_id"


class WandbMode(StrEnum):
    online = "online"
    offline = "offline"  # write locally; `wandb sync` later
    disabled = "disabled"


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    """Weights & Biases run (global rank 0). Setting this section needs the ``wandb`` package."""

    project: str = "kvpo"
    entity: str | None = None
    name: str | None = None
    """Run name (None: W&B picks one)."""
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode = WandbMode.online
    dir: str | None = None
    """W&B's local files (None: ``train.out_dir``)."""

    def __post_init__(self) -> None:
        try:
            self.mode = WandbMode(self.mode)
        except ValueError:
            raise ConfigError(f"logging.wandb.mode must be one of {[m.value for m in WandbMode]}, got {self.mode!r}")
        if not self.project:
            raise ConfigError("logging.wandb.project must be a non-empty string")
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb is set but the wandb package is not installed: `pip install wandb`, "
                              "or remove the logging.wandb section")


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    sample_every: int = 0
    """Log the anchor and the best and worst branch of one prompt as videos every this many iterations (0: never)."""
    sample_fps: int = 8
    """Frame rate of the sample mp4s."""
    wandb: WandbConfig | None = None
    """Weights & Biases; None: not used."""

    def __post_init__(self) -> None:
        if isinstance(self.sample_every, bool) or not isinstance(self.sample_every, int) or self.sample_every < 0:
            raise ConfigError(f"logging.sample_every must be an integer >= 0, got {self.sample_every!r}")
        if not isinstance(self.sample_fps, int) or self.sample_fps < 1:
            raise ConfigError(f"logging.sample_fps must be a positive integer, got {self.sample_fps!r}")
        if isinstance(self.wandb, dict):
            self.wandb = WandbConfig(**self.wandb)


def frame_grid(videos: torch.Tensor, *, max_frames: int = 16, min_height: int = 64) -> torch.Tensor:
    """[N, T, 3, H, W] in [0, 1] -> one [3, H', W'] image: row n = video n, columns = (at most ``max_frames``
    evenly spaced) frames, 1-pixel white separators; small frames are enlarged (nearest) to ``min_height``."""
    n, t = videos.shape[:2]
    idx = torch.linspace(0, t - 1, min(t, max_frames)).round().long()
    x = videos[:, idx].float().clamp(0, 1)
    scale = max(1, math.ceil(min_height / x.shape[-2]))
    if scale > 1:
        x = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    x = torch.nn.functional.pad(x, (0, 1, 0, 1), value=1.0)  # [N, t, 3, h+1, w+1]
    rows = [torch.cat(list(x[i]), dim=-1) for i in range(n)]  # each [3, h+1, t*(w+1)]
    return torch.cat(rows, dim=-2)


def branch_table(result, *, tau: float, chosen: dict[int, str]) -> tuple[list[str], list[list]]:
    """Columns and rows (anchor first) of one prompt group: route, reward components, total, advantage, TVE, pi."""
    g = result.group
    names = list(result.rewards)
    pi = torch.softmax(-result.tve.double() / tau, dim=0)
    cols = ["branch", "route", *names, "total", "advantage", "tve", "pi", "shown"]
    rows = [["anchor", "unrouted", *[result.anchor[k] for k in names], result.anchor_total, None, None, None,
             "anchor"]]
    local = {b.branch: b for b in g.branches}
    for k in range(len(result.total)):
        b = local.get(k)
        route = "; ".join(f"b{blk}:{b.routes[blk]}" for blk in g.window if blk in b.routes) if b else "(other rank)"
        rows.append([str(k), route, *[float(result.rewards[n][k]) for n in names], float(result.total[k]),
                     float(result.adv[k]), float(result.tve[k]), float(pi[k]), chosen.get(k, "")])
    return cols, rows


def _markdown(cols: list[str], rows: list[list]) -> str:
    def fmt(v):
        return "" if v is None else f"{v:.5g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


class SampleLogger:
    """Rank-0 sample videos, branch tables and W&B for the trainer (``after_iteration`` once per iteration)."""

    def __init__(self, cfg: LoggingConfig, *, out_dir: str | Path, enabled: bool, decoder, tau: float,
                 tensorboard=None, run_config: dict | None = None):
        """``tensorboard``: a ``SummaryWriter`` (the metrics logger's) or None; ``decoder``: latents -> frames."""
        self.cfg, self.out, self.enabled = cfg, Path(out_dir), enabled
        self.decoder, self.tau, self.tb = decoder, tau, tensorboard
        self.wandb, self._warned_mp4 = None, False
        if enabled and cfg.wandb is not None:
            self.wandb = self._init_wandb(cfg.wandb, run_config or {})

    def _init_wandb(self, w: WandbConfig, run_config: dict):
        import wandb

        self.out.mkdir(parents=True, exist_ok=True)
        id_file = self.out / WANDB_ID_FILE  # a resumed job continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        return wandb.init(project=w.project, entity=w.entity, name=w.name, group=w.group, tags=list(w.tags),
                          mode=str(w.mode), dir=w.dir or str(self.out), config=run_config, id=run_id,
                          resume="allow")

    def after_iteration(self, iteration: int, metrics: dict, results: list, dataset=None) -> None:
        """Scalars to W&B every iteration; sample videos and the branch table every ``sample_every``.

        ``results``: the iteration's ``GroupResult``s (the first is shown); ``dataset``: the ``PromptDataset``
        (for the prompt texts of the shown group), or None."""
        if not self.enabled:
            return
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                           step=iteration)
        every = self.cfg.sample_every
        if every and iteration % every == 0 and results:
            prompts = dataset[results[0].group.prompt_index].prompts if dataset is not None else None
            self.log_samples(iteration, results[0], prompts)

    def log_samples(self, iteration: int, result, prompts: list[str] | None = None) -> dict[str, Path]:
        """Decode anchor, best and worst branch of ``result`` (a ``GroupResult``); write and log them."""
        try:
            import av  # noqa: F401  (the mp4 writer's; the media extra)
            mp4 = True
        except ImportError:
            mp4 = False
        if not mp4 and not self._warned_mp4:
            log.warning("sample videos: PyAV is not installed, so no mp4s are written (the TensorBoard frame grid and "
                        "the branch table are): pip install 'kvpo_megatron[media]'")
            self._warned_mp4 = True
        g = result.group
        local = sorted(g.branches, key=lambda b: float(result.total[b.branch]))
        shown = {"anchor": g.anchor, "best": local[-1], "worst": local[0]}
        with torch.no_grad():
            frames = self.decoder.decode(torch.cat([b.latents for b in shown.values()]).float().cpu()).cpu()
        out = self.out / SAMPLES_DIR
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: write_mp4(frames[i], out / f"iter_{iteration:07d}_{k}.mp4", fps=self.cfg.sample_fps)
                 for i, k in enumerate(shown)} if mp4 else {}
        cols, rows = branch_table(result, tau=self.tau,
                                  chosen={shown["best"].branch: "best", shown["worst"].branch: "worst"})
        caption = f"prompt {g.prompt_index}" + (f": {' | '.join(prompts)}" if prompts else "") + \
                  f" (pivot block {g.pivot}, window {g.window}); rows: anchor, best, worst"
        if self.tb is not None:
            self.tb.add_image("samples/anchor_best_worst", frame_grid(frames), iteration)
            self.tb.add_text("samples/branches", caption + "\n\n" + _markdown(cols, rows), iteration)
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({**{f"samples/{k}": wandb.Video(str(p), format="mp4", caption=caption)
                               for k, p in paths.items()},
                            "samples/branches": wandb.Table(columns=cols, data=rows)}, step=iteration)
        if paths:
            log.info("iteration %d: sample videos %s", iteration, ", ".join(str(p) for p in paths.values()))
        return paths

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
