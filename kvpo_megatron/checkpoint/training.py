"""Resumable training checkpoints through megatron-core ``dist_checkpointing`` (torch_dist).

Layout under ``CheckpointConfig.dir``::

    iter_0000004/          a complete checkpoint (has ``complete.json``)
    iter_0000006.tmp/      being written (or left by a crash): never loaded, deleted by the next save
    latest                 "iter_0000004", written last (a hint; the newest complete directory wins)

Contents of one checkpoint (all ranks call save/load together):

* ``model.<name>``: the trainable parameters (the LoRA) as ShardedTensors sharded like the parameters, so a
  checkpoint loads at another TP/CP/DP layout;
* ``ema.<name>``: the EMA of the trainable parameters when the trainer keeps one (``kvpo/ema.py``), sharded like
  ``model.<name>``;
* ``optimizer.<name>.<state>``: every optimizer state tensor shaped like its parameter (AdamW's ``exp_avg``,
  ``exp_avg_sq``), sharded the same way; per-parameter scalars (``step``) and the param groups'
  hyper-parameters (by parameter name) are common state;
* ``rng_state``: one object per global rank (torch CPU + CUDA, python ``random``, numpy, megatron's RNG
  tracker), restored on the same rank; skipped with a warning when the world size changed;
* common state (written by rank 0): iteration, ``scheduler_state``, ``data_state`` and ``extra`` (objective
  state, metrics history). These must be the same on every rank (rank 0's are saved) and hold plain python
  values and tensors only (they are read back with ``weights_only=True``; anything else is refused at save).

Parameter names are the model's, without DDP's ``module.`` prefixes (a checkpoint saved through a wrapper
loads into the bare model and back). ``dir`` must be a filesystem all ranks share.

Saving writes ``iter_NNNNNNN.tmp``, then rank 0 writes ``complete.json`` into it, renames it to
``iter_NNNNNNN``, rewrites ``latest`` and deletes all but the last ``keep_last`` complete checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kvpo_megatron.checkpoint.dist import (check_model_keys, global_rank, load_sharded, model_sharded_state_dict,
                                           partition_dim, save_sharded, sharded_tensor, tensor_metadata)
from kvpo_megatron.errors import ConfigError

log = logging.getLogger(__name__)
COMPLETE, LATEST = "complete.json", "latest"
EMA_PREFIX = "ema."
_ITER = re.compile(r"^iter_(\d{7})$")
FORMAT_VERSION = 1


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
    """``auto`` (the latest complete checkpoint under ``dir``, if any), ``never``, or a checkpoint path."""

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 0:
            raise ConfigError(f"checkpoint.every must be an integer >= 0, got {self.every!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be an integer >= 1, got {self.keep_last!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ConfigError(f"checkpoint.resume must be auto, never or a path, got {self.resume!r}")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """This rank's RNG states, as plain types and tensors (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "tracker": None}
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        state["tracker"] = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    except Exception:  # noqa: BLE001 - megatron's tracker is optional state
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker"):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(data):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (_world(),), (global_rank(),), replica_id=0)


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


def _check_plain(field: str, value) -> None:
    """Common state is loaded with ``weights_only=True``: refuse what that cannot read, at save time."""
    import io

    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the field and the reason
        raise ConfigError(f"training checkpoint {field} must hold plain python values and tensors only: {e}") from e


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
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
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
    if global_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    for field, value in (("scheduler_state", scheduler_state), ("data_state", data_state), ("extra", extra)):
        _check_plain(field, value)
    names = _trainable(model)
    tensors, scalars, groups = _optimizer_layout(model, optimizer)
    sd = {"model": model_sharded_state_dict(model, names=names, key_fn=_key, pg_collection=pg_collection),
          "optimizer": _optimizer_sharded(model, tensors, pg_collection), "rng_state": _rng_object(rng_state()),
          "iteration": int(iteration), "world_size": _world(), "format_version": FORMAT_VERSION,
          "optimizer_common": {"scalars": scalars, "param_groups": groups,
                               "tensor_keys": {n: sorted(s) for n, s in tensors.items()}},
          "scheduler_state": scheduler_state, "data_state": data_state, "extra": extra}
    if ema is not None:
        sd["ema"] = _ema_sharded(model, ema, pg_collection)
    save_sharded(sd, tmp)
    _barrier()
    if global_rank() == 0:
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
    for p in root.iterdir():  # partial checkpoints left by crashed saves
        if p.is_dir() and p.name.startswith("iter_") and p.name.endswith((".tmp", ".old")):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------ find / load
def find_latest_checkpoint(cfg: CheckpointConfig) -> Path | None:
    """The checkpoint to resume from, per ``cfg.resume``: ``never`` -> None; a path -> that checkpoint (or the
    newest complete one inside it); ``auto`` -> the newest complete checkpoint under ``cfg.dir`` (None if none).
    Directories without ``complete.json`` (partial writes) are never returned."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        p = Path(cfg.resume)
        if (p / COMPLETE).is_file():
            return p
        found = complete_checkpoints(p)
        if not found:
            raise ConfigError(f"checkpoint.resume={cfg.resume!r}: no complete checkpoint there "
                              f"(a complete one has {COMPLETE})")
        return found[-1]
    if not cfg.dir:
        return None
    found = complete_checkpoints(cfg.dir)
    return found[-1] if found else None


def load_training_checkpoint(path, *, model, optimizer, pg_collection, ema: dict | None = None) -> dict:
    """Restore trainable parameters, optimizer state and this rank's RNG states (collective).

    Returns ``{'iteration', 'scheduler_state', 'data_state', 'extra'}``. With ``ema`` (this rank's EMA tensors
    by parameter name) the checkpoint's ``ema.<name>`` are copied into them when it has them, and the result
    also holds ``'ema_restored'`` (False: a checkpoint saved without EMA; ``ema`` is left as it was).
    """
    from megatron.core.dist_checkpointing import load_common_state_dict

    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise ConfigError(f"{path} is not a complete training checkpoint (no {COMPLETE}); refusing to load it")
    common = load_common_state_dict(str(path))
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
    opt_targets = {n: {k: torch.empty(named[n].shape, dtype=meta[f"optimizer.{n}.{k}"][1]) for k in keys}
                   for n, keys in ocommon["tensor_keys"].items()}
    same_world = common["world_size"] == _world()
    sd = {"model": model_sharded_state_dict(model, names=names, key_fn=_key, pg_collection=pg_collection,
                                            tensors={n: torch.empty(params[n].shape, dtype=meta[_key(n)][1])
                                                     for n in names}),
          "optimizer": _optimizer_sharded(model, opt_targets, pg_collection)}
    if same_world:
        sd["rng_state"] = _rng_object(rng_state())
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
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in saved_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if same_world:
        set_rng_state(loaded["rng_state"])
    else:
        log.warning("%s was saved by %d ranks, this run has %d: RNG states are not restored", path,
                    common["world_size"], _world())
    log.info("resumed from %s (iteration %d)", path, common["iteration"])
    out = {k: common[k] for k in ("iteration", "scheduler_state", "data_state", "extra")}
    if ema is not None:
        out["ema_restored"] = has_ema
    return out
