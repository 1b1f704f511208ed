"""Issue 15 (4): what ``pip install .`` installs (setup.py's ``install_requires`` and their own requirements) is
enough for the main job. The job runs in a subprocess where any import made by this package or the example script
of a module outside that set fails (and is recorded), as it would on a machine with nothing else installed."""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# Imports that need a distribution although their top-level module is torch's (torch imports it inside).
INDIRECT = {"torch.utils.tensorboard": "tensorboard"}
# Probed by the package and optional on a CPU machine: the job must run on without them.
OPTIONAL = {"triton": "GPU kernels; ships with CUDA torch, a PyTorch fallback runs without it",
            "transformer_engine": "the te extra (model.spec=te)",
            "av": "the media extra: training's sample mp4s are skipped without it (frame grid and table still logged)"}


def install_requires() -> list[str]:
    """``install_requires`` of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))


def _closure(requirements: list[str]) -> set[str]:
    """Distributions pip would install for ``requirements`` here (markers evaluated, extras not followed)."""
    seen, todo = set(), list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += md.requires(req.name) or []
        except md.PackageNotFoundError:
            pass
    return seen


def allowed_modules() -> tuple[set[str], set[str]]:
    """(top-level modules importable after ``pip install .``, their distributions)."""
    # megatron-core is declared for Python >= 3.12; on 3.11 scripts/install.sh installs it without its metadata check
    dists = _closure(install_requires() + ["megatron-core"])
    mods = set(sys.stdlib_module_names) | {"kvpo_megatron"}
    for mod, owners in md.packages_distributions().items():
        if any(o.lower().replace("_", "-") in dists for o in owners):
            mods.add(mod)
    return mods, dists


HOOK = r'''
import builtins, json, sys
ALLOWED, DISTS, INDIRECT, LOG = set(json.loads(sys.argv[1])), set(json.loads(sys.argv[2])), json.loads(sys.argv[3]), sys.argv[4]
real = builtins.__import__

def guarded(name, globals=None, locals=None, fromlist=(), level=0):
    caller = (globals or {}).get("__name__", "")
    if level == 0 and (caller == "__main__" or caller.startswith("kvpo_megatron")):
        need = next((d for prefix, d in INDIRECT.items() if name == prefix or name.startswith(prefix + ".")), None)
        if name.split(".")[0] not in ALLOWED or (need is not None and need not in DISTS):
            with open(LOG, "a") as f:
                f.write(f"{caller} imports {name}\n")
            raise ImportError(f"{name} is not installed by `pip install .` (blocked by tests/test_install.py)")
    return real(name, globals, locals, fromlist, level)

builtins.__import__ = guarded
sys.argv = [sys.argv[5]] + sys.argv[6:]
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_main_job_runs_on_what_setup_py_installs(tmp_path):
    mods, dists = allowed_modules()
    log, out = tmp_path / "blocked.txt", tmp_path / "run"
    cmd = [sys.executable, "-c", HOOK, json.dumps(sorted(mods)), json.dumps(sorted(dists)), json.dumps(INDIRECT),
           str(log), str(ROOT / "examples" / "train_kvpo.py"), "train.iterations=2", f"train.out_dir={out}",
           "train.progress=false", "logging.sample_every=2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    blocked = log.read_text().splitlines() if log.exists() else []
    required = [line for line in blocked if line.split(" imports ")[1].split(".")[0] not in OPTIONAL]
    assert not required, "imports outside setup.py's install_requires:\n" + "\n".join(required)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in ("metrics.jsonl", "reward_curve.png", "final_adapter/adapter_model.safetensors", "final_lora.safetensors",
              "final_adapter_ema/adapter_model.safetensors"):
        assert (out / f).is_file(), f
    assert list((out / "tensorboard").glob("events.*")), "no TensorBoard events"
    # the sample videos of iteration 2 without PyAV (the media extra): no mp4s, one warning, the job goes on
    assert "PyAV is not installed, so no mp4s are written" in p.stderr and not list(out.glob("samples/*.mp4"))


def test_the_guard_blocks_what_is_not_declared():
    """The check can fail: an extra's module (imageio, media) or one no requirement pulls in is refused."""
    mods, dists = allowed_modules()
    assert {"torch", "megatron", "safetensors", "peft", "yaml", "numpy", "tqdm"} <= mods
    assert "imageio" not in mods and "av" not in mods and "pytest" not in mods


def test_features_name_their_missing_extra(monkeypatch):
    """A config feature whose extra is not installed stops the job with one line naming the extra."""
    import importlib.util

    import pytest

    from kvpo_megatron.config import load_config
    from kvpo_megatron.errors import ConfigError
    from kvpo_megatron.extras import EXTRAS, check_job_extras
    from kvpo_megatron.generation import GenerateConfig
    from kvpo_megatron.kvpo.train_config import KVPOTrainConfig

    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    for name, modules in EXTRAS.items():
        assert set(modules) <= set(extras[name]) <= set(modules) | {"protobuf"}, name
    cfg = load_config(KVPOTrainConfig, ROOT / "examples" / "configs" / "kvpo_longlive_1.3b.yaml")
    check_job_extras(cfg)  # everything is installed here
    real = importlib.util.find_spec
    for hidden, extra, what in (("diffusers", "models", "decoder.kind=wan"),
                                ("tensorstore", "data", "text.kind=store"),
                                ("accelerate", "models", "reward kind hpsv3")):
        monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a, h=hidden: None if m == h else real(m, *a))
        with pytest.raises(ConfigError, match=rf"{what}.* needs the Python package '{hidden}'.*kvpo_megatron\[{extra}\]"):
            check_job_extras(cfg)
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "av" else real(m, *a))
    with pytest.raises(ConfigError, match=r"mp4 writer.*kvpo_megatron\[media\]"):
        check_job_extras(load_config(GenerateConfig, ROOT / "examples" / "configs" / "generate_tiny.yaml"))
    check_job_extras(load_config(GenerateConfig, None))  # no decoder: the mp4 writer is not needed
