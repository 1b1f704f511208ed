"""Readers and writers for the checkpoint files users bring and take away.

Every weights file users bring is read by one function, :func:`read_weights` (the converter's import through
:func:`read_source`, and ``checkpoint/loading.py``). Sources (``read_source``):

* ``wan``: original Wan2.1 — a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
  sharded ``*.safetensors`` + ``*.safetensors.index.json``), or one ``.safetensors``/``.pth`` file;
* ``diffusers``: a ``WanTransformer3DModel`` directory (or a pipeline directory with ``transformer/``);
* ``self-forcing`` / ``longlive`` / ``memflow``: a ``torch.save`` dict keyed ``generator`` (``generator_ema``
  with ``use_ema``) or ``model``, holding Wan keys prefixed by ``model.``.
* ``longlive2``: LongLive 2.0 (Wan2.2-TI2V-5B; NVlabs/LongLive main). The same dict layout, as written by
  ``trainer/distillation.py::save`` (``generator``, ``critic``, ``generator_ema`` (float32 EMA shadow, FSDP
  fragments cleaned), optimizer states, ``step``) and by ``scripts/merge_lora_generator.py`` (the released
  ``LongLive-2.0-5B/model_bf16.pt``: ``generator`` (bf16, LoRA merged) plus the strings ``checkpoint_format``
  ``"longlive_generator_merged_lora"``, ``model_name``, ``dtype``, ``source_*_ckpt`` and ``merged_lora``).
  Its LoRA (``lora_checkpoint.pt``: ``{generator_lora, critic_lora, step}``, peft keys over every linear of the
  blocks, rank 128 = alpha in ``configs/inference.yaml``) is read by ``adapter_formats.read_lora``. The NVFP4 releases
  (``checkpoint_format`` ``longlive_generator_nvfp4`` / ``longlive_generator_te_nvfp4``: quantized buffers) are
  refused: import the bf16 ``model_bf16.pt``.

Tensors are read lazily (``LazyTensor``): safetensors through ``safe_open`` slices, torch files through
``torch.load(mmap=True, weights_only=True)``, so a tensor-parallel rank reads only its slice. Untrusted
files are never unpickled with code (``weights_only=True``). A source's architecture (``config.json`` or
tensor shapes -> model section) is ``checkpoint/architecture.py``; LoRA files are ``checkpoint/adapter_formats.py``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpo_megatron.checkpoint.architecture import arch_to_section, config_json_to_arch, heads_from_presets, infer_arch
from kvpo_megatron.checkpoint.mappings import rename
from kvpo_megatron.errors import ConfigError

SOURCE_FORMATS = ("wan", "diffusers", "self-forcing", "longlive", "memflow", "longlive2")
TRAINING_FORMATS = ("self-forcing", "longlive", "memflow", "longlive2")
NVFP4_FORMATS = ("longlive_generator_nvfp4", "longlive_generator_te_nvfp4")
"""LongLive 2.0's quantized releases (``utils/nvfp4_checkpoint.py``), which hold no plain weights."""
WEIGHTS_NAME = "diffusion_pytorch_model"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# ------------------------------------------------------------------------------------------ lazy tensors
class LazyTensor:
    """Shape and dtype of a stored tensor; ``load`` reads all of it or one TP chunk along ``dim``."""

    def __init__(self, shape, dtype: torch.dtype, reader):
        self.shape, self.dtype, self._reader = tuple(shape), dtype, reader

    def load(self, dim: int | None = None, rank: int = 0, parts: int = 1) -> torch.Tensor:
        if dim is None or parts == 1:
            return self._reader(None)
        size = self.shape[dim] // parts
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(rank * size, (rank + 1) * size)
        return self._reader(tuple(index))

    @staticmethod
    def of(t: torch.Tensor) -> "LazyTensor":
        return LazyTensor(t.shape, t.dtype, lambda ix: (t if ix is None else t[ix]).contiguous())


def safetensors_error(path, e: Exception) -> ConfigError:
    """One line for a safetensors file that cannot be read (truncated, garbled, not safetensors)."""
    return ConfigError(f"cannot read {path} as safetensors (truncated or damaged?): {e}")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one ``.safetensors`` file; an unreadable file is one ``ConfigError`` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
        raise safetensors_error(path, e) from None


def _open_safetensors(path: Path) -> dict[str, LazyTensor]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = LazyTensor(sl.get_shape(), _ST_DTYPES.get(sl.get_dtype(), torch.float32),
                                    lambda ix, k=k: _read_safetensors(path, k, ix))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
        raise safetensors_error(path, e) from None
    return out


def _read_safetensors(path: Path, key: str, index) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key) if index is None else f.get_slice(key)[index].contiguous()


def torch_load(path: Path):
    """``torch.load(weights_only=True)``, memory-mapped when the file allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped; anything else is fatal
            raise ConfigError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
    except Exception as e:  # noqa: BLE001 - unpickling errors: report the file and the reason in one line
        raise ConfigError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e


def open_weights(path: Path) -> tuple[dict[str, LazyTensor], list[Path]]:
    """A weights file or directory -> lazy tensors (original keys) and the files read."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / ".metadata").is_file():  # torch DCP
            raise ConfigError(f"{path} is a megatron dist checkpoint directory (already imported): load it with "
                              "model.checkpoint, or convert it with tools/convert_checkpoint.py export")
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            return _open_sharded(index[0])
        files = [path / f"{WEIGHTS_NAME}.safetensors"] if (path / f"{WEIGHTS_NAME}.safetensors").exists() else \
            sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ConfigError(f"{path}: expected one {WEIGHTS_NAME}.safetensors or a *.safetensors.index.json, "
                              f"found {[f.name for f in files]}")
        path = files[0]
    if path.name.endswith(".index.json"):
        return _open_sharded(path)
    if path.suffix == ".safetensors":
        return _open_safetensors(path), [path]
    sd = torch_load(path)
    if not isinstance(sd, dict):
        raise ConfigError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return _lazy_dict(sd), [path]


def _lazy_dict(sd: dict) -> dict:
    return {k: (LazyTensor.of(v) if isinstance(v, torch.Tensor) else _lazy_dict(v) if isinstance(v, dict) else v)
            for k, v in sd.items()}


def _open_sharded(index: Path) -> tuple[dict[str, LazyTensor], list[Path]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (KeyError, json.JSONDecodeError) as e:
        raise ConfigError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
    out, files = {}, sorted({index.parent / f for f in weight_map.values()})
    for f in files:
        if not f.exists():
            raise ConfigError(f"{index}: shard {f.name} is missing")
        for k, t in _open_safetensors(f).items():
            if weight_map.get(k) == f.name:
                out[k] = t
    absent = sorted(set(weight_map) - set(out))
    if absent:
        raise ConfigError(f"{index}: keys listed in weight_map but absent from their shard: {absent[:20]}")
    return out, files


# ------------------------------------------------------------------------------------------ sources
@dataclass(kw_only=True)
class Source:
    """A checkpoint read for import: lazy tensors in our names and the model it describes."""

    tensors: dict[str, LazyTensor] = field(default_factory=dict)
    """Our parameter name -> lazy tensor."""
    section: dict = field(default_factory=dict)
    """``{'preset': name, 'overrides': {...}}`` (a ``ModelSection`` without the checkpoint)."""
    unknown: list[str] = field(default_factory=list)
    """Source keys with no counterpart in our model (an error at validation)."""
    files: list[Path] = field(default_factory=list)
    """Files read."""
    name: str = ""
    """What to call the source in messages (its path)."""


def clean_key(key: str) -> str:
    for frag in _WRAPPER_FRAGMENTS:
        key = key.replace(frag, "")
    return key[len("model."):] if key.startswith("model.") else key


def check_not_nvfp4(sd: dict, *, source_name: str) -> None:
    """LongLive 2.0's NVFP4 checkpoints (``model_te.pt``/``model_4o6.pt``) hold quantized buffers, not weights."""
    fmt = sd.get("checkpoint_format")
    gen = sd.get("generator")
    quantized = isinstance(gen, dict) and any(str(k).endswith("quantized_weight_values") for k in gen)
    if fmt in NVFP4_FORMATS or quantized:
        raise ConfigError(f"{source_name}: an NVFP4-quantized LongLive 2.0 checkpoint ({fmt or 'quantized buffers'}) "
                          "holds no plain weights; import the bf16 release (LongLive-2.0-5B/model_bf16.pt) or a "
                          "training checkpoint instead")


def unwrap_training_dict(sd: dict, *, use_ema: bool, source_name: str) -> dict:
    """Self-Forcing/LongLive/MemFlow: pick ``generator`` (or ``generator_ema``) or ``model``."""
    order = ("generator_ema",) if use_ema else ("generator", "model")
    for key in order:
        if isinstance(sd.get(key), dict):
            return sd[key]
    if not use_ema and sd and all(isinstance(v, (LazyTensor, torch.Tensor)) for v in sd.values()):
        return sd  # already a bare state dict
    raise ConfigError(f"{source_name}: expected a dict with {' or '.join(repr(k) for k in order)} holding the "
                      f"generator's weights; top-level keys are {sorted(sd)[:20]}")


@dataclass(kw_only=True)
class Weights:
    """A weights file or directory read lazily, in our names (:func:`read_weights`)."""

    tensors: dict[str, LazyTensor] = field(default_factory=dict)
    """Our parameter name -> lazy tensor."""
    unknown: list[str] = field(default_factory=list)
    """Keys with no name in the key format (always empty when the format was detected)."""
    files: list[Path] = field(default_factory=list)
    name: str = ""
    key_format: str = ""
    """The names found: ``ours``, ``wan`` (also Self-Forcing/LongLive/MemFlow) or ``diffusers``."""


def _rename_all(raw: dict, key_fmt: str) -> tuple[dict[str, LazyTensor], list[str]]:
    tensors, unknown = {}, []
    for k, t in raw.items():
        ours = rename(k if key_fmt == "diffusers" else clean_key(k), key_fmt, "ours")
        if ours is None:
            unknown.append(k)
        else:
            tensors[ours] = t
    return tensors, unknown


def read_weights(path: str | Path, *, fmt: str | None = None, use_ema: bool = False) -> Weights:
    """The one reader of users' weight files, shared by the converter's import and ``load_model_weights``.

    ``path``: one ``.safetensors`` / torch file (``weights_only``), a directory with one ``*.safetensors`` or
    sharded ``*.safetensors`` + ``*.safetensors.index.json``, or that index file. Training dicts (Self-Forcing,
    LongLive, MemFlow) are unwrapped by :func:`unwrap_training_dict`: ``generator`` (else ``model``), or
    ``generator_ema`` with ``use_ema``; wrapper fragments and the ``model.`` prefix are dropped.
    ``fmt``: a ``SOURCE_FORMATS`` name, or None to detect the key names (ours, Wan, diffusers) and to unwrap a
    nested (or ``use_ema``) dict; keys no format names are an error then.
    """
    if fmt is not None and fmt not in SOURCE_FORMATS:
        raise ConfigError(f"--from must be one of {list(SOURCE_FORMATS)}, got {fmt!r}")
    path = Path(path)
    if fmt == "diffusers" and (path / "transformer" / "config.json").exists():
        path = path / "transformer"  # a pipeline directory
    raw, files = open_weights(path)
    name = str(path)
    if fmt in TRAINING_FORMATS:
        check_not_nvfp4(raw, source_name=name)
    nested = [k for k, v in raw.items() if not isinstance(v, LazyTensor)]
    if fmt in TRAINING_FORMATS or (fmt is None and (nested or use_ema)):
        raw = unwrap_training_dict(raw, use_ema=use_ema, source_name=name)
        nested = [k for k, v in raw.items() if not isinstance(v, LazyTensor)]
    if nested:
        raise ConfigError(f"{name}: expected a flat dict of tensors, found non-tensor entries {nested[:10]}")
    if fmt is not None:
        key_fmt = "diffusers" if fmt == "diffusers" else "wan"
        tensors, unknown = _rename_all(raw, key_fmt)
        return Weights(tensors=tensors, unknown=unknown, files=files, name=name, key_format=key_fmt)
    for key_fmt in ("ours", "wan", "diffusers"):
        tensors, unknown = _rename_all(raw, key_fmt)
        if not unknown:
            return Weights(tensors=tensors, files=files, name=name, key_format=key_fmt)
    raise ConfigError(f"{name}: keys match neither our, Wan's nor diffusers' names, e.g. keys with no Wan name "
                      f"{_rename_all(raw, 'wan')[1][:5]}")


def read_source(fmt: str, path: str | Path, *, config_path: str | Path | None = None,
                use_ema: bool = False) -> Source:
    """Open a checkpoint of format ``fmt`` (see ``SOURCE_FORMATS``) lazily, in our names."""
    if fmt not in SOURCE_FORMATS:
        raise ConfigError(f"--from must be one of {list(SOURCE_FORMATS)}, got {fmt!r}")
    w = read_weights(path, fmt=fmt, use_ema=use_ema)
    path = Path(w.name)
    cfg_file = Path(config_path) if config_path else (path / "config.json" if path.is_dir() else None)
    if cfg_file is not None and cfg_file.exists():
        try:
            arch = config_json_to_arch(json.loads(cfg_file.read_text()), fmt, source_name=str(cfg_file))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: not valid JSON: {e}") from e
    elif config_path:
        raise ConfigError(f"config not found: {config_path}")
    else:
        arch = infer_arch({k: t.shape for k, t in w.tensors.items()}, source_name=w.name)
        arch["num_attention_heads"] = heads_from_presets(arch, source_name=w.name)
    return Source(tensors=w.tensors, section=arch_to_section(arch), unknown=w.unknown, files=w.files, name=w.name)


# ------------------------------------------------------------------------------------------ writers
def write_safetensors(sd: dict[str, torch.Tensor], out_dir: Path, *, base: str = WEIGHTS_NAME,
                      max_shard_bytes: int = 10 << 30, metadata: dict | None = None) -> list[Path]:
    """One ``<base>.safetensors``, or shards + ``<base>.safetensors.index.json`` (HF layout) when larger."""
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = sd[k].contiguous(), size + n
    shards.append(cur)
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        p = out_dir / f"{base}.safetensors"
        save_file(shards[0], str(p), metadata=meta)
        return [p]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        p = out_dir / f"{base}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(p), metadata=meta)
        files.append(p)
        weight_map.update({k: p.name for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = out_dir / f"{base}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files + [index]
