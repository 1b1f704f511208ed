"""Resumable training checkpoints through megatron-core ``dist_checkpointing`` (torch_dist).

Layout under ``CheckpointConfig.dir``::

    iter_0000004/          a complete checkpoint (has ``complete.json``)
    iter_0000006.tmp/      being written (or left by a crash): never loaded, deleted by the next save
    iter_0000005.damaged/  failed verification at a resume (kept aside for inspection, never loaded)
    latest                 "iter_0000004", written last (a hint; the newest intact directory wins)

Contents of one checkpoint (all ranks call save/load together):

* ``model.<name>``: the trainable parameters (the LoRA) as ShardedTensors sharded like the parameters, so a
  checkpoint loads at another TP/CP/DP layout;
* ``ema.<name>``: the EMA of the trainable parameters when the trainer keeps one (``kvpo/ema.py``), sharded like
  ``model.<name>``;
* ``optimizer.<name>.<state>``: every optimizer state tensor shaped like its parameter (AdamW's ``exp_avg``,
  ``exp_avg_sq``), sharded the same way;
* ``training_state.json`` (rank 0): iteration, world size, per-parameter optimizer scalars (``step``) and the
  param groups' hyper-parameters (by parameter name), ``scheduler_state``, ``data_state`` and ``extra``
  (objective state, metrics history, the run's config). These must be the same on every rank (rank 0's are
  saved) and JSON-serialisable (anything else is refused at save);
* ``rng_<rank>.json``: each global rank's RNG states (``checkpoint/rng.py``), restored on the same rank;
  skipped with a warning when the world size changed;
* ``integrity.json``: megatron's SHA-256 manifest of all the files above, and ``complete.json``, written last.

No file is unpickled with code: the non-tensor state is JSON and torch_dist metadata is read through
``safe_dcp``. A resume (:func:`select_checkpoint`) verifies the candidate on rank 0 (manifest, metadata, shard
sizes, JSON) before any rank loads it, falls back to the newest intact checkpoint with a warning, and stops with
one error if none is intact or a file holds code. Parameter names are the model's, without DDP's ``module.``
prefixes (a checkpoint saved through a wrapper loads into the bare model and back). ``dir`` must be a filesystem
all ranks share.

Saving writes ``iter_NNNNNNN.tmp``, then rank 0 writes the manifest and ``complete.json`` into it, renames it to
``iter_NNNNNNN``, rewrites ``latest`` and deletes all but the last ``keep_last`` complete checkpoints (and any
``iter_NNNNNNN`` without ``complete.json``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kvpo_megatron.checkpoint import safe_dcp
from kvpo_megatron.checkpoint.dist import (check_model_keys, load_sharded, model_sharded_state_dict, partition_dim,
                                           save_sharded, sharded_tensor, tensor_metadata)
from kvpo_megatron.checkpoint.rng import rng_state, set_rng_state
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.parallel.collectives import broadcast_json, comm_device, global_rank, group_size

log = logging.getLogger(__name__)
COMPLETE, LATEST, STATE_FILE = "complete.json", "latest", "training_state.json"
EMA_PREFIX = "ema."
_ITER = re.compile(r"^iter_(\d{7})$")
FORMAT_VERSION = 2


class UnsupportedCheckpointError(ConfigError):
    """A checkpoint of another format version (not damage: older checkpoints are not tried instead)."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Training checkpoints: where, how often, how many, and whether to resume."""

    dir: str | None = None
    """Directory holding ``iter_NNNNNNN`` checkpoints; None disables saving."""
    every: int = 0
    """Save every this many iterations; 0 saves only the final iteration."""
    keep_last: int = 3
    """Complete checkpoints kept (older ones are deleted after a successful save)."""
    resume: str = "auto"
    """``auto`` (the newest intact checkpoint under ``dir``, if any), ``never``, or a checkpoint path."""

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
            raise ConfigError(f"checkpoint.every must be an integer >= 0, got {self.every!r}")
        if not isinstance(self.keep_last, int) or isinstance(self.keep_last, bool) or self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be an integer >= 1, got {self.keep_last!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ConfigError(f"checkpoint.resume must be auto, never or a path, got {self.resume!r}")


@dataclass(kw_only=True)
class TrainingState:
    """What :func:`load_training_checkpoint` restores besides tensors (read from ``training_state.json``)."""

    iteration: int
    scheduler_state: dict
    """The LR schedule's ``state_dict()`` at save time."""
    data_state: dict
    """The prompt loader's ``state_dict()`` (cursor, epoch)."""
    extra: dict
    """The caller's own JSON state (the trainer's: ``kvpo/run_state.py`` ``LoopState``)."""
    ema_restored: bool | None = None
    """With ``ema`` given: whether the checkpoint held an EMA (False: saved without; the EMA is left as it was)."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return group_size(dist.group.WORLD)


# ------------------------------------------------------------------------------------------ state dicts
def _name(name: str) -> str:
    """A parameter's name without DDP wrappers' ``module.`` prefixes."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def _key(name: str) -> str:
    return "model." + _name(name)


def _named_params(model) -> dict[str, torch.nn.Parameter]:
    return {_name(n): p for n, p in model.named_parameters()}


def _check_json(field: str, value) -> None:
    """Non-tensor state is stored as JSON: refuse what JSON cannot hold, at save time, naming the field."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"training checkpoint {field} must hold JSON values only (dict, list, str, number, "
                          f"bool, None): {e}") from None


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _param_names(model, optimizer) -> list[tuple[str, torch.nn.Parameter]]:
    by_id = {id(p): n for n, p in _named_params(model).items()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_id:
                raise ConfigError("the optimizer holds a parameter that is not the model's")
            out.append((by_id[id(p)], p))
    return out


def _optimizer_layout(model, optimizer) -> tuple[dict, dict, list]:
    """(tensor states {name: {key: tensor}}, scalar states {name: {key: value}}, groups [{hyper, names}])."""
    tensors, scalars = {}, {}
    for name, p in _param_names(model, optimizer):
        for key, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                tensors.setdefault(name, {})[key] = v
            else:
                scalars.setdefault(name, {})[key] = v.item() if isinstance(v, torch.Tensor) else v
    by_id = {id(p): n for n, p in _named_params(model).items()}
    groups = [{**{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in g.items() if k != "params"},
               "params": [by_id[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    return tensors, scalars, groups


def _ema_sharded(model, ema: dict[str, torch.Tensor], pgs) -> dict:
    """EMA tensors (this rank's shards, by parameter name) as ``ema.<name>``, sharded like their parameters."""
    params = _named_params(model)
    unknown = sorted(_name(n) for n in ema if _name(n) not in params)
    if unknown:
        raise ConfigError(f"EMA tensors of parameters the model does not have: {unknown[:10]}")
    return {_name(n): sharded_tensor(EMA_PREFIX + _name(n), t, partition_dim(params[_name(n)]), pgs)
            for n, t in ema.items()}


def _optimizer_sharded(model, tensors: dict, pgs) -> dict:
    params = _named_params(model)
    return {f"optimizer.{n}.{k}": sharded_tensor(f"optimizer.{n}.{k}", t, partition_dim(params[n]), pgs)
            for n, states in tensors.items() for k, t in states.items()}


# ------------------------------------------------------------------------------------------ save
def _iter_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _ITER.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_ITER.match(p.name).group(1)))


def save_training_checkpoint(cfg: CheckpointConfig, iteration: int, *, model, optimizer, scheduler_state: dict,
                             data_state: dict, extra: dict, pg_collection, ema: dict | None = None) -> Path:
    """Save a complete checkpoint of ``iteration`` (collective: every rank calls it). Returns its path.

    ``ema``: this rank's EMA shards by parameter name (``ParameterEMA.shadow``), saved as ``ema.<name>``.
    """
    if not cfg.dir:
        raise ConfigError("checkpoint.dir is not set; cannot save a training checkpoint")
    t0 = time.perf_counter()
    root = Path(cfg.dir)
    final, tmp = _iter_dir(root, iteration), root / f"iter_{iteration:07d}.tmp"
    tensors, scalars, groups = _optimizer_layout(model, optimizer)
    state = {"format_version": FORMAT_VERSION, "iteration": int(iteration), "world_size": _world(),
             "optimizer_common": {"scalars": scalars, "param_groups": groups,
                                  "tensor_keys": {n: sorted(s) for n, s in tensors.items()}},
             "scheduler_state": scheduler_state, "data_state": data_state, "extra": extra}
    for field in ("optimizer_common", "scheduler_state", "data_state", "extra"):
        _check_json(field, state[field])
    if global_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    names = _trainable(model)
    sd = {"model": model_sharded_state_dict(model, names=names, key_fn=_key, pg_collection=pg_collection),
          "optimizer": _optimizer_sharded(model, tensors, pg_collection)}
    if ema is not None:
        sd["ema"] = _ema_sharded(model, ema, pg_collection)
    save_sharded(sd, tmp)
    (tmp / f"rng_{global_rank():05d}.json").write_text(json.dumps(rng_state()))
    _barrier()
    if global_rank() == 0:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        safe_dcp.write_manifest(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"iteration": iteration, "world_size": _world(), "time": time.time()}))
        if final.exists():  # re-saving an iteration (e.g. after a resume): replace the old copy
            old = root / f"iter_{iteration:07d}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / f"{LATEST}.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / LATEST)
        _prune(root, cfg.keep_last)
    _barrier()
    log.info("saved training checkpoint %s (%d trainable tensors) in %.1fs", final, len(names),
             time.perf_counter() - t0)
    return final


def _prune(root: Path, keep_last: int) -> None:
    for p in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # partial checkpoints left by crashed saves, and iter_N without complete.json
        if p.is_dir() and p.name.startswith("iter_") and (
                p.name.endswith((".tmp", ".old")) or (_ITER.match(p.name) and not (p / COMPLETE).is_file())):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------ find / verify
def _candidates(cfg: CheckpointConfig) -> list[Path]:
    """Complete checkpoints to resume from, newest first, per ``cfg.resume``."""
    if cfg.resume == "never":
        return []
    if cfg.resume != "auto":
        p = Path(cfg.resume)
        if (p / COMPLETE).is_file():
            return [p]
        found = complete_checkpoints(p)
        if not found:
            raise ConfigError(f"checkpoint.resume={cfg.resume!r}: no complete checkpoint there "
                              f"(a complete one has {COMPLETE})")
        return found[::-1]
    return complete_checkpoints(cfg.dir)[::-1] if cfg.dir else []


def find_latest_checkpoint(cfg: CheckpointConfig) -> Path | None:
    """The newest complete checkpoint per ``cfg.resume`` (not verified; :func:`select_checkpoint` verifies):
    ``never`` -> None; a path -> that checkpoint (or the newest complete one inside it); ``auto`` -> the newest
    complete checkpoint under ``cfg.dir`` (None if none). Directories without ``complete.json`` are never returned."""
    found = _candidates(cfg)
    return found[0] if found else None


def read_training_state(path: str | Path) -> dict:
    """``training_state.json`` of a complete checkpoint (JSON: reading it runs no code)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"{path} is not a complete training checkpoint (no {COMPLETE}); refusing to load it")
    f = path / STATE_FILE
    if not f.is_file() and (path / "integrity.json").is_file():
        raise ConfigError(f"{f} is missing")
    if not f.is_file():
        raise UnsupportedCheckpointError(f"{path} was written by an older kvpo-megatron (its state is pickled, not "
                                         f"{STATE_FILE}); it is not loaded: start with checkpoint.resume=never or "
                                         "another checkpoint.dir")
    try:
        state = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f} is damaged (not JSON: {e})") from None
    keys = ("format_version", "iteration", "world_size", "optimizer_common", "scheduler_state", "data_state", "extra")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise ConfigError(f"{f} is damaged (needs the keys {list(keys)})")
    if state["format_version"] != FORMAT_VERSION:
        raise UnsupportedCheckpointError(f"{f}: format_version {state['format_version']} is not supported (this "
                                         f"build reads {FORMAT_VERSION})")
    return state


def verify_training_checkpoint(path: str | Path) -> dict:
    """Everything short of loading tensors: complete, state JSON, torch_dist metadata (no code), shard sizes,
    manifest checksums, every rank's RNG file. Returns the training state; raises ``ConfigError``
    (``UnsafeCheckpointError`` when a file holds code)."""
    path = Path(path)
    state = read_training_state(path)
    safe_dcp.check_dist_dir(path)  # first: a payload anywhere is an error even when the checksums disagree
    safe_dcp.verify_manifest(path, required=True)
    absent = [r for r in range(int(state["world_size"])) if not (path / f"rng_{r:05d}.json").is_file()]
    if absent:
        raise ConfigError(f"{path}: RNG files of ranks {absent[:8]} are missing")
    return state


def _broadcast_json(obj):
    """Rank 0's JSON value on every rank (a byte tensor over the default group; no pickling)."""
    if _world() == 1:
        return obj
    return broadcast_json(obj, src=0, group=None, device=comm_device())


def _choose(cfg: CheckpointConfig) -> dict:
    """Rank 0: verify candidates newest first; damaged ones are set aside (``auto``) and skipped with a warning."""
    candidates = _candidates(cfg)
    problems = []
    for p in candidates:
        try:
            verify_training_checkpoint(p)
            return {"path": str(p)}
        except (safe_dcp.UnsafeCheckpointError, UnsupportedCheckpointError) as e:
            return {"error": str(e)}
        except ConfigError as e:
            problems.append(f"{p.name}: {e}")
            log.warning("checkpoint %s is damaged, falling back to the previous one: %s", p, e)
            if cfg.resume == "auto":
                aside = p.with_name(p.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(p, aside)
                log.warning("moved %s aside to %s", p, aside.name)
    if candidates:
        return {"error": f"no intact training checkpoint to resume from ({'; '.join(problems)})"}
    return {"path": None}


def select_checkpoint(cfg: CheckpointConfig) -> Path | None:
    """The checkpoint to resume from (collective): rank 0 verifies before any rank loads; every rank gets its
    choice, or the same ``ConfigError``."""
    decision = None
    if global_rank() == 0:
        try:
            decision = _choose(cfg)
        except (ConfigError, OSError) as e:  # every rank must reach the broadcast
            decision = {"error": str(e)}
    decision = _broadcast_json(decision)
    if "error" in decision:
        raise ConfigError(decision["error"])
    return Path(decision["path"]) if decision["path"] else None


# ------------------------------------------------------------------------------------------ load
def load_training_checkpoint(path, *, model, optimizer, pg_collection, ema: dict | None = None) -> TrainingState:
    """Restore trainable parameters, optimizer state and this rank's RNG states (collective), and return the rest.

    With ``ema`` (this rank's EMA tensors by parameter name) the checkpoint's ``ema.<name>`` are copied into them
    when it has them (``TrainingState.ema_restored``).
    """
    path = Path(path)
    common = read_training_state(path)
    meta = tensor_metadata(path)
    names = _trainable(model)
    check_model_keys(model, meta, path, names=names, key_fn=_key, pg_collection=pg_collection)
    params, named = dict(model.named_parameters()), _named_params(model)
    ocommon = common["optimizer_common"]
    opt_names = [n for n, _ in _param_names(model, optimizer)]
    saved_groups = ocommon["param_groups"]
    if [g["params"] for g in saved_groups] != [g["params"] for g in _optimizer_layout(model, optimizer)[2]]:
        raise ConfigError(f"{path}: the optimizer's parameter groups differ from the checkpoint's "
                          f"({[len(g['params']) for g in saved_groups]} parameters per group saved)")
    missing = [f"optimizer.{n}.{k}" for n, keys in ocommon["tensor_keys"].items() for k in keys
               if f"optimizer.{n}.{k}" not in meta]
    if missing:
        raise ConfigError(f"{path}: optimizer tensors missing from the checkpoint: {missing[:10]}")
    opt_targets = {n: {k: torch.empty(named[n].shape, dtype=meta[f"optimizer.{n}.{k}"][1]) for k in keys}
                   for n, keys in ocommon["tensor_keys"].items()}
    same_world = common["world_size"] == _world()
    sd = {"model": model_sharded_state_dict(model, names=names, key_fn=_key, pg_collection=pg_collection,
                                            tensors={n: torch.empty(params[n].shape, dtype=meta[_key(n)][1])
                                                     for n in names}),
          "optimizer": _optimizer_sharded(model, opt_targets, pg_collection)}
    rng = None
    if same_world:
        f = path / f"rng_{global_rank():05d}.json"
        try:
            rng = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{f} is missing or damaged: {e}") from None
    has_ema = ema is not None and any(k.startswith(EMA_PREFIX) for k in meta)
    if has_ema:
        raw = {_name(n): n for n in names}
        check_model_keys(model, meta, path, names=[raw[_name(n)] for n in ema], prefix=EMA_PREFIX,
                         key_fn=lambda n: EMA_PREFIX + _name(n), pg_collection=pg_collection)
        sd["ema"] = _ema_sharded(model, {n: torch.empty(t.shape, dtype=meta[EMA_PREFIX + _name(n)][1])
                                         for n, t in ema.items()}, pg_collection)
    loaded = load_sharded(sd, path)
    if has_ema:
        with torch.no_grad():
            for n, t in ema.items():
                t.copy_(loaded["ema"][_name(n)])
    with torch.no_grad():
        for n in names:
            params[n].copy_(loaded["model"][n])
    state = {}
    for i, n in enumerate(opt_names):
        s = {k: loaded["optimizer"][f"optimizer.{n}.{k}"] for k in ocommon["tensor_keys"].get(n, [])}
        s.update({k: torch.tensor(v, dtype=torch.float32) if k == "step" else v
                  for k, v in ocommon["scalars"].get(n, {}).items()})
        if s:
            state[i] = s
    index = {n: i for i, n in enumerate(opt_names)}
    # JSON has no tuples: the optimizers' sequence hyper-parameters (AdamW's betas) were tuples
    groups = [{**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items() if k != "params"},
               "params": [index[n] for n in g["params"]]} for g in saved_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if rng is not None:
        set_rng_state(rng)
    else:
        log.warning("%s was saved by %d ranks, this run has %d: RNG states are not restored", path,
                    common["world_size"], _world())
    log.info("resumed from %s (iteration %d)", path, common["iteration"])
    return TrainingState(iteration=common["iteration"], scheduler_state=common["scheduler_state"],
                         data_state=common["data_state"], extra=common["extra"],
                         ema_restored=has_ema if ema is not None else None)
