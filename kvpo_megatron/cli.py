"""Entry-point plumbing: ``--config FILE key=value ...`` parsing, logging, and one-line errors."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from kvpo_megatron.errors import ConfigError


def log_single_rank(logger: logging.Logger, level: int, msg: str, *args) -> None:
    """Log only on global rank 0."""
    if int(os.environ.get("RANK", "0")) == 0:
        logger.log(level, msg, *args)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S")
    import warnings
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


def parse_args(description: str, argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default=None, help="YAML config file (fields override the defaults)")
    ap.add_argument("--preset", default=None, help="named generator preset (self-forcing-1.3b | longlive-1.3b | "
                    "memflow-1.3b: the generator's own sampler and cache) applied under the YAML file and the overrides")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. video.num_frames=24")
    return ap.parse_args(argv)


def exit_code(fn: Callable[[], None]) -> int:
    """Run ``fn``: 0, or 2 with one ``error: ...`` line on stderr for bad input (``ConfigError``)."""
    try:
        fn()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run_main(fn: Callable[[], None]) -> None:
    """Run ``fn``; bad input becomes one clear line on stderr and exit code 2."""
    setup_logging()
    try:
        code = exit_code(fn)
        if code:
            sys.exit(code)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
