"""Declarative parameter-name tables between this model and the formats users bring.

One row per parameter family: ``(ours, original_wan, diffusers)`` with ``{n}`` standing for the block index
and ``{p}`` for the parameter leaf (``weight``/``bias``). Self-Forcing/LongLive/MemFlow files hold original
Wan keys prefixed by ``model.``; that prefix is stripped before mapping.
"""
from __future__ import annotations

import re

from kvpo_megatron.errors import ConfigError

_LEAF = "{p}"
TABLE: list[tuple[str, str, str]] = [
    ("patch_embedding.{p}", "patch_embedding.{p}", "patch_embedding.{p}"),
    ("text_embedding.0.{p}", "text_embedding.0.{p}", "condition_embedder.text_embedder.linear_1.{p}"),
    ("text_embedding.2.{p}", "text_embedding.2.{p}", "condition_embedder.text_embedder.linear_2.{p}"),
    ("time_embedding.0.{p}", "time_embedding.0.{p}", "condition_embedder.time_embedder.linear_1.{p}"),
    ("time_embedding.2.{p}", "time_embedding.2.{p}", "condition_embedder.time_embedder.linear_2.{p}"),
    ("time_projection.1.{p}", "time_projection.1.{p}", "condition_embedder.time_proj.{p}"),
    ("head.head.{p}", "head.head.{p}", "proj_out.{p}"),
    ("head.modulation", "head.modulation", "scale_shift_table"),
    ("blocks.{n}.modulation", "blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("blocks.{n}.norm3.{p}", "blocks.{n}.norm3.{p}", "blocks.{n}.norm2.{p}"),
    ("blocks.{n}.ffn_fc1.{p}", "blocks.{n}.ffn.0.{p}", "blocks.{n}.ffn.net.0.proj.{p}"),
    ("blocks.{n}.ffn_fc2.{p}", "blocks.{n}.ffn.2.{p}", "blocks.{n}.ffn.net.2.{p}"),
]
for _ours, _diff in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    for _a, _b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"),
                   ("norm_k", "norm_k")):
        TABLE.append((f"blocks.{{n}}.{_ours}.{_a}.{{p}}", f"blocks.{{n}}.{_ours}.{_a}.{{p}}",
                      f"blocks.{{n}}.{_diff}.{_b}.{{p}}"))

def _regex(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx + "$")


class NameTable:
    """Name templates, one column per format; ``{n}`` is a block index, ``{p}`` a leaf (``weight``/``bias``).
    Every direction between the columns comes from the same rows."""

    def __init__(self, rows, formats: tuple[str, ...]):
        self.formats = {f: i for i, f in enumerate(formats)}
        self._compiled = {f: [(_regex(row[i]), row) for row in rows] for f, i in self.formats.items()}

    def rename(self, key: str, src: str, dst: str) -> str | None:
        """Map one key from format ``src`` to ``dst``; None if no row matches."""
        for rx, row in self._compiled[src]:
            m = rx.match(key)
            if m:
                out = row[self.formats[dst]]
                return out.replace("{n}", m.groupdict().get("n") or "").replace("{p}", m.groupdict().get("p") or "")
        return None


WAN_NAMES = NameTable(TABLE, ("ours", "wan", "diffusers"))


def rename(key: str, src: str, dst: str) -> str | None:
    """Map one key from format ``src`` to ``dst`` (``ours``/``wan``/``diffusers``); None if unknown."""
    return WAN_NAMES.rename(key, src, dst)


def convert_state_dict(sd: dict, src: str, dst: str, *, source_name: str = "state dict") -> dict:
    """Rename every key; unknown keys are an error that lists them and names the source."""
    out, unknown = {}, []
    for k, v in sd.items():
        nk = rename(k, src, dst)
        if nk is None:
            unknown.append(k)
        else:
            out[nk] = v
    if unknown:
        raise ConfigError(f"{source_name}: {len(unknown)} unknown key(s) for format {src!r}: {unknown[:20]}")
    return out


def strip_prefix(sd: dict, prefix: str = "model.") -> dict:
    """Self-Forcing/LongLive/MemFlow generator dicts prefix Wan keys with ``model.``."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
