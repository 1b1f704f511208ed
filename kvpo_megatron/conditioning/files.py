"""Checks for user-supplied model files: one clear error naming the missing file and what it is for."""
from __future__ import annotations

from pathlib import Path

from kvpo_megatron.errors import ConfigError


class MissingFileError(ConfigError, FileNotFoundError):
    """A model, tokenizer or reward weight file named in the config does not exist."""


def require_path(path: str | Path | None, what: str, *, field: str | None = None) -> Path:
    """Return ``path`` as a Path, raising MissingFileError naming ``what`` (and the config ``field``) if absent."""
    where = f" (config field {field!r})" if field else ""
    if path is None or str(path) == "":
        raise MissingFileError(f"{what}: no path given{where}")
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"{what} not found: {p}{where}")
    return p


def require_file_in(directory: Path, names: tuple[str, ...], what: str) -> Path:
    """Return the first of ``names`` that exists inside ``directory``; the error lists every name tried."""
    for name in names:
        candidate = directory / name
        if candidate.exists():
            return candidate
    tried = ", ".join(str(directory / n) for n in names)
    raise MissingFileError(f"{what} not found: tried {tried}")
