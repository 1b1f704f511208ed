"""One rank's RNG states (torch CPU + CUDA, python ``random``, numpy, megatron's CUDA RNG tracker) as JSON.

Byte-tensor states are stored as base64 strings, so a training checkpoint's RNG file is data only.
"""
from __future__ import annotations

import base64
import random

import numpy as np
import torch


def _enc(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).decode("ascii")


def _dec(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s.encode("ascii"), validate=True)), dtype=torch.uint8)


def rng_state() -> dict:
    """This rank's RNG states as JSON-serialisable values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": _enc(torch.get_rng_state()), "python": [version, list(internal), gauss_next],
             "numpy": {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)},
             "cuda": [_enc(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
             "tracker": None}
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        state["tracker"] = {k: _enc(v) for k, v in get_cuda_rng_tracker().get_states().items()}
    except Exception:  # noqa: BLE001 - megatron's tracker is optional state
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (after a JSON round trip)."""
    torch.set_rng_state(_dec(state["torch"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_dec(s) for s in state["cuda"]])
    if state.get("tracker"):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        get_cuda_rng_tracker().set_states({k: _dec(v) for k, v in state["tracker"].items()})
