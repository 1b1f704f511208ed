"""Precomputed text embeddings in a chunked zarr store (tensorstore), so the umT5 encoder need not sit next to the DiT.

Layout of a store directory::

    meta.json      format, count, text_len, text_dim, dtype, sha256 of the prompt list, encoder description
    emb/           zarr [N, text_len, text_dim] (one chunk per prompt), padded positions zero
    lengths/       zarr [N] int64
    hashes/        zarr [N] int64, ``prompt_hash`` of prompt i (checked against the prompt file)
    done/          zarr [N] uint8, set after a prompt's embedding is written (resume skips done prompts)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from kvpo_megatron.data.prompts import DataError, prompt_hash, read_prompt_file, unique_prompts
from kvpo_megatron.dtypes import check_dtype_name

FORMAT = "kvpo-embedding-store"
VERSION = 1


def prompts_digest(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\x00")
    return h.hexdigest()


def _ts_dtype(name: str):
    import tensorstore as ts

    return {"float32": ts.float32, "bfloat16": ts.bfloat16, "float16": ts.float16}[name]


def _array(root: Path, name: str, *, create: bool = False, **kw):
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(root / name)}}
    return ts.open(spec, create=create, **kw).result()


class EmbeddingStore:
    """Read/write access to one store. Use :meth:`create_or_resume` to write, :meth:`open` to read."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.meta = meta
        self.count = int(meta["count"])
        self.text_len = int(meta["text_len"])
        self.text_dim = int(meta["text_dim"])
        self.emb = _array(path, "emb")
        self.lengths = _array(path, "lengths")
        self.hashes_arr = _array(path, "hashes")
        self.done = _array(path, "done")
        self.hashes = self.hashes_arr.read().result()
        self._index = {int(h): i for i, h in enumerate(self.hashes)}

    # ------------------------------------------------------------------ creation / resume
    @classmethod
    def create_or_resume(cls, path: str | Path, prompts: list[str], *, text_len: int, text_dim: int,
                         dtype: str = "bfloat16", encoder: str = "", overwrite: bool = False) -> "EmbeddingStore":
        """Create a store for ``prompts``, or reopen a partial one written for exactly these prompts."""
        import shutil

        check_dtype_name(dtype, "embedding store dtype")
        if len(set(prompts)) != len(prompts):
            raise DataError("embedding store prompts must be unique (use unique_prompts())")
        root = Path(path)
        meta = {"format": FORMAT, "version": VERSION, "count": len(prompts), "text_len": text_len,
                "text_dim": text_dim, "dtype": dtype, "prompts_sha256": prompts_digest(prompts), "encoder": encoder}
        if (root / "meta.json").exists() and overwrite:
            shutil.rmtree(root)
        if (root / "meta.json").exists():
            old = json.loads((root / "meta.json").read_text())
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            if diff:
                raise DataError(f"embedding store {root} exists but was written for something else "
                                f"({', '.join(f'{k}: {a!r} != {b!r}' for k, (a, b) in diff.items())}); "
                                f"pass --overwrite or choose another --out")
            return cls(root, old)
        root.mkdir(parents=True, exist_ok=True)
        n = len(prompts)
        _array(root, "emb", create=True, dtype=_ts_dtype(dtype), shape=[n, text_len, text_dim],
               chunk_layout=_chunks([1, text_len, text_dim]))
        _array(root, "lengths", create=True, dtype=_ts_dtype_np(np.int64), shape=[n],
               chunk_layout=_chunks([max(1, min(n, 65536))]))
        hashes = _array(root, "hashes", create=True, dtype=_ts_dtype_np(np.int64), shape=[n],
                        chunk_layout=_chunks([max(1, min(n, 65536))]))
        hashes.write(np.array([prompt_hash(p) for p in prompts], dtype=np.int64)).result()
        _array(root, "done", create=True, dtype=_ts_dtype_np(np.uint8), shape=[n],
               chunk_layout=_chunks([max(1, min(n, 65536))]))
        (root / "meta.json").write_text(json.dumps(meta, indent=1))
        return cls(root, meta)

    def missing(self) -> list[int]:
        """Indices whose embeddings are not written yet."""
        return np.flatnonzero(self.done.read().result() == 0).tolist()

    def write(self, start: int, emb: torch.Tensor, lengths: torch.Tensor) -> None:
        """Write rows ``start .. start + B`` (emb [B, text_len, text_dim], lengths [B]), then mark them done."""
        b = emb.shape[0]
        if tuple(emb.shape[1:]) != (self.text_len, self.text_dim):
            raise DataError(f"embedding store {self.path}: got rows of shape {tuple(emb.shape[1:])}, "
                            f"store holds {(self.text_len, self.text_dim)}")
        self.emb[start : start + b].write(_to_numpy(emb.float(), self.meta["dtype"])).result()
        self.lengths[start : start + b].write(lengths.cpu().numpy().astype(np.int64)).result()
        self.done[start : start + b].write(np.ones(b, dtype=np.uint8)).result()

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, path: str | Path, *, prompts_file: str | Path | None = None,
             prompts: list[str] | None = None) -> "EmbeddingStore":
        """Open a finished store; if a prompt file (or list) is given, its prompts must match the store's."""
        root = Path(path)
        if not (root / "meta.json").exists():
            raise DataError(f"embedding store not found: {root} (no meta.json); "
                            f"run tools/precompute_text_embeddings.py")
        meta = json.loads((root / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise DataError(f"{root}: not an embedding store (format={meta.get('format')!r})")
        store = cls(root, meta)
        todo = store.missing()
        if todo:
            raise DataError(f"embedding store {root} is incomplete: {len(todo)} of {store.count} prompts not encoded; "
                            f"rerun tools/precompute_text_embeddings.py to resume")
        if prompts_file is not None:
            prompts = unique_prompts(read_prompt_file(prompts_file))
        if prompts is not None:
            store.verify(prompts, source=str(prompts_file or "the given prompts"))
        return store

    def verify(self, prompts: list[str], *, source: str) -> None:
        """Raise DataError unless the store holds exactly ``prompts`` in order (hash check)."""
        if len(prompts) != self.count:
            raise DataError(f"embedding store {self.path} does not match {source}: hash mismatch "
                            f"(store has {self.count} prompts, file has {len(prompts)})")
        for i, p in enumerate(prompts):
            if prompt_hash(p) != int(self.hashes[i]):
                raise DataError(f"embedding store {self.path} does not match {source}: hash mismatch at prompt "
                                f"{i} ({p[:60]!r}); re-run tools/precompute_text_embeddings.py for this file")

    def lookup(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (emb [B, text_len, text_dim] float32, lengths [B] int64) for prompts held by the store."""
        idx = []
        for p in prompts:
            i = self._index.get(prompt_hash(p))
            if i is None:
                raise DataError(f"prompt not in embedding store {self.path}: {p[:80]!r}")
            idx.append(i)
        rows = self.emb.oindex[np.asarray(idx, dtype=np.int64)].read().result()
        lengths = self.lengths.oindex[np.asarray(idx, dtype=np.int64)].read().result()
        emb = torch.from_numpy(np.asarray(rows, dtype=np.float32))
        mask = torch.arange(self.text_len)[None, :] < torch.from_numpy(lengths)[:, None]
        return emb * mask[..., None], torch.from_numpy(lengths.astype(np.int64))


def _chunks(shape: list[int]):
    import tensorstore as ts

    return ts.ChunkLayout(chunk_shape=shape)


def _ts_dtype_np(np_dtype):
    import tensorstore as ts

    return ts.dtype(np.dtype(np_dtype).name)


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    arr = t.detach().cpu().numpy()
    if dtype == "bfloat16":
        import ml_dtypes

        return arr.astype(ml_dtypes.bfloat16)
    return arr.astype(dtype)
