"""Shared test fixtures: single-process megatron parallel state (TP=CP=1) over gloo, fixed seeds."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine, not in CI)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="GPU test: run on the GPU machine"))


@pytest.fixture(scope="session")
def pgs():
    """Megatron process groups of a 1-rank world (TP=CP=DP=1)."""
    from kvpo_megatron.parallel.state import ParallelConfig, init_parallel

    return init_parallel(ParallelConfig())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
