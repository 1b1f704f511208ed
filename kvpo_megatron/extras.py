"""Optional dependencies (setup.py extras) and the one check that names the missing extra before a job starts.

``pip install .`` installs what the main job needs (tests/test_install.py runs it on exactly that). Features a
config selects import more, lazily; :func:`check_job_extras` looks for those modules when the job is configured,
so a missing one stops the job with one line naming the extra instead of an ImportError halfway through.
"""
from __future__ import annotations

import importlib.util

from kvpo_megatron.errors import ConfigError

EXTRAS: dict[str, tuple[str, ...]] = {
    "models": ("diffusers", "transformers", "accelerate", "sentencepiece"),
    "data": ("tensorstore", "ml_dtypes"),
    "media": ("imageio", "av"),
}
"""setup.py ``extras_require`` groups -> the modules they provide (kept equal by tests/test_install.py)."""


def require(modules: tuple[str, ...], extra: str, what: str) -> None:
    """ConfigError naming the first missing module, the feature that needs it and the extra that installs it."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise ConfigError(f"{what} needs the Python package {m!r}, which `pip install .` leaves out: "
                              f"pip install 'kvpo_megatron[{extra}]'")


def check_job_extras(cfg) -> None:
    """The extras a ``GenerateConfig`` / ``KVPOTrainConfig`` needs for the features it selects."""
    text = getattr(cfg, "text", None)
    kind = str(getattr(text, "kind", ""))
    if kind == "umt5":
        require(("transformers", "sentencepiece"), "models", "text.kind=umt5 (the umT5 encoder)")
    elif kind == "store":
        require(("tensorstore", "ml_dtypes"), "data", "text.kind=store (the embedding store)")
    decoder = getattr(cfg, "decoder", None)
    if decoder is not None and str(getattr(decoder, "kind", "")) == "wan":
        require(("diffusers",), "models", "decoder.kind=wan (the Wan VAE)")
    if decoder is not None and type(cfg).__name__ == "GenerateConfig":
        require(("av",), "media", "generation with a decoder (the mp4 writer)")
    for c in getattr(getattr(cfg, "reward", None), "components", []) or []:
        if str(c.kind) in ("hpsv3", "videoalign"):
            require(("transformers", "accelerate"), "models", f"reward kind {c.kind}")
    train = getattr(cfg, "train", None)
    if train is not None and getattr(train, "rollout_archive", None):
        require(("tensorstore", "ml_dtypes"), "data", "train.rollout_archive")
