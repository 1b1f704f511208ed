"""Import users' checkpoints into model checkpoint directories and export them back (``tools/convert_checkpoint.py``).

Import, in order (nothing is written before step 5, so bad input leaves the output untouched):

1. open the source lazily in our names (``formats.read_source``) and the LoRA (``adapter_formats.read_lora``);
2. build the model described by the source on the meta device and compare: unknown, missing and
   mismatched-shape keys are one error naming the file; a TP that doesn't divide the heads is an error;
3. check the LoRA's modules and shapes against the model's linears;
4. log a summary (``--dry-run`` stops here);
5. write the dist checkpoint into a temporary sibling directory on TP*CP ranks (spawned gloo processes, or
   the ranks of an existing ``torchrun`` world), each reading only its slices, then rename it into place.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvpo_megatron.checkpoint import adapter_formats, architecture, formats, safe_dcp
from kvpo_megatron.checkpoint.adapter_formats import COMFYUI_FILE, AdapterFormat, write_comfyui, write_diffusers
from kvpo_megatron.checkpoint.dist import (INFO_FILE, LORA_PREFIX, MODEL_PREFIX, layout, load_full_tensors,
                                           lora_sharded_state_dict, model_sharded_state_dict, partition_dim, read_info,
                                           save_sharded, tensor_metadata)
from kvpo_megatron.checkpoint.mappings import rename
from kvpo_megatron.dtypes import SHORT_NAMES, flag_dtype
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.lora_tensors import BLOCK_LINEARS, merge_full
from kvpo_megatron.parallel.collectives import global_rank, group_size
from kvpo_megatron.parallel.layout import check_heads
from kvpo_megatron.parallel.state import ParallelConfig, init_distributed, init_parallel

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ImportSpec:
    """What ``import`` does (the CLI's arguments)."""

    fmt: str
    """Source format: wan | diffusers | self-forcing | longlive | memflow | longlive2."""
    src: str
    """Source file or directory."""
    out: str
    """Output directory (a model checkpoint directory)."""
    lora: str | None = None
    """LoRA file (LongLive/MemFlow ``lora.pt``, a peft state dict or adapter directory)."""
    lora_alpha: float | None = None
    """LoRA alpha (files don't store it; LongLive/MemFlow use alpha = rank, the default)."""
    config: str | None = None
    """A ``config.json`` overriding (or supplying) the source's architecture."""
    use_ema: bool = False
    """Self-Forcing/LongLive/MemFlow: import ``generator_ema`` instead of ``generator``."""
    tp: int = 1
    """Tensor-parallel shards to write."""
    cp: int = 1
    """Context-parallel size of the writing layout (CP replicates weights; any layout loads)."""
    dtype: str = "auto"
    """auto (the source's float dtype; fp32 if mixed) | bf16 | fp32."""
    dry_run: bool = False
    """Validate and summarise only."""
    force: bool = False
    """Replace an existing output directory."""
    progress: bool = True
    """tqdm progress bars."""
    extra_info: dict = field(default_factory=dict)
    """Merged into ``kvpo_checkpoint.json``."""


def meta_model(section: dict, *, tp: int = 1, cp: int = 1, pg_collection=None):
    """The model a section describes, on the meta device (names, shapes, TP attributes; no memory)."""
    from kvpo_megatron.model import CausalWanDiT, model_config  # megatron: only once the converter works (CLI)
    from kvpo_megatron.model.specs import local_spec  # megatron: only once the converter works (CLI)

    ov = dict(section["overrides"])
    cfg = model_config(section["preset"], tensor_model_parallel_size=tp, context_parallel_size=cp,
                       perform_initialization=False, **ov)
    with torch.device("meta"):  # CP does not change the weights: the local spec has the same parameters
        return CausalWanDiT(cfg, local_spec(), pg_collection=pg_collection)


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConfigError(f"output {out} exists; pass --force to replace it")


def validate_source(src: formats.Source, *, tp: int, cp: int) -> dict:
    """Step 2; returns the model's full parameter shapes."""
    for name, v in (("--tp", tp), ("--cp", cp)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    heads = architecture.section_arch(src.section)["num_attention_heads"]
    check_heads(heads, tp=tp, tp_name="--tp", heads_name=f"num_attention_heads of {src.name}")
    from kvpo_megatron.model import model_config  # megatron: only once the converter works (CLI)
    model_config(src.section["preset"], tensor_model_parallel_size=tp, context_parallel_size=cp,
                 **src.section["overrides"])  # any other field the layout must divide (ffn width) raises here
    model = meta_model(src.section)
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    got = {n: t.shape for n, t in src.tensors.items()}
    missing = sorted(set(want) - set(got))
    bad = [f"{n}: checkpoint {got[n]} vs model {want[n]}" for n in want if n in got and got[n] != want[n]]
    problems = [f"{what} ({len(keys)}): {keys[:20]}" for what, keys in
                (("unknown keys", src.unknown), ("missing keys", missing), ("mismatched shapes", bad)) if keys]
    if len(src.unknown) > len(src.tensors):
        problems.insert(0, f"{len(src.unknown)} of its {len(src.unknown) + len(src.tensors)} keys have no name in "
                           "the --from format (is --from right?)")
    if problems:
        files = [str(f) for f in src.files[:3] if str(f) != src.name]
        where = f" ({', '.join(files)})" if files else ""
        raise ConfigError(f"{src.name}{where} does not match a "
                          f"{src.section['preset']} model with {src.section['overrides']}: " + "; ".join(problems))
    return want


def check_lora(lora: adapter_formats.LoraWeights, shapes: dict) -> tuple[str, ...]:
    """LoRA modules must be block linears of the model with matching shapes, and cover every block's chosen
    leaves (our adapters are applied per leaf name in every block); returns the leaf names."""
    bad = []
    for mod, (a, b) in lora.pairs.items():
        w = shapes.get(mod + ".weight")
        if w is None or len(w) != 2 or mod.rsplit(".", 1)[-1] not in BLOCK_LINEARS:
            bad.append(f"{mod}: not a block linear")
        elif tuple(a.shape) != (lora.rank, w[1]) or tuple(b.shape) != (w[0], lora.rank):
            bad.append(f"{mod}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} vs weight {w}")
    if bad:
        raise ConfigError(f"{lora.name}: LoRA does not fit the model: {bad[:20]}")
    leaves = tuple(x for x in BLOCK_LINEARS if any(m.rsplit(".", 1)[-1] == x for m in lora.pairs))
    expect = {n[: -len(".weight")] for n in shapes if n.startswith("blocks.") and n.endswith(".weight")
              and n[: -len(".weight")].rsplit(".", 1)[-1] in leaves and len(shapes[n]) == 2}
    absent = sorted(expect - set(lora.pairs))
    if absent:
        raise ConfigError(f"{lora.name}: LoRA covers {leaves} in some blocks but not in {absent[:20]}; adapters apply to every "
                          "block's linears with those names")
    return leaves


def resolve_dtype(src: formats.Source, choice: str) -> torch.dtype:
    if choice != "auto":
        if choice not in SHORT_NAMES:
            raise ConfigError(f"--dtype must be auto|bf16|fp32, got {choice!r}")
        return flag_dtype(choice)
    dts = {t.dtype for t in src.tensors.values() if t.dtype.is_floating_point}
    return dts.pop() if len(dts) == 1 else torch.float32


def _info(spec: ImportSpec, src, lora, leaves, dtype, n_params) -> dict:
    info = {"format_version": 1, "model": src.section, "dtype": str(dtype).removeprefix("torch."),
            "parameters": n_params, "layout": {"tp": spec.tp, "cp": spec.cp},
            "source": {"format": spec.fmt, "path": str(spec.src), "lora": spec.lora, "use_ema": spec.use_ema},
            "lora": None}
    if lora is not None:
        info["lora"] = {"rank": lora.rank, "alpha": spec.lora_alpha or float(lora.rank), "target_modules": list(leaves),
                        "parameters": sum(a.numel() + b.numel() for a, b in lora.pairs.values())}
    return {**info, **spec.extra_info}


def import_checkpoint(spec: ImportSpec) -> dict:
    """Import ``spec.src`` (see module doc). Returns the checkpoint info (also in ``kvpo_checkpoint.json``)."""
    out = Path(spec.out)
    if not spec.dry_run:
        check_output(out, spec.force)
    src = formats.read_source(spec.fmt, spec.src, config_path=spec.config, use_ema=spec.use_ema)
    lora = adapter_formats.read_lora(spec.lora) if spec.lora else None
    shapes = validate_source(src, tp=spec.tp, cp=spec.cp)
    leaves = check_lora(lora, shapes) if lora is not None else ()
    dtype = resolve_dtype(src, spec.dtype)
    info = _info(spec, src, lora, leaves, dtype, sum(math.prod(s) for s in shapes.values()))
    log.info("import %s (%s): %s model %s, %d parameters, dtype %s, TP=%d CP=%d, LoRA %s", spec.src, spec.fmt,
             src.section["preset"], src.section["overrides"] or "", info["parameters"], info["dtype"], spec.tp,
             spec.cp, "none" if lora is None else f"r={lora.rank} alpha={info['lora']['alpha']} on "
             f"{len(lora.pairs)} linears ({info['lora']['parameters']} parameters)")
    if spec.dry_run:
        log.info("dry run: mapping of %d tensors validated; nothing written", len(shapes))
        return info
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _run_ranks(spec, src.section, str(tmp), str(dtype).removeprefix("torch."))
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        safe_dcp.write_manifest(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %d .distcp shards (%d files with the metadata and %s)", out,
             sum(f.endswith(".distcp") for f in files), len(files), INFO_FILE)
    return info


def replace_dir(tmp: Path, out: Path) -> None:
    """Atomic rename of a finished directory into place (an existing one is moved aside, then deleted)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ writing ranks
def _run_ranks(spec: ImportSpec, section: dict, tmp: str, dtype: str) -> None:
    """Run :func:`write_rank` on TP*CP ranks: this process when it's alone, else spawned gloo processes."""
    import torch.distributed as dist

    world = spec.tp * spec.cp
    args = (spec.fmt, spec.src, spec.config, spec.use_ema, spec.lora, section, spec.tp, spec.cp, tmp, dtype,
            spec.progress)
    if group_size(dist.group.WORLD) > 1:
        raise ConfigError("run the converter as one process: it spawns the --tp x --cp writing ranks itself")
    if world == 1:
        write_rank(*args)
        return
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(world, port, args), nprocs=world, start_method="spawn")


def _spawned(rank: int, world: int, port: int, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")  # megatron's import-time notices, once per spawned rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        write_rank(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def write_rank(fmt, src_path, config, use_ema, lora_path, section, tp, cp, tmp, dtype, progress) -> None:
    """One rank's part of the import: read this rank's slices of every tensor and save them (collective)."""
    from tqdm import tqdm

    if tp * cp == 1:  # this process, alone: no megatron groups needed (and a caller's stay untouched)
        init_distributed()
        pgs = None
    else:
        pgs = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp))
    model = meta_model(section, tp=tp, cp=cp, pg_collection=pgs)
    src = formats.read_source(fmt, src_path, config_path=config, use_ema=use_ema)
    tp_rank = layout(pgs)[0]
    dt = getattr(torch, dtype)
    tensors = {}
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    for n in tqdm(names, desc=f"reading {Path(src_path).name}", disable=not progress or global_rank() != 0,
                  unit="tensor"):
        tensors[n] = src.tensors[n].load(partition_dim(params[n]), tp_rank, tp).to(dt)
    sd = model_sharded_state_dict(model, tensors=tensors, key_fn=lambda n: MODEL_PREFIX + n)
    if lora_path:
        lora = adapter_formats.read_lora(lora_path)
        sd.update(lora_sharded_state_dict({f"{m}.lora_{h}.weight": t.float().contiguous()
                                           for m, (a, b) in lora.pairs.items() for h, t in (("A", a), ("B", b))}))
    save_sharded(sd, tmp)


# ------------------------------------------------------------------------------------------ export
def _single_process() -> None:
    """Exports run in one process (a 1-rank world is started if none exists)."""
    import torch.distributed as dist

    if group_size(dist.group.WORLD) > 1:
        raise ConfigError("export runs as one process, not under a multi-rank launcher")
    init_distributed()


def open_model_dir(path: Path) -> tuple[dict | None, dict]:
    """(info, tensor metadata) of a model checkpoint directory to export, checked first: it must be a model
    directory (not a training checkpoint), readable without running code, with intact files."""
    if path.is_dir() and not (path / safe_dcp.MEGATRON_META).exists() and any(
            p.name.startswith("iter_") for p in path.iterdir()):
        raise ConfigError(f"{path} is a directory of training checkpoints, not a model checkpoint directory; "
                          "a run's LoRA is in its train.out_dir/final_adapter (a peft adapter); export one "
                          "iter_NNNNNNN's LoRA with --lora-only [--weights raw|ema]")
    meta = tensor_metadata(path)
    if (path / "complete.json").exists() or any(k.startswith("optimizer.") for k in meta):
        raise ConfigError(f"{path} is a training checkpoint (trainable LoRA + optimizer state, no base weights), not "
                          "a model checkpoint directory; a run's LoRA is in its train.out_dir/final_adapter, or "
                          "export this checkpoint's with --lora-only [--weights raw|ema]")
    safe_dcp.verify_manifest(path, required=False)
    return read_info(path), meta


def _section_of(path: Path, info: dict | None, shapes: dict) -> dict:
    if info and info.get("model"):
        return info["model"]
    arch = architecture.infer_arch(shapes, source_name=str(path))
    arch["num_attention_heads"] = architecture.heads_from_presets(arch, source_name=str(path))
    return architecture.arch_to_section(arch)


def export_checkpoint(path: str | Path, out: str | Path, *, to: str, merge_lora: bool = False,
                      dtype: str = "keep", force: bool = False, max_shard_bytes: int = 10 << 30,
                      progress: bool = True) -> list[Path]:
    """A model checkpoint directory -> diffusers or Wan safetensors + ``config.json`` in ``out``."""
    from tqdm import tqdm

    if to not in ("diffusers", "wan"):
        raise ConfigError(f"--to must be diffusers or wan, got {to!r}")
    path, out = Path(path), Path(out)
    check_output(out, force)
    _single_process()
    info, meta = open_model_dir(path)
    base = load_full_tensors(path, prefix=MODEL_PREFIX, meta=meta)
    section = _section_of(path, info, {k: tuple(v.shape) for k, v in base.items()})
    has_lora = any(k.startswith(LORA_PREFIX) for k in meta)
    if has_lora:
        if merge_lora:
            lcfg = (info or {}).get("lora") or {}
            if not lcfg:
                raise ConfigError(f"{path}: holds a LoRA but {INFO_FILE} has no 'lora' entry (rank, alpha)")
            base = merge_full(base, load_full_tensors(path, prefix=LORA_PREFIX, meta=meta),
                              float(lcfg["alpha"]) / int(lcfg["rank"]))
        else:
            log.warning("%s holds a LoRA that this export leaves out (use --merge-lora, or --lora-only)", path)
    elif merge_lora:
        raise ConfigError(f"--merge-lora: {path} holds no LoRA")
    if dtype != "keep" and dtype not in SHORT_NAMES:
        raise ConfigError(f"--dtype must be keep|bf16|fp32, got {dtype!r}")
    unnamed = [k for k in base if rename(k, "ours", to) is None]
    if unnamed:
        raise ConfigError(f"{path}: keys with no {to} name: {unnamed[:20]}")
    sd = {rename(k, "ours", to): v if dtype == "keep" else v.to(flag_dtype(dtype))
          for k, v in tqdm(base.items(), desc=f"export to {to}", unit="tensor", disable=not progress)}
    cfg = architecture.diffusers_config_json(section) if to == "diffusers" else architecture.wan_config_json(section)
    log.info("export %s -> %s (%s): %d parameters, dtype %s, LoRA %s", path, out, to,
             sum(v.numel() for v in sd.values()), sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()}),
             "merged" if merge_lora else "left out" if has_lora else "none")
    return _write_dir(out, force, lambda tmp: [*formats.write_safetensors(sd, tmp, max_shard_bytes=max_shard_bytes),
                                               _write_json(tmp / "config.json", cfg)])


def _write_json(p: Path, obj) -> Path:
    p.write_text(json.dumps(obj, indent=2))
    return p


def _write_dir(out: Path, force: bool, write) -> list[Path]:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        names = [p.name for p in write(tmp)]
        check_output(out, force)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s: %s", out, ", ".join(names))
    return [out / n for n in names]


def export_lora(path: str | Path, out: str | Path, *, fmt: str = "comfyui", names: str = "ours",
                force: bool = False, weights: str = "raw") -> list[Path]:
    """The checkpoint's LoRA as an adapter other tools load (``checkpoint/adapter_formats.py``).

    ``path``: a model checkpoint directory (from import) or a training checkpoint (``iter_NNNNNNN``), whose
    ``weights`` are ``raw`` or ``ema`` (``checkpoint/training_adapter.py``). ``fmt``: ``comfyui`` (default;
    ``lora.safetensors`` that ComfyUI and diffusers' ``WanPipeline.load_lora_weights`` load), ``diffusers``
    (``pytorch_lora_weights.safetensors``), or ``peft`` (``adapter_config.json`` + ``adapter_model.safetensors``);
    ``names`` (peft only): ``ours`` (loads with ``lora.load_adapter``) or ``wan`` (original module names, e.g.
    ``ffn.0``, as LongLive/MemFlow's peft models name them).
    """
    from safetensors.torch import save_file

    from kvpo_megatron.checkpoint import training_adapter as ta  # peft + megatron: only once it works (CLI)
    from kvpo_megatron.lora import PEFT_PREFIX, WEIGHTS_FILE, LoRAConfig, peft_lora_config  # (the same)

    try:
        fmt = AdapterFormat(fmt)
    except ValueError:
        raise ConfigError(f"--lora-format must be one of {[f.value for f in AdapterFormat]}, got {fmt!r}") from None
    if names not in ("ours", "wan"):
        raise ConfigError(f"--lora-names must be ours or wan, got {names!r}")
    if names != "ours" and fmt != AdapterFormat.peft:
        raise ConfigError("--lora-names applies to --lora-format peft only (comfyui uses Wan names, diffusers its own)")
    if weights not in ("raw", "ema"):
        raise ConfigError(f"--weights must be raw or ema, got {weights!r}")
    path, out = Path(path), Path(out)
    check_output(out, force)
    _single_process()
    if ta.is_training_checkpoint(path):
        lcfg = ta.training_config(path).get("lora") or {}
        full = ta.read_training_adapter(path, weights)
    else:
        if weights != "raw":
            raise ConfigError(f"--weights {weights}: {path} is not a training checkpoint (only those hold EMA)")
        info, meta = open_model_dir(path)
        info = info or {}
        if not any(k.startswith(LORA_PREFIX) for k in meta) or not info.get("lora"):
            raise ConfigError(f"--lora-only: {path} holds no LoRA")
        lcfg = info["lora"]
        full = load_full_tensors(path, prefix=LORA_PREFIX, meta=meta)
    cfg = LoRAConfig(rank=int(lcfg["rank"]), alpha=float(lcfg["alpha"]), target_modules=tuple(lcfg["target_modules"]))
    if fmt == AdapterFormat.comfyui:
        return _write_dir(out, force, lambda tmp: [write_comfyui(full, cfg.alpha, tmp / COMFYUI_FILE)])
    if fmt == AdapterFormat.diffusers:
        return _write_dir(out, force, lambda tmp: [write_diffusers(full, cfg, tmp)])
    pcfg = peft_lora_config(cfg)
    if names == "wan":
        conv = {}
        for k, v in full.items():
            mod, half = k.rsplit(".lora_", 1)
            conv[f"{rename(mod + '.weight', 'ours', 'wan')[: -len('.weight')]}.lora_{half}"] = v
        full = conv
        leaves = "|".join(rename(f"blocks.0.{t}.weight", "ours", "wan").split(".", 2)[2][: -len(".weight")]
                          .replace(".", r"\.") if t.startswith("ffn") else t for t in cfg.target_modules)
        pcfg.target_modules = rf"blocks\.\d+\.(?:\w+\.)*(?:{leaves})"

    def write(tmp: Path) -> list[Path]:
        pcfg.save_pretrained(str(tmp))
        save_file({PEFT_PREFIX + k: v.contiguous() for k, v in full.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        return [tmp / "adapter_config.json", tmp / WEIGHTS_FILE]

    return _write_dir(out, force, write)
