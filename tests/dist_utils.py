"""Spawn N gloo ranks running one worker function (each rank: one thread, megatron imported once).

Group many checks per spawn: every process pays megatron's ~5 s import.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")
    fn(rank, world, *args)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_workers(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes; re-raises a worker's exception.

    The rendezvous port is picked free and then bound by rank 0's store, so another process on the machine can
    take it in between (EADDRINUSE): that, and only that, is retried on a new port."""
    for attempt in range(3):
        try:
            mp.start_processes(_entry, args=(fn, world, _free_port(), args), nprocs=world, start_method="spawn")
            return
        except mp.ProcessRaisedException as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
