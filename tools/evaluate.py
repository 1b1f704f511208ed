#!/usr/bin/env python
"""Evaluate checkpoints against the base model on held-out prompts and write a report people look at.

    python tools/evaluate.py runs/kvpo_tiny/ckpt --out runs/kvpo_tiny/eval            # every checkpoint there
    python tools/evaluate.py CKPT/iter_0000030 runs/x/final_adapter_ema --out EVAL eval.weights=ema
    torchrun --nproc_per_node 8 tools/evaluate.py CKPT... --out EVAL --config my_train.yaml   # DP over prompts

Arguments: training checkpoints (``iter_NNNNNNN``; raw LoRA and/or EMA per ``eval.weights``), directories of
them, or peft adapter directories; plus dotted overrides. ``eval.*`` overrides set the evaluation
(``kvpo_megatron/evaluation/config.py``: ``eval.short.prompts``, ``eval.long.num_frames``, ``eval.weights``,
``eval.base``, ``eval.seed`` ...); other overrides set the training configuration, which is ``--config`` /
``--preset`` when given, else the first training checkpoint's saved config, else the embedded tiny default.

Two settings: ``short`` (single prompt, the training length) and ``long`` (multi-prompt with switches, twice
the length by default). Every reward component is scored per prompt segment. Output in ``--out``:
``report.html`` (summary table, per-component bar charts across variants, a side-by-side video grid per prompt),
``results.csv`` / ``summary.csv`` / ``results.json``, ``videos/<setting>/*.mp4`` (+ poster PNGs) and
``scores/<setting>/*.json``. Finished videos are skipped when the command is run again (resumable).
"""
from __future__ import annotations

import argparse
import sys

from kvpo_megatron.cli import run_main


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("items", nargs="*", help="checkpoints / adapter directories, and key=value overrides")
    ap.add_argument("--out", required=True, help="output directory (reused: finished videos are skipped)")
    ap.add_argument("--config", default=None, help="training YAML config (model, sampler, reward, ...)")
    ap.add_argument("--preset", default=None, help="named generator preset under --config")
    return ap


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    from kvpo_megatron.evaluation import load_eval_configs, run_evaluation

    a = parser().parse_intermixed_args(argv)
    overrides = [x for x in a.items if "=" in x and not Path(x).exists()]
    paths = [x for x in a.items if x not in overrides]
    train_cfg, eval_cfg = load_eval_configs(paths, config=a.config, preset=a.preset, overrides=overrides)
    run_evaluation(paths, train_cfg, eval_cfg, a.out)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
