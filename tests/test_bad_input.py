"""Bad input gets one ``error:`` line and exit code 2 with nothing written; resume keeps one history; a damaged
newest checkpoint falls back to the newest intact one."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpo_megatron.config import deep_merge, from_dict, parse_overrides
from tests.cli_utils import ROOT, one_error, run_cli
from tests.helpers import tiny_diffusers, tiny_model

TRAIN, GENERATE, CONVERT = "examples/train_kvpo.py", "examples/generate.py", "tools/convert_checkpoint.py"


# ------------------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("script,args,needle", [
    (TRAIN, ["video.num_frames=10"], "video.num_frames (10) is not a multiple of cache.frames_per_block (3)"),
    (TRAIN, ["optim.grad_clip=0"], "optim.grad_clip must be > 0"),
    (TRAIN, ["optim.grad_clip=-1"], "optim.grad_clip must be > 0"),
    (TRAIN, ["optim.lr=-1e-4"], "optim.lr must be >= 0"),
    (TRAIN, ["train.iterations=0"], "train.iterations must be >= 1"),
    (TRAIN, ["optim.betas=[0.9]"], "optim.betas must have 2 entries"),
    (TRAIN, ["video.latent_height=0"], "video.latent_height must be >= 1"),
    (TRAIN, ["video.latent_width=-8"], "video.latent_width must be >= 1"),
    (TRAIN, ["objective.guard=maybe"], "objective.guard must be true or false, got 'maybe'"),
    (TRAIN, ["routing=5"], "routing is a section"),
    (TRAIN, ["train.out_dir=123"], "train.out_dir must be a string, got 123"),
    (TRAIN, ["--config", "LIST"], "must be a mapping of sections"),
    (TRAIN, ["--config", "SCALAR"], "must be a mapping of sections"),
    (GENERATE, ["video.latent_width=0"], "video.latent_width must be >= 1"),
    (GENERATE, ["video.num_frames=10"], "video.num_frames (10) is not a multiple of cache.frames_per_block (3)"),
    (GENERATE, ["recache_on_switch=often"], "recache_on_switch must be true or false"),
], ids=lambda x: x if isinstance(x, str) and "=" in x else None)
def test_bad_config_value_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, script, args, needle):
    (tmp_path / "LIST").write_text("- optim\n- train\n")
    (tmp_path / "SCALAR").write_text("5\n")
    args = [str(tmp_path / a) if a in ("LIST", "SCALAR") else a for a in args]
    out = tmp_path / "out"
    key = "train.out_dir" if script == TRAIN else "out"
    code, errors = run_cli(capsys, monkeypatch, script, f"{key}={out}", *args)
    one_error(code, errors, needle)
    assert not out.exists()


def test_config_error_printed_once_under_torchrun(tmp_path):
    """Every rank fails the same way; rank 0 prints, the launcher stops the others, and returns 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / TRAIN), "optim.grad_clip=-1", f"train.out_dir={tmp_path / 'out'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    errors = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("error:")]
    assert errors == ["error: optim.grad_clip must be > 0 (a grad-norm bound), got -1.0"], p.stderr[-3000:]
    assert p.returncode == 1  # torchrun's own code for a failed worker (its report shows rank 0's exitcode: 2)
    assert not (tmp_path / "out").exists()


def test_random_wan_weights_warn_loudly(tmp_path, caplog):
    from kvpo_megatron.checkpoint.loading import warn_if_random_weights
    from kvpo_megatron.config import load_config
    from kvpo_megatron.kvpo.train_config import KVPOTrainConfig

    (tmp_path / "empty.yaml").write_text("")
    cfg = load_config(KVPOTrainConfig, tmp_path / "empty.yaml")
    with caplog.at_level(logging.WARNING):
        assert warn_if_random_weights(cfg.model)
    assert "RANDOM weights" in caplog.text and "wan-1.3b" in caplog.text
    caplog.clear()
    assert not warn_if_random_weights(load_config(KVPOTrainConfig, None, ["model.checkpoint=/some/dir"]).model)
    assert not warn_if_random_weights(load_config(KVPOTrainConfig, None, ["model.preset=tiny"]).model)
    assert not caplog.text


# ------------------------------------------------------------------------------------------ prompts
def _bad_prompt(tmp_path, kind) -> Path:
    if kind == "directory":
        (tmp_path / "prompts").mkdir()
        return tmp_path / "prompts"
    p = tmp_path / "prompts.txt"
    p.write_bytes("a fox\n".encode() + b"\xff\xfe snow\n")
    return p


@pytest.mark.parametrize("kind", ["directory", "not-utf8"])
@pytest.mark.parametrize("script", [TRAIN, "tools/precompute_text_embeddings.py"])
def test_bad_prompt_path_one_line_exit_2(tmp_path, capsys, monkeypatch, kind, script):
    prompts = _bad_prompt(tmp_path, kind)
    out = tmp_path / "out"
    if script == TRAIN:
        args = [f"data.prompts={prompts}", f"train.out_dir={out}"]
    else:
        args = [str(prompts), "--out", str(out), "--encoder", "hash", "--text-dim", "8", "--no-progress"]
    code, errors = run_cli(capsys, monkeypatch, script, *args)
    one_error(code, errors, str(prompts), "is a directory" if kind == "directory" else "is not UTF-8 text")
    assert not out.exists()


def test_txt_prompt_file_is_text_even_when_a_prompt_starts_with_a_brace(tmp_path):
    from kvpo_megatron.data.prompts import read_prompt_file

    (tmp_path / "p.txt").write_text('{sic} a fox, {"x": 1}\nsecond\n')
    assert [r.prompts for r in read_prompt_file(tmp_path / "p.txt")] == [['{sic} a fox, {"x": 1}'], ["second"]]
    (tmp_path / "p.jsonl").write_text('{"prompts": ["a", "b"]}\n')
    assert [r.prompts for r in read_prompt_file(tmp_path / "p.jsonl")] == [["a", "b"]]
    (tmp_path / "p").write_text('# comment\n{"prompt": "c"}\n')  # no suffix: sniffed
    assert [r.prompts for r in read_prompt_file(tmp_path / "p")] == [["c"]]


# ------------------------------------------------------------------------------------------ truncated safetensors
def _truncate(p: Path, keep: float = 0.5) -> None:
    p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])


@pytest.mark.parametrize("case", ["import", "import --lora", "train model.checkpoint", "generate model.checkpoint"])
def test_truncated_safetensors_one_line_exit_2(pgs, tmp_path, capsys, monkeypatch, case):
    from safetensors.torch import save_file

    from kvpo_megatron.lora import LoRAConfig, apply_lora, save_adapter

    src = tmp_path / "diffusers"
    tiny_diffusers().save_pretrained(src)
    out = tmp_path / "out"
    if case == "import":
        bad = src / "diffusion_pytorch_model.safetensors"
        args = [CONVERT, "import", "--from", "diffusers", str(src), "--out", str(out)]
    elif case == "import --lora":
        m = tiny_model(pgs)
        apply_lora(m, LoRAConfig(rank=4, alpha=4.0))
        bad = save_adapter(m, LoRAConfig(rank=4, alpha=4.0), tmp_path / "adapter") / "adapter_model.safetensors"
        args = [CONVERT, "import", "--from", "diffusers", str(src), "--out", str(out), "--lora",
                str(tmp_path / "adapter")]
    else:
        bad = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in tiny_diffusers().state_dict().items()}, str(bad))
        key = "train.out_dir" if case.startswith("train") else "out"
        args = [TRAIN if case.startswith("train") else GENERATE, f"model.checkpoint={bad}", f"{key}={out}"]
    _truncate(bad)
    code, errors = run_cli(capsys, monkeypatch, *args)
    one_error(code, errors, str(bad), "truncated")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ export
def test_export_of_a_training_checkpoint_or_a_corrupt_shard(pgs, trained_run, tmp_path, capsys, monkeypatch):
    from kvpo_megatron.checkpoint.model_dir import save_model_dist

    out = tmp_path / "out"
    for src, needle in ((trained_run / "ckpt" / "iter_0000002", "is a training checkpoint"),
                        (trained_run / "ckpt", "directory of training checkpoints")):
        code, errors = run_cli(capsys, monkeypatch, CONVERT, "export", str(src), str(out), "--to", "diffusers")
        one_error(code, errors, str(src), needle)
    model = tmp_path / "model"
    save_model_dist(tiny_model(pgs), model, info={"model": {"preset": "tiny", "overrides": {}}, "lora": None})
    shard = next(model.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed inside a tensor
    shard.write_bytes(bytes(data))
    code, errors = run_cli(capsys, monkeypatch, CONVERT, "export", str(model), str(out), "--to", "wan")
    one_error(code, errors, str(model), "failed its integrity check", shard.name)
    _truncate(shard, 0.9)
    code, errors = run_cli(capsys, monkeypatch, CONVERT, "export", str(model), str(out), "--to", "wan")
    one_error(code, errors, shard.name, "is truncated")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Two tiny KVPO iterations with a checkpoint after each: run/ (metrics, TensorBoard) and ckpt/."""
    from kvpo_megatron.kvpo.trainer import KVPOTrainer

    root = tmp_path_factory.mktemp("trained")
    (root / "prompt.txt").write_text("a red fox running through fresh snow at dawn\n")
    KVPOTrainer(_cfg(root, root)).train()
    return root


def _args(root: Path, prompts_root: Path, *extra) -> list[str]:
    return [f"train.out_dir={root / 'run'}", "train.progress=false", f"data.prompts={prompts_root / 'prompt.txt'}",
            f"checkpoint.dir={root / 'ckpt'}", "checkpoint.every=1", "train.iterations=2", *extra]


def _cfg(root: Path, prompts_root: Path, *extra):
    from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig

    return from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, parse_overrides(_args(root, prompts_root, *extra))))


def _copy(trained_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained_run / "run", tmp_path / "run")
    shutil.copytree(trained_run / "ckpt", tmp_path / "ckpt")
    return tmp_path


def _rows(root: Path) -> list[int]:
    return [json.loads(x)["iteration"] for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]


def test_resume_applies_allowed_changes_and_refuses_others(trained_run, tmp_path, caplog, capsys, monkeypatch):
    from kvpo_megatron.kvpo.trainer import KVPOTrainer

    root = _copy(trained_run, tmp_path)
    code, errors = run_cli(capsys, monkeypatch, TRAIN, *_args(root, trained_run, "train.iterations=3", "train.seed=7"))
    one_error(code, errors, "cannot change on resume", "train.seed: 0 -> 7")
    with caplog.at_level(logging.WARNING):
        tr = KVPOTrainer(_cfg(root, trained_run, "train.iterations=3", "optim.lr=0.005", "optim.grad_clip=0.5"))
    assert tr.iteration == 2
    from kvpo_megatron.kvpo.train_config import TINY_DEFAULT
    assert f"resume: optim.lr: {TINY_DEFAULT['optim']['lr']!r} -> 0.005 (applied)" in caplog.text  # the saved lr
    assert "resume: optim.grad_clip: 1.0 -> 0.5 (applied)" in caplog.text
    assert [g["lr"] for g in tr.optimizer.param_groups] == [0.005]  # the saved lr would win without the change
    hist = tr.train()
    assert [h["iteration"] for h in hist] == [1, 2, 3] and hist[-1]["lr"] == 0.005


@pytest.mark.parametrize("damage", ["shard", "metadata", "state"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(trained_run, tmp_path, caplog, damage):
    from kvpo_megatron.kvpo.trainer import KVPOTrainer

    root = _copy(trained_run, tmp_path)
    newest = root / "ckpt" / "iter_0000002"
    target = {"shard": next(newest.glob("*.distcp")), "metadata": newest / ".metadata",
              "state": newest / "training_state.json"}[damage]
    _truncate(target, 0.6)
    with caplog.at_level(logging.WARNING):
        tr = KVPOTrainer(_cfg(root, trained_run))
    assert tr.iteration == 1
    assert "iter_0000002 is damaged, falling back" in caplog.text
    assert not newest.exists() and (root / "ckpt" / "iter_0000002.damaged").is_dir()  # set aside, never loaded
    assert _rows(root) == [1]  # the log is cut back to the resumed iteration
    assert [h["iteration"] for h in tr.train()] == [1, 2]
    assert _rows(root) == [1, 2]


def test_no_intact_checkpoint_one_line_exit_2(trained_run, tmp_path, capsys, monkeypatch):
    root = _copy(trained_run, tmp_path)
    for it in ("iter_0000001", "iter_0000002"):
        _truncate(next((root / "ckpt" / it).glob("*.distcp")), 0.5)
    code, errors = run_cli(capsys, monkeypatch, TRAIN, *_args(root, trained_run))
    one_error(code, errors, "no intact training checkpoint", "iter_0000001", "iter_0000002", "truncated")
    assert _rows(root) == [1, 2]  # untouched


def test_resume_after_kill_keeps_one_history(trained_run, tmp_path):
    """A run killed after logging iteration 2 but before its checkpoint: the resumed run logs 2 once (JSONL and
    TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kvpo_megatron.kvpo.trainer import KVPOTrainer

    root = _copy(trained_run, tmp_path)
    shutil.rmtree(root / "ckpt" / "iter_0000002")
    assert _rows(root) == [1, 2]
    hist = KVPOTrainer(_cfg(root, trained_run)).train()
    assert _rows(root) == [1, 2] and [h["iteration"] for h in hist] == [1, 2]
    acc = EventAccumulator(str(root / "run" / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("reward_mean")
    assert [e.step for e in events] == [1, 2]
    assert events[-1].value == pytest.approx(hist[-1]["reward_mean"])


def test_fresh_run_into_a_used_out_dir_refuses_unless_overwrite(trained_run, tmp_path, capsys, monkeypatch):
    from kvpo_megatron.kvpo.trainer import KVPOTrainer

    root = _copy(trained_run, tmp_path)
    code, errors = run_cli(capsys, monkeypatch, TRAIN, *_args(root, trained_run, "checkpoint.resume=never"))
    one_error(code, errors, "holds another run's checkpoints", "train.overwrite=true")
    shutil.rmtree(root / "ckpt")  # no checkpoint: a second run into the same out_dir
    code, errors = run_cli(capsys, monkeypatch, TRAIN, *_args(root, trained_run))
    one_error(code, errors, "already holds a run", "metrics.jsonl", "train.overwrite=true")
    assert _rows(root) == [1, 2]
    hist = KVPOTrainer(_cfg(root, trained_run, "train.overwrite=true")).train()
    assert [h["iteration"] for h in hist] == [1, 2] and _rows(root) == [1, 2]
    assert len(list((root / "run" / "tensorboard").iterdir())) == 1  # one event file: one history


def test_prune_removes_iter_dirs_without_complete_json(pgs, tmp_path):
    from kvpo_megatron.checkpoint.training import CheckpointConfig, save_training_checkpoint

    m = tiny_model(pgs)
    opt = torch.optim.AdamW([m.patch_embedding.weight])
    for junk in ("iter_0000001", "iter_0000003", "iter_0000002.tmp"):
        (tmp_path / junk).mkdir(parents=True)
        (tmp_path / junk / "__0_0.distcp").write_bytes(b"partial")
    save_training_checkpoint(CheckpointConfig(dir=str(tmp_path), keep_last=2), 4, model=m, optimizer=opt,
                             scheduler_state={}, data_state={}, extra={}, pg_collection=pgs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "latest"]


@pytest.mark.parametrize("value,needle", [("model.bogus=1", "--set: unknown config key(s) in model: bogus"),
                                          ("spec", "--set: override 'spec' must look like key.sub=value")])
def test_equivalence_tool_bad_set_one_line_exit_2(tmp_path, capsys, monkeypatch, value, needle):
    out = tmp_path / "eq"
    code, errors = run_cli(capsys, monkeypatch, "tools/kvpo_equivalence.py", "run", "--layouts", "ref", "--out",
                           str(out), "--set", value)
    one_error(code, errors, needle)
    assert not out.exists()
