"""Read torch_dist checkpoint directories without running code from them.

A torch_dist directory (megatron-core ``dist_checkpointing`` on torch DCP) holds pickles in two places:

* ``.metadata``: torch DCP's ``Metadata``, read by ``FileSystemReader.read_metadata`` with plain ``pickle.load``;
* byte items (megatron's ``common_state`` and any ``ShardedObject``), read by ``DefaultLoadPlanner.load_bytes``
  with ``torch.load(weights_only=False)`` (megatron's ``load_common_state_dict`` goes through it).

Either runs any code a crafted file names. Here:

* :class:`MetadataUnpickler` admits only the classes DCP metadata consists of (:data:`ALLOWED`, from
  ``torch/distributed/checkpoint/{metadata,planner,filesystem}.py`` and the ``all_local_plans`` megatron's
  saver adds), so a ``.metadata`` naming anything else raises :class:`UnsafeCheckpointError`;
* :func:`install` swaps those two readers for ones that use it and ``weights_only=True`` (process-wide, once,
  as megatron-core itself swaps ``torch.storage._load_from_bytes``), so no load path can run code;
* :func:`check_dist_dir` reads a directory the same way *before* megatron touches it and turns every problem
  into one ``ConfigError`` naming the file: code in ``.metadata`` or in the common state, a truncated or
  missing shard, a legacy pickled ``common.pt``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path

import torch

from kvpo_megatron.errors import ConfigError

METADATA_FILE, MEGATRON_META = ".metadata", "metadata.json"


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file names code (a class or function outside the admitted data types)."""


def _allowed() -> dict[tuple[str, str], object]:
    from torch.distributed.checkpoint import filesystem, metadata, planner

    classes = [metadata.Metadata, metadata.MetadataIndex, metadata.StorageMeta, metadata.TensorProperties,
               metadata.TensorStorageMetadata, metadata.BytesStorageMetadata, metadata.ChunkStorageMetadata,
               metadata._MEM_FORMAT_ENCODING, filesystem._StorageInfo, filesystem._StoragePrefix,
               planner.SavePlan, planner.WriteItem, planner.WriteItemType, planner.TensorWriteData,
               planner.BytesIOWriteData, torch.Size]
    out = {(c.__module__, c.__qualname__): c for c in classes}
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # str -> torch.layout lookup
    out.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    return out


ALLOWED = _allowed()
"""(module, name) -> object: everything a DCP ``.metadata`` written by torch 2.x / megatron-core refers to."""


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED` globals."""

    def __init__(self, file, *, source: str = "checkpoint metadata"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        obj = ALLOWED.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(f"{self.source} refers to {module}.{name}, which is not part of torch "
                                        "checkpoint metadata; refusing to load it (the file may run code)")
        return obj


def load_metadata(path: str | Path):
    """The ``Metadata`` in ``path`` (a ``.metadata`` file), through :class:`MetadataUnpickler`."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with open(path, "rb") as f:
            md = MetadataUnpickler(f, source=str(path)).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; {path.parent} is not a complete torch_dist checkpoint") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbled: name the file and the reason
        raise ConfigError(f"{path} is damaged (cannot read it: {type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) or \
            not isinstance(md.storage_data, dict):
        raise ConfigError(f"{path} does not hold torch checkpoint metadata (got {type(md).__name__})")
    return md


def _read_item(root: Path, info) -> bytes:
    if getattr(info, "transform_descriptors", None):
        raise ConfigError(f"{root}: stored with transforms {list(info.transform_descriptors)}, which this "
                          "reader does not check; refusing to load it")
    with open(root / info.relative_path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.length)


def _check_extents(root: Path, md) -> None:
    """Every item's bytes lie inside its file (a truncated or missing shard is caught before any read)."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        rel = info.relative_path
        if not isinstance(rel, str) or os.path.basename(rel) != rel:
            raise ConfigError(f"{root / METADATA_FILE}: names a data file outside the directory ({rel!r})")
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = root / rel
        if not f.is_file():
            raise ConfigError(f"{root}: shard {rel} is missing")
        if f.stat().st_size < size:
            raise ConfigError(f"{f} is truncated ({f.stat().st_size} bytes; its metadata needs {size})")


def load_weights_only(data: bytes, source: str):
    """``torch.load(weights_only=True)`` of bytes; a refusal names ``source``."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
        reason = next((ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler error" in ln), lines[0])
        reason = reason.split(". Please")[0].removeprefix("WeightsUnpickler error: ")
        raise UnsafeCheckpointError(f"{source} holds a non-data object ({reason[:200]}); refusing to load it (the "
                                    "file may run code)") from None
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{source} is damaged ({type(e).__name__}: {e})") from None


def check_dist_dir(path: str | Path):
    """Validate a torch_dist directory without running code from it; returns its DCP ``Metadata``.

    Checks: megatron's ``metadata.json`` says ``torch_dist``; no legacy ``common.pt``; ``.metadata`` holds only
    metadata classes; every shard is present and long enough; the common state loads with ``weights_only``.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"checkpoint directory not found: {root}")
    try:
        backend = json.loads((root / MEGATRON_META).read_text()).get("sharded_backend")
    except FileNotFoundError:
        raise ConfigError(f"{root} is not a megatron dist checkpoint (no {MEGATRON_META}); import weights with "
                          "tools/convert_checkpoint.py import") from None
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{root / MEGATRON_META} is damaged: {e}") from None
    if backend != "torch_dist":
        raise ConfigError(f"{root}: sharded backend {backend!r} is not supported (torch_dist only)")
    if (root / "common.pt").exists():
        raise ConfigError(f"{root}: holds a legacy pickled common.pt, which is not loaded (it could run code)")
    md = load_metadata(root / METADATA_FILE)
    _check_extents(root, md)
    for index, info in md.storage_data.items():
        if getattr(index, "fqn", "").startswith("common_state/"):
            load_weights_only(_read_item(root, info), f"{root} (common state in {info.relative_path})")
    return md


def tensor_shapes(md) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor of a DCP ``Metadata``, by key."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


# ------------------------------------------------------------------------------------------ process-wide readers
def _safe_read_metadata(self, *args, **kwargs):
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as f:
        md = MetadataUnpickler(f, source=str(path)).load()
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    md.storage_meta.load_id = self.load_id
    return md


def _safe_load_bytes(self, read_item, value: io.BytesIO) -> None:
    from torch.distributed.checkpoint._traverse import set_element

    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def install() -> None:
    """Make torch DCP read ``.metadata`` through :class:`MetadataUnpickler` and byte items with
    ``weights_only=True`` in this process (idempotent)."""
    from torch.distributed.checkpoint import default_planner, filesystem

    filesystem.FileSystemReader.read_metadata = _safe_read_metadata
    default_planner.DefaultLoadPlanner.load_bytes = _safe_load_bytes


# ------------------------------------------------------------------------------------------ integrity manifests
def write_manifest(path: str | Path) -> None:
    """megatron's ``integrity.json``: the SHA-256 of every file now in ``path`` (call once all are written)."""
    from megatron.core.dist_checkpointing.validation import save_integrity_manifest

    save_integrity_manifest(str(path))


def verify_manifest(path: str | Path, *, required: bool) -> None:
    """Re-hash the files ``integrity.json`` lists; a mismatch (or, when ``required``, no manifest) is a
    ``ConfigError`` naming the files."""
    from megatron.core.dist_checkpointing.validation import INTEGRITY_FNAME, _verify_integrity_manifest_impl

    root = Path(path)
    if not (root / INTEGRITY_FNAME).is_file():
        if required:
            raise ConfigError(f"{root} has no {INTEGRITY_FNAME} (sizes/checksums recorded at save time)")
        return
    try:
        _verify_integrity_manifest_impl(str(root))
    except Exception as e:  # noqa: BLE001 - CheckpointingException, or a garbled manifest
        raise ConfigError(f"{root} failed its integrity check: " + " ".join(str(e).split())[:400]) from None
