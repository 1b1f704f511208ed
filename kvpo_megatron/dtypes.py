"""Floating-point dtype names, the package's one map: configs name torch's dtypes (``bfloat16``), the tools'
``--dtype`` flags the short names (``bf16``)."""
from __future__ import annotations

import torch

from kvpo_megatron.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Config names (torch's) of the dtypes a config may choose."""
SHORT_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""``--dtype`` flag -> config name."""


def check_dtype_name(name, field: str) -> str:
    """``name`` when it is one of :data:`DTYPES`, else a ``ConfigError`` naming ``field``."""
    if name not in DTYPES:
        raise ConfigError(f"{field}={name!r}: expected one of {sorted(DTYPES)}")
    return name


def torch_dtype(name: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    """The torch dtype of a config name (a torch dtype passes through)."""
    return name if isinstance(name, torch.dtype) else DTYPES[check_dtype_name(name, field)]


def flag_dtype(flag: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` flag (``bf16`` | ``fp16`` | ``fp32``)."""
    return DTYPES[SHORT_NAMES[flag]]
