"""The trainer's run on disk: a fresh ``train.out_dir`` (another run's files refused or, with ``train.overwrite``,
deleted), and its training checkpoints -- save, and resume with the changed settings checked and applied.

What a checkpoint holds besides tensors is typed: ``checkpoint.training.TrainingState`` (iteration, LR schedule,
data cursor) and the loop's own :class:`LoopState` in its ``extra``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from kvpo_megatron.checkpoint import training as ckpt
from kvpo_megatron.cli import log_single_rank
from kvpo_megatron.config import from_dict, to_dict
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.kvpo.metrics import check_out_dir, remove_run_files
from kvpo_megatron.kvpo.train_config import resume_changes

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LoopState:
    """The training loop's state in a checkpoint (``TrainingState.extra``, JSON)."""

    consecutive_skips: int = 0
    """Non-finite updates in a row so far (``train.max_consecutive_skips``)."""
    history: list[dict] = field(default_factory=list)
    """The metrics rows of every iteration so far (``metrics.jsonl``)."""
    config: dict | None = None
    """The run's config tree (``config.to_dict``), compared with the resuming run's."""

    @classmethod
    def from_extra(cls, extra: dict) -> "LoopState":
        return cls(consecutive_skips=extra.get("consecutive_skips", 0), history=list(extra.get("history", [])),
                   config=extra.get("config"))


def prepare_fresh_out_dir(cfg, rank: int) -> None:
    """Nothing to resume: refuse an ``out_dir`` (or ``checkpoint.dir``) holding another run, unless
    ``train.overwrite`` (collective: every rank checks before rank 0 deletes)."""
    tc, cc = cfg.train, cfg.checkpoint
    old = []
    if cc.dir and (ckpt.complete_checkpoints(cc.dir) or (Path(cc.dir) / ckpt.LATEST).exists()):
        if not tc.overwrite:  # resume=never (auto would have resumed)
            raise ConfigError(f"checkpoint.dir={cc.dir!r} holds another run's checkpoints and checkpoint.resume="
                              f"{cc.resume!r}; set train.overwrite=true to delete them, or choose another "
                              "checkpoint.dir")
        old = [p for p in Path(cc.dir).iterdir() if p.name.startswith(("iter_", ckpt.LATEST))]
    old += check_out_dir(tc.out_dir, overwrite=tc.overwrite)
    dist.barrier()  # every rank has checked before rank 0 deletes
    if rank == 0:
        remove_run_files(old)
    dist.barrier()


def check_resumed_config(path: Path, saved: dict | None, cfg) -> None:
    """Changes allowed on resume (``train_config.RESUMABLE``) are logged; others are refused."""
    if saved is None:
        log_single_rank(log, logging.WARNING, "%s holds no config: changed settings cannot be checked", path)
        return
    try:  # fields added since the checkpoint was written take their defaults, as they would have then
        saved = to_dict(from_dict(type(cfg), saved))
    except (ConfigError, TypeError, ValueError):  # a tree this version cannot read: compare it as stored
        pass
    allowed, refused = resume_changes(saved, to_dict(cfg))
    if refused:
        raise ConfigError(f"resuming {path} with settings that cannot change on resume: {'; '.join(refused)}; "
                          "restore them, or start a new run (checkpoint.resume=never, another checkpoint.dir)")
    for line in allowed:  # hyper-parameters loudly, paths and loop settings quietly
        level = logging.INFO if line.startswith(("train.", "checkpoint.")) else logging.WARNING
        log_single_rank(log, level, "resume: %s (applied)", line)


def apply_optim_config(optimizer, scheduler, o) -> None:
    """``optim.*`` of this run (``o``) over the restored optimizer and schedule (no-op when unchanged)."""
    for i, g in enumerate(optimizer.param_groups):
        g.update(weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, initial_lr=o.lr,
                 lr=o.lr * scheduler.lr_lambdas[i](scheduler.last_epoch))
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def resume(path: Path, cfg, *, model, optimizer, scheduler, loader, pg_collection, ema) -> tuple[int, LoopState]:
    """Load the checkpoint at ``path`` into the run's objects (collective); returns (iteration, loop state)."""
    check_resumed_config(path, LoopState.from_extra(ckpt.read_training_state(path)["extra"]).config, cfg)
    state = ckpt.load_training_checkpoint(path, model=model, optimizer=optimizer, pg_collection=pg_collection,
                                          ema=ema.shadow if ema else None)
    if ema is not None and not state.ema_restored:
        log_single_rank(log, logging.WARNING, "%s holds no EMA: the EMA restarts at its weights", path)
        ema.reset()
    scheduler.load_state_dict(state.scheduler_state)
    apply_optim_config(optimizer, scheduler, cfg.optim)
    loader.load_state_dict(state.data_state)
    log.info("resumed from %s at iteration %d", path, state.iteration)
    return state.iteration, LoopState.from_extra(state.extra)


def save(cfg, iteration: int, loop: LoopState, *, model, optimizer, scheduler, loader, pg_collection, ema) -> None:
    """A training checkpoint of the run at ``iteration`` (collective)."""
    ckpt.save_training_checkpoint(
        cfg.checkpoint, iteration, model=model, optimizer=optimizer, scheduler_state=scheduler.state_dict(),
        data_state=loader.state_dict(), extra=dataclasses.asdict(loop), pg_collection=pg_collection,
        ema=ema.shadow if ema else None)
