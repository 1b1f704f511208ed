"""Checkpoints are untrusted input: a file that would run code when unpickled never does.

Each test plants a payload (an object whose ``__reduce__`` creates a marker file) where a torch_dist directory
holds pickles -- inside ``.metadata`` (torch DCP reads it with plain ``pickle.load``) or in the common state
(torch DCP's ``load_bytes`` uses ``torch.load(weights_only=False)``) -- first shows the payload is live (an
unrestricted unpickle creates a marker), then runs an entry point on it: one ``error:`` line, exit code 2, no
marker, no output.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import pytest
import torch

from kvpo_megatron.checkpoint import dist as cdist
from kvpo_megatron.checkpoint import model_dir as cmodel_dir
from kvpo_megatron.checkpoint import safe_dcp
from kvpo_megatron.errors import ConfigError
from tests.cli_utils import one_error, run_cli
from tests.helpers import tiny_diffusers, tiny_model


@pytest.fixture(autouse=True)
def _unsafe_torch_load_default(monkeypatch):
    """Worst case: torch.load calls that don't pass weights_only unpickle code (as before torch 2.6)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): code execution, made visible."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------------------ builders
@contextlib.contextmanager
def _evil_common_state(module, marker):
    """Every ``save_sharded`` of ``module`` also writes a payload into the checkpoint's common state."""
    real = module.save_sharded
    module.save_sharded = lambda sd, path: real({**sd, "evil": Payload(marker)}, path)
    try:
        yield
    finally:
        module.save_sharded = real


def model_dir(pgs, path: Path, *, lora: bool = False, evil_common=None) -> Path:
    """A model checkpoint directory of the tiny model (as ``convert_checkpoint import`` writes)."""
    from kvpo_megatron.lora import LoRAConfig, apply_lora

    m = tiny_model(pgs)
    info = {"model": {"preset": "tiny", "overrides": {}}, "lora": None}
    if lora:
        apply_lora(m, LoRAConfig(rank=8, alpha=8.0, target_modules=("q",)))
        info["lora"] = {"rank": 8, "alpha": 8.0, "target_modules": ["q"]}
    with _evil_common_state(cmodel_dir, evil_common) if evil_common else contextlib.nullcontext():
        cmodel_dir.save_model_dist(m, path, info=info)
    return path


def plant_metadata(ckpt: Path, marker: Path, *, manifest: bool = False) -> None:
    """Put a payload inside an otherwise valid ``.metadata`` (and re-record checksums if asked)."""
    md = safe_dcp.load_metadata(ckpt / ".metadata")
    md.planner_data = Payload(marker)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    if manifest:
        safe_dcp.write_manifest(ckpt)


def assert_live_metadata(ckpt: Path, marker: Path) -> None:
    """The planted ``.metadata`` runs code under plain ``pickle.load`` (so the tests below can fail)."""
    pickle.loads((ckpt / ".metadata").read_bytes())
    assert marker.exists()
    marker.unlink()


def assert_live_common(ckpt: Path, marker: Path) -> None:
    """The common state runs code under ``torch.load(weights_only=False)`` (what torch DCP's load_bytes uses)."""
    import io

    md = safe_dcp.load_metadata(ckpt / ".metadata")
    info = next(v for k, v in md.storage_data.items() if k.fqn.startswith("common_state/"))
    torch.load(io.BytesIO(safe_dcp._read_item(ckpt, info)), weights_only=False)
    assert marker.exists()
    marker.unlink()


# ------------------------------------------------------------------------------------------ the reader
def test_metadata_unpickler_reads_our_checkpoints_and_refuses_code(pgs, tmp_path):
    d = model_dir(pgs, tmp_path / "m")
    md = safe_dcp.check_dist_dir(d)
    assert "model.patch_embedding.weight" in md.state_dict_metadata
    assert cdist.tensor_metadata(d)["model.patch_embedding.weight"][0] == (96, 4, 1, 2, 2)
    plant_metadata(d, tmp_path / "marker")
    assert_live_metadata(d, tmp_path / "marker")
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match="builtins.open|io.open"):
        safe_dcp.load_metadata(d / ".metadata")
    # the process-wide readers that megatron's loads go through refuse it too
    from torch.distributed.checkpoint import FileSystemReader
    with pytest.raises(safe_dcp.UnsafeCheckpointError):
        FileSystemReader(str(d)).read_metadata()
    assert not (tmp_path / "marker").exists()


def _payload_dir(pgs, tmp_path, kind: str, *, lora: bool = False) -> Path:
    marker = tmp_path / "marker"
    if kind == "metadata":
        d = model_dir(pgs, tmp_path / "ckpt", lora=lora)
        plant_metadata(d, marker, manifest=True)
        assert_live_metadata(d, marker)
    elif kind == "common":
        d = model_dir(pgs, tmp_path / "ckpt", lora=lora, evil_common=marker)
        assert_live_common(d, marker)
    else:  # a legacy megatron common.pt holding the payload
        d = model_dir(pgs, tmp_path / "ckpt", lora=lora)
        torch.save({"x": Payload(marker)}, d / "common.pt")
    assert not marker.exists()
    return d


# ------------------------------------------------------------------------------------------ entry points
@pytest.mark.parametrize("kind", ["metadata", "common", "common.pt"])
@pytest.mark.parametrize("what", ["--to", "--lora-only"])
def test_export_of_payload_exits_2_without_running_it(pgs, tmp_path, capsys, monkeypatch, kind, what):
    d = _payload_dir(pgs, tmp_path, kind, lora=True)
    args = ["--to", "diffusers"] if what == "--to" else ["--lora-only"]
    code, errors = run_cli(capsys, monkeypatch, "tools/convert_checkpoint.py", "export", str(d), str(tmp_path / "out"),
                           *args)
    one_error(code, errors, str(d))
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["dist-source", "dist-lora", "peft-bin-lora", "pickle-source"])
def test_import_of_payload_exits_2_without_running_it(pgs, tmp_path, capsys, monkeypatch, case):
    marker = tmp_path / "marker"
    src = tmp_path / "diffusers"
    tiny_diffusers().save_pretrained(src)
    args = ["import", "--from", "diffusers", str(src), "--out", str(tmp_path / "out")]
    if case == "dist-source":
        args[3] = str(_payload_dir(pgs, tmp_path, "metadata"))
    elif case == "dist-lora":
        args += ["--lora", str(_payload_dir(pgs, tmp_path, "metadata", lora=True))]
    elif case == "peft-bin-lora":  # a peft adapter directory with a pickled adapter_model.bin
        (tmp_path / "adapter").mkdir()
        torch.save({"x": Payload(marker)}, tmp_path / "adapter" / "adapter_model.bin")
        args += ["--lora", str(tmp_path / "adapter")]
    else:  # a Self-Forcing-style training file holding a payload (read with weights_only=True)
        torch.save({"generator": {"model.x": Payload(marker)}}, tmp_path / "evil.pt")
        args[2:4] = ["self-forcing", str(tmp_path / "evil.pt")]
    code, errors = run_cli(capsys, monkeypatch, "tools/convert_checkpoint.py", *args)
    one_error(code, errors)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["metadata", "common", "common.pt"])
@pytest.mark.parametrize("script", ["examples/train_kvpo.py", "examples/generate.py"])
def test_model_checkpoint_payload_exits_2_without_running_it(pgs, tmp_path, capsys, monkeypatch, kind, script):
    d = _payload_dir(pgs, tmp_path, kind)
    out = tmp_path / "run"
    key = "train.out_dir" if "train" in script else "out"
    code, errors = run_cli(capsys, monkeypatch, script, f"model.checkpoint={d}", f"{key}={out}")
    one_error(code, errors, str(d))
    assert not (tmp_path / "marker").exists() and not out.exists()


def test_lora_directory_payload_exits_2_in_training(pgs, tmp_path, capsys, monkeypatch):
    """A model directory holding a LoRA (which becomes the trainable adapter) with a payload in its metadata."""
    d = _payload_dir(pgs, tmp_path, "metadata", lora=True)
    code, errors = run_cli(capsys, monkeypatch, "examples/train_kvpo.py", f"model.checkpoint={d}",
                           f"train.out_dir={tmp_path / 'run'}", "lora.target_modules=[q]")
    one_error(code, errors, str(d))
    assert not (tmp_path / "marker").exists()


# ------------------------------------------------------------------------------------------ resume
def _trained(tmp_path, *overrides) -> tuple[list[str], Path]:
    """One tiny KVPO iteration with a checkpoint; returns (CLI overrides of that run, checkpoint dir)."""
    from kvpo_megatron.config import deep_merge, from_dict, parse_overrides
    from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
    from kvpo_megatron.kvpo.trainer import KVPOTrainer

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("a red fox running through fresh snow at dawn\n")
    args = [f"train.out_dir={tmp_path / 'run'}", "train.progress=false", f"data.prompts={prompt}",
            f"checkpoint.dir={tmp_path / 'ckpt'}", "train.iterations=1", *overrides]
    KVPOTrainer(from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, parse_overrides(args)))).train()
    return args, tmp_path / "ckpt"


@pytest.mark.parametrize("kind", ["metadata", "common", "legacy-rng"])
def test_resume_from_payload_exits_2_without_running_it(tmp_path, capsys, monkeypatch, kind):
    from kvpo_megatron.checkpoint import training

    marker = tmp_path / "marker"
    if kind == "common":  # the saver itself writes a payload into the common state; the manifest matches
        with _evil_common_state(training, marker):
            args, root = _trained(tmp_path)
        assert_live_common(root / "iter_0000001", marker)
    else:
        args, root = _trained(tmp_path)
    ck = root / "iter_0000001"
    if kind == "metadata":  # payload inside .metadata, checksums re-recorded to match
        plant_metadata(ck, marker, manifest=True)
        assert_live_metadata(ck, marker)
    elif kind == "legacy-rng":  # a format-1 checkpoint: pickled RNG state, no training_state.json
        for f in ck.glob("*.json"):
            if f.name not in ("complete.json", "metadata.json"):
                f.unlink()
        torch.save([{"torch": Payload(marker)}], ck / "rng_state.pt")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    code, errors = run_cli(capsys, monkeypatch, "examples/train_kvpo.py", *args, "train.iterations=2")
    one_error(code, errors, str(ck))
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # nothing written


def test_save_refuses_non_json_state(tmp_path, pgs):
    from kvpo_megatron.checkpoint.training import CheckpointConfig, save_training_checkpoint

    m = tiny_model(pgs)
    opt = torch.optim.AdamW([m.patch_embedding.weight])
    with pytest.raises(ConfigError, match="extra must hold JSON values only"):
        save_training_checkpoint(CheckpointConfig(dir=str(tmp_path)), 1, model=m, optimizer=opt, scheduler_state={},
                                 data_state={}, extra={"x": Payload(tmp_path / "m")}, pg_collection=pgs)
    assert not list(tmp_path.iterdir())
