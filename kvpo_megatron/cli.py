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
                    "memflow-1.3b | longlive2-5b: the generator's own sampler and cache) applied under the YAML file "
                    "and the overrides")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. video.num_frames=24")
    return ap.parse_args(argv)


RANK_ERROR_GRACE_S = 5.0
"""Under a launcher, a rank other than 0 waits this long before printing an error of its own (see ``exit_code``)."""


def _prints_error(rank: int) -> bool:
    """Whether this rank prints its error, so that under ``torchrun`` an error every rank hits is printed once.

    Rank 0 always does. Before the process group exists (config files, overrides: the same on every rank) another
    rank prints only if it is the first rank of its node (``LOCAL_RANK`` 0: a file missing on that node), after
    ``RANK_ERROR_GRACE_S``; afterwards any rank prints after that grace. When rank 0 failed too, the launcher has
    stopped the other ranks by then.
    """
    if rank == 0:
        return True
    import time

    import torch.distributed as dist

    # wait either way: exiting at once would let the launcher stop rank 0 before it prints the same error
    time.sleep(RANK_ERROR_GRACE_S)
    return (dist.is_available() and dist.is_initialized()) or int(os.environ.get("LOCAL_RANK", "0")) == 0


def exit_code(fn: Callable[[], None]) -> int:
    """Run ``fn``: 0, or 2 with one ``error: ...`` line on stderr for bad input (``ConfigError``); under a launcher
    once (``_prints_error``), prefixed ``[rank N]`` when another rank than 0 prints it."""
    try:
        fn()
    except ConfigError as e:
        rank = int(os.environ.get("RANK", "0"))
        if _prints_error(rank):
            print(f"error: {f'[rank {rank}] ' if rank else ''}{' '.join(str(e).split())}", file=sys.stderr)
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
