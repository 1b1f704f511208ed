#!/usr/bin/env python
"""Import users' Wan / diffusers / Self-Forcing / LongLive (1.3B, 2.0-5B) / MemFlow checkpoints as megatron dist
checkpoints, and export them back to diffusers or original Wan files (or a peft LoRA adapter).

  python tools/convert_checkpoint.py import --from {wan,diffusers,self-forcing,longlive,memflow,longlive2} SRC
        [--lora LORA.pt [--lora-alpha A]] [--config config.json] [--use-ema] --out DIR
        [--tp N --cp N] [--dtype auto|bf16|fp32] [--dry-run] [--force]
  python tools/convert_checkpoint.py export DIR --to {diffusers,wan} OUT [--merge-lora] [--dtype keep|bf16|fp32]
  python tools/convert_checkpoint.py export DIR --lora-only OUT [--lora-format comfyui|diffusers|peft]
        [--lora-names ours|wan] [--weights raw|ema]
        # comfyui (default): OUT/lora.safetensors for ComfyUI and diffusers' Wan loader; DIR may be a training
        # checkpoint (iter_NNNNNNN), whose LoRA --weights raw or its EMA (ema) is exported

The imported directory loads at any TP/CP with ``kvpo_megatron.checkpoint.loading.load_model_weights`` (set
``model.checkpoint: DIR``); its ``kvpo_checkpoint.json`` holds the model preset/overrides and the LoRA config.
Outputs are written to a temporary sibling directory and renamed into place; an existing output is never
replaced without ``--force``. Source files are read with safetensors or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

from kvpo_megatron.checkpoint.convert import ImportSpec, export_checkpoint, export_lora, import_checkpoint
from kvpo_megatron.checkpoint.formats import SOURCE_FORMATS
from kvpo_megatron.cli import exit_code
from kvpo_megatron.errors import ConfigError



def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="users' checkpoint -> megatron dist checkpoint directory")
    imp.add_argument("src", help="source file or directory")
    imp.add_argument("--from", dest="fmt", required=True, choices=SOURCE_FORMATS)
    imp.add_argument("--out", required=True, help="output directory")
    imp.add_argument("--lora", help="LoRA file: lora.pt ({generator_lora,...} or a peft state dict) or adapter dir")
    imp.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, as LongLive/MemFlow use)")
    imp.add_argument("--config", help="config.json giving the architecture (default: SRC/config.json or shapes)")
    imp.add_argument("--use-ema", action="store_true", help="take generator_ema from training files")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel shards to write (any TP loads it)")
    imp.add_argument("--cp", type=int, default=1, help="context-parallel size of the writing layout")
    imp.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    imp.add_argument("--dry-run", action="store_true", help="validate the mapping, write nothing")
    imp.add_argument("--force", action="store_true", help="replace an existing output directory")
    imp.add_argument("--no-progress", action="store_true")
    exp = sub.add_parser("export", help="dist checkpoint directory -> diffusers / Wan files or a peft adapter")
    exp.add_argument("src", help="model checkpoint directory (from import); with --lora-only also a training "
                     "checkpoint (iter_NNNNNNN)")
    exp.add_argument("out", help="output directory")
    what = exp.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", choices=("diffusers", "wan"))
    what.add_argument("--lora-only", action="store_true", help="write the LoRA alone as an adapter (--lora-format)")
    exp.add_argument("--merge-lora", action="store_true", help="fold alpha/r * B A into the exported weights")
    exp.add_argument("--lora-format", default="comfyui", choices=("comfyui", "diffusers", "peft"),
                     help="--lora-only file: comfyui (Wan names + alpha: ComfyUI, diffusers' WanPipeline."
                          "load_lora_weights), diffusers (pytorch_lora_weights.safetensors) or peft")
    exp.add_argument("--lora-names", default="ours", choices=("ours", "wan"),
                     help="module names of --lora-format peft")
    exp.add_argument("--weights", default="raw", choices=("raw", "ema"),
                     help="--lora-only from a training checkpoint: the trained LoRA or its EMA")
    exp.add_argument("--dtype", default="keep", choices=("keep", "bf16", "fp32"))
    exp.add_argument("--force", action="store_true", help="replace an existing output directory")
    return ap


def run(argv: list[str] | None = None) -> None:
    """Parse and run; raises ``ConfigError`` on bad input."""
    a = parser().parse_args(argv)
    if a.command == "import":
        import_checkpoint(ImportSpec(fmt=a.fmt, src=a.src, out=a.out, lora=a.lora, lora_alpha=a.lora_alpha,
                                     config=a.config, use_ema=a.use_ema, tp=a.tp, cp=a.cp, dtype=a.dtype,
                                     dry_run=a.dry_run, force=a.force, progress=not a.no_progress))
    elif a.lora_only:
        if a.merge_lora:
            raise ConfigError("--merge-lora and --lora-only exclude each other")
        export_lora(a.src, a.out, fmt=a.lora_format, names=a.lora_names, force=a.force, weights=a.weights)
    else:
        if a.weights != "raw":
            raise ConfigError("--weights applies to --lora-only exports")
        export_checkpoint(a.src, a.out, to=a.to, merge_lora=a.merge_lora, dtype=a.dtype, force=a.force)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|torch\.distributed)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    return exit_code(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
