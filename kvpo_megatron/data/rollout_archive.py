"""Rollout archive: per-iteration tensors (branch/anchor latents, rewards per component, advantages, TVEs, pivot,
routing indices, ...) written to a zarr store with tensorstore, in a background thread so training doesn't wait.

Layout::

    DIR/iter_00000012/<key>/       one zarr array per record entry (scalars are 0-d arrays)
    DIR/iter_00000012/record.json  written last: keys, shapes, dtypes (an iteration without it is incomplete)

Record values may be tensors (any device, bf16 included), numpy arrays, Python/numpy scalars, or nested dicts
(flattened with '.', e.g. ``{"rewards": {"hpsv3": t}}`` -> ``rewards.hpsv3``). Tensors are copied to host
memory inside :meth:`RolloutArchive.write`, so the caller may reuse its buffers right away.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvpo_megatron.data.prompts import DataError

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_MANIFEST = "record.json"


def _iter_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:08d}"


def _to_host(value: Any, key: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.cpu().view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
        return t.cpu().numpy().copy()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (bool, int, float, np.generic)):
        return np.asarray(value)
    raise TypeError(f"rollout archive: record[{key!r}] has unsupported type {type(value).__name__} "
                    f"(expected tensor, ndarray, int, float or a dict of those)")


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
            continue
        if not _KEY.match(name):
            raise ValueError(f"rollout archive: key {name!r} must be letters, digits, '_', '-' joined by '.'")
        out[name] = value
    return out


def _write_array(path: Path, arr: np.ndarray) -> None:
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}
    store = ts.open(spec, create=True, delete_existing=True, dtype=ts.dtype(arr.dtype.name), shape=arr.shape).result()
    store.write(arr).result()


class RolloutArchive:
    """Asynchronous per-iteration writer. At most ``max_pending`` records wait in host memory; ``write`` blocks
    beyond that. Errors from the writer thread are raised by the next ``write``/``flush``/``close``."""

    def __init__(self, path: str | Path, *, max_pending: int = 2) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-archive")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pending: list[Future] = []
        self._closed = False

    def write(self, iteration: int, record: Mapping[str, Any]) -> None:
        """Snapshot ``record`` to host memory now; write it to ``iter_<iteration>`` in the background."""
        if self._closed:
            raise RuntimeError("RolloutArchive.write after close()")
        self._raise_errors()
        host = {k: _to_host(v, k) for k, v in _flatten(record).items()}
        self._slots.acquire()
        fut = self._pool.submit(self._write_sync, int(iteration), host)
        fut.add_done_callback(lambda _: self._slots.release())
        self._pending.append(fut)

    def _write_sync(self, iteration: int, host: dict[str, np.ndarray]) -> None:
        target = _iter_dir(self.path, iteration)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for key, arr in host.items():
            _write_array(target / key, arr)
        manifest = {"iteration": iteration,
                    "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype.name} for k, a in host.items()}}
        (target / _MANIFEST).write_text(json.dumps(manifest, indent=1))

    def _raise_errors(self) -> None:
        still = []
        for fut in self._pending:
            if fut.done():
                fut.result()  # re-raises the writer's exception here
            else:
                still.append(fut)
        self._pending = still

    def flush(self) -> None:
        """Wait for every pending write (raising the first error)."""
        for fut in self._pending:
            fut.result()
        self._pending = []

    def close(self) -> None:
        """Wait for pending writes, then stop the writer thread."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "RolloutArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArchiveReader:
    """Lists the complete iterations of an archive and loads one as ``{key: np.ndarray}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"rollout archive not found: {self.path}")

    def iterations(self) -> list[int]:
        out = []
        for d in self.path.glob("iter_*"):
            if (d / _MANIFEST).exists():
                out.append(int(d.name.split("_", 1)[1]))
        return sorted(out)

    def manifest(self, iteration: int) -> dict:
        f = _iter_dir(self.path, iteration) / _MANIFEST
        if not f.exists():
            raise DataError(f"rollout archive {self.path}: iteration {iteration} is missing or incomplete")
        return json.loads(f.read_text())

    def keys(self, iteration: int) -> list[str]:
        return sorted(self.manifest(iteration)["arrays"])

    def load(self, iteration: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        import tensorstore as ts

        arrays = self.manifest(iteration)["arrays"]
        wanted = keys if keys is not None else sorted(arrays)
        out = {}
        for key in wanted:
            if key not in arrays:
                raise DataError(f"rollout archive {self.path}: iteration {iteration} has no key {key!r}")
            spec = {"driver": "zarr", "kvstore": {"driver": "file",
                                                  "path": str(_iter_dir(self.path, iteration) / key)}}
            out[key] = ts.open(spec).result().read().result()
        return out


def read_archive(path: str | Path) -> ArchiveReader:
    return ArchiveReader(path)
