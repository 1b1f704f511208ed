"""Model weights as megatron-core dist checkpoints (``torch_dist``), resharded on load at any TP/CP.

``CausalWanDiT`` is a plain ``nn.Module``, so its sharded state dict is built here from the megatron attributes
of its parameters: a parameter with ``tensor_model_parallel=True`` is one of TP shards along
``partition_dim``; every other parameter is replicated over TP. All parameters are replicated over CP and DP.
A ``ShardedTensor`` names the global tensor, the rank's slice of it and a ``replica_id`` whose entries are all
zero on exactly one rank per shard (the one that writes it): ``(tp_rank if replicated over TP else 0,
rank in the DP x CP group)``.

A *model checkpoint directory* (what ``tools/convert_checkpoint.py import`` writes) holds:

* ``model.<name>``: base weights in our names (as before ``apply_lora``, see ``lora_tensors.base_name``);
* ``lora.<module>.lora_A.weight`` / ``lora_B.weight``: optional LoRA, full tensors (keys of
  ``lora.lora_full_state_dict``), written once;
* ``kvpo_checkpoint.json`` (:data:`INFO_FILE`): the model section (preset + overrides), dtype, LoRA config;
* megatron's ``metadata.json`` and torch DCP's ``.metadata`` + ``__<rank>_<n>.distcp`` files;
* ``integrity.json``: megatron's SHA-256 manifest of the files above (checked by export).

Saving and loading such a directory with its LoRA is ``checkpoint/model_dir.py``; this module holds no LoRA or
model code, so the converter (``tools/convert_checkpoint.py``) imports it without megatron's model stack.
Every rank of the world calls save/load together (they are collective). Directories are untrusted input: every
read goes through ``safe_dcp`` (no pickled code runs; damage is one ``ConfigError`` naming the file).
"""
from __future__ import annotations

import json
import logging
import queue
from pathlib import Path

import torch

from kvpo_megatron.checkpoint import safe_dcp
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.lora_tensors import base_name
from kvpo_megatron.parallel.collectives import global_rank, group_rank, group_size

safe_dcp.install()
log = logging.getLogger(__name__)
MODEL_PREFIX, LORA_PREFIX = "model.", "lora."
INFO_FILE = "kvpo_checkpoint.json"


def layout(pg_collection) -> tuple[int, int, int]:
    """(tp_rank, tp_size, rank in the DP x CP group) of this process."""
    tp = getattr(pg_collection, "tp", None)
    return group_rank(tp), group_size(tp), group_rank(getattr(pg_collection, "dp_cp", None))


def partition_dim(p: torch.Tensor) -> int | None:
    """The TP-sharded dim of a parameter, or None when it is replicated over TP."""
    if not getattr(p, "tensor_model_parallel", False):
        return None
    if getattr(p, "partition_stride", 1) != 1:
        raise ValueError("strided TP partitions are not supported (this model has none)")
    return int(p.partition_dim)


def sharded_tensor(key: str, data: torch.Tensor, dim: int | None, pg_collection, *, replica: int | None = None):
    """A megatron ``ShardedTensor`` for this rank's ``data`` of global tensor ``key`` (sharded on ``dim``).

    ``replica`` overrides the DP x CP replica index (e.g. the global rank, so that only rank 0 writes).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp_rank, tp_size, dpcp = layout(pg_collection)
    dpcp = dpcp if replica is None else replica
    if dim is None or tp_size == 1:
        return ShardedTensor.from_rank_offsets(key, data, replica_id=(tp_rank, dpcp))
    return ShardedTensor.from_rank_offsets(key, data, (dim, tp_rank, tp_size), replica_id=(0, dpcp))


def _key(name: str) -> str:
    return MODEL_PREFIX + base_name(name)


def _pgs(model, pg_collection):
    return pg_collection if pg_collection is not None else getattr(model, "pg_collection", None)


def model_sharded_state_dict(model: torch.nn.Module, *, names=None, tensors: dict | None = None,
                             key_fn=_key, pg_collection=None) -> dict:
    """``{param name: ShardedTensor}`` for the model's parameters (or ``names``).

    Data: ``tensors[name]`` (this rank's slice, e.g. read from a source file) or the parameter itself. Keys in
    the checkpoint: ``key_fn(name)`` (default ``model.`` + the name before ``apply_lora``). Process groups:
    ``pg_collection``, else the model's own (a wrapper such as DDP has none: pass them).
    """
    pgs = _pgs(model, pg_collection)
    params = dict(model.named_parameters())
    out = {}
    for name in names if names is not None else params:
        p = params[name]
        data = p.detach() if tensors is None else tensors[name]
        if tuple(data.shape) != tuple(p.shape):
            raise ConfigError(f"{name}: local shard shape {tuple(data.shape)} != parameter shape {tuple(p.shape)}")
        out[name] = sharded_tensor(key_fn(name), data, partition_dim(p), pgs)
    return out


def _sync_writer_queue() -> None:
    """megatron's writer collects results on a queue owned by a spawned ``multiprocessing.Manager``, needed only
    by async saves; synchronous saves write in this process, so a thread queue does (and starts no process)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_sharded(sharded_sd: dict, path: str | Path) -> None:
    """``dist_checkpointing.save`` (torch_dist) into an existing empty directory, synchronously."""
    from megatron.core import dist_checkpointing

    _sync_writer_queue()
    logging.getLogger("megatron.core.dist_checkpointing").setLevel(logging.ERROR)
    dist_checkpointing.save(sharded_sd, str(path))


def load_sharded(sharded_sd: dict, path: str | Path) -> dict:
    """``dist_checkpointing.load`` of a directory :func:`tensor_metadata` has checked; a failure to read it
    (e.g. a corrupt shard) is one ``ConfigError`` naming the directory."""
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(sharded_sd, str(path))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - torch DCP wraps per-rank failures in long reports: keep one line
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ConfigError(f"{path}: cannot read its tensors, a shard may be corrupt ({type(e).__name__}: "
                          f"{first[:300]})") from e


def tensor_metadata(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor in a dist checkpoint, by key (after ``safe_dcp.check_dist_dir``)."""
    return safe_dcp.tensor_shapes(safe_dcp.check_dist_dir(path))


def full_shape(p: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(p.shape)
    if partition_dim(p) is not None:
        shape[p.partition_dim] *= tp_size
    return tuple(shape)


def check_model_keys(model: torch.nn.Module, meta: dict, path, *, names, key_fn=_key,
                     prefix: str = MODEL_PREFIX, pg_collection=None) -> None:
    """Missing, unknown (under ``prefix``) and mismatched-shape keys, in one message naming the checkpoint."""
    _, tp_size, _ = layout(_pgs(model, pg_collection))
    params = dict(model.named_parameters())
    want = {key_fn(n): full_shape(params[n], tp_size) for n in names}
    stored = {k: v[0] for k, v in meta.items() if k.startswith(prefix)}
    missing = sorted(set(want) - set(stored))
    unknown = sorted(set(stored) - set(want))
    bad = [f"{k[len(prefix):]}: checkpoint {stored[k]} vs model {want[k]}" for k in sorted(set(want) & set(stored))
           if stored[k] != want[k]]
    problems = [f"{what} ({len(keys)}) {[k.removeprefix(prefix) for k in keys[:20]]}"
                for what, keys in (("missing keys", missing), ("unknown keys", unknown)) if keys]
    if bad:
        problems.append(f"mismatched shapes ({len(bad)}) {bad[:20]}")
    if problems:
        raise ConfigError(f"{path}: checkpoint does not match the model: " + "; ".join(problems))


def load_params_dist(model: torch.nn.Module, path: str | Path, *, names, key_fn=_key,
                     prefix: str = MODEL_PREFIX, meta: dict | None = None) -> None:
    """Load the named parameters of ``model`` from a dist checkpoint, resharding to the model's TP."""
    meta = tensor_metadata(path) if meta is None else meta
    check_model_keys(model, meta, path, names=names, key_fn=key_fn, prefix=prefix)
    params = dict(model.named_parameters())
    # load into fresh tensors in the stored dtype, then copy (casts to the parameter's dtype and device)
    target = {n: torch.empty(params[n].shape, dtype=meta[key_fn(n)][1]) for n in names}
    loaded = load_sharded(model_sharded_state_dict(model, names=names, tensors=target, key_fn=key_fn), path)
    with torch.no_grad():
        for n in names:
            params[n].copy_(loaded[n])


def load_full_tensors(path: str | Path, *, prefix: str = MODEL_PREFIX, meta: dict | None = None
                      ) -> dict[str, torch.Tensor]:
    """Every ``prefix`` tensor of a dist checkpoint as a full tensor, keys without the prefix."""
    meta = tensor_metadata(path) if meta is None else meta
    rank = global_rank()
    target = {k[len(prefix):]: sharded_tensor(k, torch.empty(shape, dtype=dt), None, None, replica=rank)
              for k, (shape, dt) in meta.items() if k.startswith(prefix)}
    return load_sharded(target, path) if target else {}


# ------------------------------------------------------------------------------------------ model directories
def read_info(path: str | Path) -> dict | None:
    """The ``kvpo_checkpoint.json`` of a model checkpoint directory (None for a bare dist checkpoint)."""
    f = Path(path) / INFO_FILE
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: not valid JSON: {e}") from e


def lora_sharded_state_dict(full: dict[str, torch.Tensor]) -> dict:
    """Full LoRA tensors as replicated ShardedTensors that only global rank 0 writes."""
    rank = global_rank()
    return {f"{LORA_PREFIX}{k}": sharded_tensor(LORA_PREFIX + k, t, None, None, replica=rank)
            for k, t in full.items()}
