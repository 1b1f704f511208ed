"""Arithmetic of a parallel layout, without process groups: the CP attention kind and the one check that a layout
divides the attention heads (the model config, the launcher's layout check, the CP attention cores and the
checkpoint converter all call :func:`check_heads`)."""
from __future__ import annotations

from enum import StrEnum

from kvpo_megatron.errors import ConfigError


class CPAttention(StrEnum):
    """Cached self-attention under context parallelism (``parallel/cp_attention.py``)."""

    auto = "auto"  # ulysses when the heads divide by TP*CP, else allgather
    ulysses = "ulysses"  # all-to-all to head-sharded full sequences
    allgather = "allgather"  # K/V all-gather over CP (no head constraint)


def cp_attention_of(value, field: str = "parallel.cp_attention") -> CPAttention:
    """``value`` as a :class:`CPAttention`; an unknown name is a ``ConfigError`` naming ``field``."""
    try:
        return CPAttention(value)
    except ValueError:
        raise ConfigError(f"{field} must be {'|'.join(k.value for k in CPAttention)}, got {value!r}") from None


def check_heads(num_heads: int, *, tp: int, cp: int = 1, cp_attention: CPAttention | str = CPAttention.auto,
                tp_name: str = "tensor_model_parallel_size", heads_name: str = "num_attention_heads") -> CPAttention:
    """TP shards the heads (``num_heads % tp == 0``); Ulysses shards them over TP*CP, so ``cp_attention=ulysses``
    needs ``num_heads % (tp * cp) == 0`` and ``auto`` picks it only then (else ``allgather``). Returns the resolved
    kind (``auto`` never); ``tp_name``/``heads_name`` name the two numbers in the error (config fields, a CLI flag)."""
    if num_heads % tp:
        raise ConfigError(f"{heads_name} ({num_heads}) is not divisible by {tp_name} ({tp})")
    kind, mp = cp_attention_of(cp_attention), tp * cp
    if kind == CPAttention.auto:
        return CPAttention.ulysses if num_heads % mp == 0 else CPAttention.allgather
    if kind == CPAttention.ulysses and num_heads % mp:
        raise ConfigError(f"cp_attention=ulysses needs num_attention_heads ({num_heads}) divisible by TP*CP ({mp}); "
                          "use cp_attention=allgather or auto")
    return kind
