"""Prompt data: plain-text or JSONL multi-prompt files, and a sharded, seeded, resumable loader.

Plain text: one prompt per line. In both formats blank lines and lines starting with ``#`` are skipped.
The format follows the name: ``.txt`` is plain text (even a prompt starting with ``{``), ``.jsonl``/``.json`` is
JSONL; any other name is JSONL when its first prompt line starts with ``{``. Files must be UTF-8.

JSONL: one object per line, for long multi-prompt videos (VidProM-style extended prompts)::

    {"prompts": ["a cat wakes up", "the cat stretches", "...", "..."], "switch_frames": [147, 294, 441]}
    {"prompts": ["a single prompt"]}            # or {"prompt": "a single prompt"}

``switch_frames`` are *latent*-frame indices where each later prompt starts (one fewer than prompts). When a
line has none, they come from the dataset's ``switch_interval`` (``k * interval``), else the video is split
evenly. With ``num_segments`` set, every line must have at least that many prompts (extra ones are dropped).
The paper's long setting is ``num_segments=4, switch_interval=147`` (147 latent frames = 588 video frames).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvpo_megatron.errors import ConfigError

logger = logging.getLogger(__name__)


def prompt_hash(prompt: str) -> int:
    """Stable 63-bit hash of a prompt's text (sha256), used for seeds and embedding-store lookups."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little") >> 1


class DataError(ConfigError):
    """A prompt file, embedding store or archive is malformed; the message names the file (and line)."""


@dataclass(kw_only=True, slots=True)
class PromptSample:
    prompts: list[str]
    """One prompt per segment (a single prompt for short videos)."""
    switch_frames: list[int] = field(default_factory=list)
    """Latent-frame index where each later prompt starts; ``len(prompts) - 1`` entries, increasing."""
    index: int = 0
    """Position of the sample in the dataset (line order)."""

    def segments(self, num_frames: int) -> list[tuple[int, int]]:
        """Latent-frame spans ``[start, end)`` of each prompt."""
        bounds = [0, *self.switch_frames, num_frames]
        return list(zip(bounds[:-1], bounds[1:]))


@dataclass(kw_only=True, slots=True)
class PromptRecord:
    """One parsed line before dataset-level segment rules are applied."""

    prompts: list[str]
    switch_frames: list[int] | None
    line: int


def read_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Parse a ``.txt`` (one prompt per line) or ``.jsonl`` prompt file; clear errors name file and line."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"prompt file not found: {p}")
    if not p.is_file():
        raise DataError(f"prompt file {p} is a directory, not a file" if p.is_dir() else f"prompt file {p} is not "
                        "a regular file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"prompt file {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at line {line})") from None
    # .txt is text and .jsonl/.json is JSON, whatever a line starts with; other names: JSON if the first prompt is
    is_jsonl = p.suffix in (".jsonl", ".json") or (p.suffix != ".txt" and next(
        (ln.lstrip().startswith("{") for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), False))
    records: list[PromptRecord] = []
    for lineno, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        records.append(_parse_json_line(p, lineno, text) if is_jsonl else PromptRecord(
            prompts=[text], switch_frames=None, line=lineno))
    if not records:
        raise DataError(f"prompt file {p} is empty (no prompts)")
    return records


def _parse_json_line(path: Path, lineno: int, text: str) -> PromptRecord:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: bad JSON line ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompts', got {type(obj).__name__}")
    prompts = obj.get("prompts", [obj["prompt"]] if "prompt" in obj else None)
    if not isinstance(prompts, list) or not prompts or not all(isinstance(s, str) and s.strip() for s in prompts):
        raise DataError(f"{where}: 'prompts' must be a non-empty list of non-empty strings")
    switches = obj.get("switch_frames")
    if switches is not None and (not isinstance(switches, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in switches)):
        raise DataError(f"{where}: 'switch_frames' must be a list of integers")
    return PromptRecord(prompts=[s.strip() for s in prompts], switch_frames=switches, line=lineno)


def unique_prompts(records: list[PromptRecord]) -> list[str]:
    """Every distinct prompt text in file order (what an embedding store holds)."""
    return list(dict.fromkeys(s for r in records for s in r.prompts))


class PromptDataset:
    """Prompt samples of one file, with segment switch frames validated against ``num_frames`` latent frames."""

    def __init__(self, path: str | Path, *, num_frames: int, num_segments: int | None = None,
                 switch_interval: int | None = None) -> None:
        if num_frames < 1:
            raise DataError(f"num_frames={num_frames}: must be >= 1 latent frame")
        if num_segments is not None and num_segments < 1:
            raise DataError(f"num_segments={num_segments}: must be >= 1")
        if switch_interval is not None and switch_interval < 1:
            raise DataError(f"switch_interval={switch_interval}: must be >= 1")
        self.path = Path(path)
        self.num_frames = num_frames
        self.num_segments = num_segments
        self.switch_interval = switch_interval
        self.records = read_prompt_file(self.path)
        self.samples = [self._sample(i, r) for i, r in enumerate(self.records)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> PromptSample:
        return self.samples[i]

    def unique_prompts(self) -> list[str]:
        return unique_prompts(self.records)

    def _sample(self, index: int, rec: PromptRecord) -> PromptSample:
        where = f"{self.path}:{rec.line}"
        prompts = rec.prompts
        if self.num_segments is not None:
            if len(prompts) < self.num_segments:
                raise DataError(f"{where}: too few segments: {len(prompts)} prompt(s), num_segments="
                                f"{self.num_segments}" + ("" if self.path.suffix in (".jsonl", ".json") else
                                                          " (a plain-text file has one prompt per line; use JSONL)"))
            prompts = prompts[: self.num_segments]
        n = len(prompts)
        if rec.switch_frames is not None:
            given = rec.switch_frames
            if len(given) < n - 1 or (self.num_segments is None and len(given) != n - 1):
                raise DataError(f"{where}: {len(given)} switch_frames for {n} prompts (need {n - 1})")
            switches = list(given[: n - 1])
        elif self.switch_interval is not None:
            switches = [k * self.switch_interval for k in range(1, n)]
        else:
            switches = [k * self.num_frames // n for k in range(1, n)]
        for k, s in enumerate(switches):
            if s >= self.num_frames:
                raise DataError(f"{where}: switch index {s} (segment {k + 2}) is beyond the video: "
                                f"num_frames={self.num_frames} latent frames")
            if s <= (switches[k - 1] if k else 0):
                raise DataError(f"{where}: switch_frames {switches} must be increasing and > 0")
        return PromptSample(prompts=prompts, switch_frames=switches, index=index)


class PromptLoader:
    """Deterministic, sharded, resumable iteration over a ``PromptDataset``.

    The global order is a concatenation of per-epoch permutations (``seed``, epoch). Each ``next()`` consumes
    ``dp_size * prompts_per_rank`` consecutive positions of that order; rank ``r`` takes the ``r``-th slice, so
    ranks never share a prompt within an epoch. The cursor is a global position, so a run can resume with a
    different ``dp_size``.
    """

    def __init__(self, dataset: PromptDataset, *, dp_rank: int, dp_size: int, seed: int,
                 prompts_per_rank: int = 1, shuffle: bool = True) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        if prompts_per_rank < 1:
            raise DataError(f"prompts_per_rank={prompts_per_rank}: must be >= 1")
        self.dataset = dataset
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.prompts_per_rank = prompts_per_rank
        self.shuffle = shuffle
        self.cursor = 0
        self._perm_epoch = -1
        self._perm = np.arange(len(dataset))
        if len(dataset) < dp_size * prompts_per_rank:
            logger.warning("prompt file %s has %d samples, fewer than one global batch (%d): prompts repeat "
                           "within a step", dataset.path, len(dataset), dp_size * prompts_per_rank)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.dataset)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                          else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    def index_at(self, position: int) -> int:
        """Dataset index at a global stream position."""
        n = len(self.dataset)
        return int(self._order(position // n)[position % n])

    @property
    def epoch(self) -> int:
        return self.cursor // len(self.dataset)

    def next(self) -> list[PromptSample]:
        """This rank's samples for the next step (advances the shared cursor by one global batch)."""
        start = self.cursor + self.dp_rank * self.prompts_per_rank
        out = [self.dataset[self.index_at(start + j)] for j in range(self.prompts_per_rank)]
        self.cursor += self.dp_size * self.prompts_per_rank
        return out

    def state_dict(self) -> dict[str, int | str]:
        return {"cursor": self.cursor, "seed": self.seed, "dataset_size": len(self.dataset),
                "shuffle": int(self.shuffle), "path": str(self.dataset.path)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("dataset_size", len(self.dataset)), ("shuffle", int(self.shuffle))):
            if key in state and int(state[key]) != mine:
                raise DataError(f"prompt loader state does not match: saved {key}={state[key]}, now {mine} "
                                f"(prompt file {self.dataset.path})")
        self.cursor = int(state["cursor"])
