"""Every shipped example config parses into its config tree; bad keys/values name the field."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpo_megatron.config import deep_merge, from_dict, load_config, parse_overrides
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.generation import GenerateConfig
from kvpo_megatron.kvpo.routing import routed_slots
from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
from kvpo_megatron.kvpo.trainer import KVPOTrainer

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(path):
    cls = KVPOTrainConfig if path.name.startswith("kvpo_") else GenerateConfig
    cfg = load_config(cls, path)
    assert cfg.model.preset in ("tiny", "wan-1.3b", "wan-14b")


def test_memflow_config_has_bank_and_longlive_routes_4_slots():
    mem = load_config(KVPOTrainConfig, CONFIGS / "kvpo_memflow_1.3b.yaml")
    assert mem.cache.memory_bank is not None and mem.cache.memory_bank.bank_size == 3
    ll = load_config(KVPOTrainConfig, CONFIGS / "kvpo_longlive_1.3b.yaml")
    assert routed_slots(ll.cache, ll.routing) == 5


def test_bad_config_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) in routing: window"):
        load_config(KVPOTrainConfig, None, ["routing.window=3"])
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        load_config(KVPOTrainConfig, None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="routing.sampler must be one of"):
        load_config(KVPOTrainConfig, None, ["routing.sampler=greedy"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(KVPOTrainConfig, tmp_path / "nope.yaml")
    # the routed window is the cache's local window: no second field to disagree with it, and the fixed slots fit it
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) in routing: num_local_slots"):
        load_config(KVPOTrainConfig, None, ["routing.num_local_slots=8"])
    with pytest.raises(ConfigError, match="routing.num_recent_fixed \\(10\\) must be <= cache.local_attn_frames \\(9\\)"):
        load_config(KVPOTrainConfig, None, ["routing.num_recent_fixed=10"])


def test_cli_bad_override_exits_2_with_one_line():
    root = CONFIGS.parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout, whatever the editable install points at
    p = subprocess.run([sys.executable, str(root / "examples" / "generate.py"), "video.num_frames=10"],
                       cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert err == ["error: video.num_frames (10) is not a multiple of cache.frames_per_block (3)"], p.stderr[-2000:]


def test_fast_path_fields_name_what_cannot_run_here(tmp_path):
    """CUDA graphs, the TE spec and FP8 on a CPU machine, and bad rollout/replay batch settings: one message each."""
    from kvpo_megatron.accelerate import check_accel
    from kvpo_megatron.kvpo.config import ReplayConfig, RolloutConfig
    from kvpo_megatron.model.build import ModelSection

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="model.cuda_graphs"):
        check_accel(ModelSection(cuda_graphs=True), device=cpu)
    with pytest.raises(ConfigError, match="model.overrides.spec=te"):
        check_accel(ModelSection(overrides={"spec": "te"}), device=cpu)
    with pytest.raises(ConfigError, match="needs model.overrides.spec=te"):
        check_accel(ModelSection(overrides={"fp8": "hybrid"}), device=cpu)
    with pytest.raises(ConfigError, match="model.fp8_linears: unknown group"):
        ModelSection(fp8_linears=("mlp",))
    with pytest.raises(ConfigError, match="rollout.batch_size"):
        RolloutConfig(batch_size=0)
    with pytest.raises(ConfigError, match="replay.batch_size"):
        ReplayConfig(batch_size=-2)
    with pytest.raises(ConfigError, match="replay.recompute"):
        ReplayConfig(recompute="sometimes")
    check_accel(ModelSection(compile=False), device=cpu)  # the plain CPU path is fine
    tr = parse_overrides([f"train.out_dir={tmp_path}", "model.cuda_graphs=true"])
    with pytest.raises(ConfigError, match="model.cuda_graphs"):
        KVPOTrainer(from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, tr)))


def test_resume_reads_an_older_checkpoint_config_and_allows_kernel_choices(tmp_path):
    """A checkpoint written before a config field existed resumes (the missing field counts as its default); the
    execution features that only choose kernels may change on resume; the model may not."""
    from kvpo_megatron.config import to_dict
    from kvpo_megatron.kvpo.run_state import check_resumed_config
    from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig

    tree = deep_merge(TINY_DEFAULT, {"train": {"out_dir": str(tmp_path)}})
    cfg = from_dict(KVPOTrainConfig, tree)
    saved = to_dict(cfg)
    del saved["model"]["te_compile"]  # as written before these fields existed
    del saved["replay"]["memory_budget_gb"]
    check_resumed_config(Path("ckpt"), saved, cfg)
    faster = from_dict(KVPOTrainConfig, deep_merge(tree, {"model": {"te_compile": "opaque", "compile": True,
                                                                    "overrides": {"split_attention": "torch"}}}))
    check_resumed_config(Path("ckpt"), saved, faster)
    other = from_dict(KVPOTrainConfig, deep_merge(tree, {"model": {"overrides": {"num_layers": 3}}}))
    with pytest.raises(ConfigError, match="model.overrides.num_layers"):
        check_resumed_config(Path("ckpt"), saved, other)
