"""Megatron dist checkpoints (saved at one TP/CP layout, loaded at another) and training checkpoints (resume is
exact and reshards; the checkpoint config).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvpo_megatron.errors import ConfigError
from tests.dist_utils import run_workers
from tests.helpers import tiny_full_state_dict

RANK, ALPHA = 4, 8.0


# ------------------------------------------------------------------------------------------ dist resharding
def _reshard_worker(rank, world, root, full):
    from kvpo_megatron.checkpoint.loading import load_model_weights
    from kvpo_megatron.checkpoint.model_dir import save_model_dist
    from kvpo_megatron.checkpoint.sharding import gather_full_state_dict, load_full_state_dict
    from kvpo_megatron.lora import (LoRAConfig, apply_lora, load_lora_full_state_dict, lora_full_state_dict,
                                    lora_parameters)
    from kvpo_megatron.lora_tensors import base_name
    from kvpo_megatron.model import CausalWanDiT, model_config
    from kvpo_megatron.model.build import ModelSection, build_model
    from kvpo_megatron.model.specs import local_spec
    from kvpo_megatron.parallel.state import ParallelConfig, init_parallel

    lcfg = LoRAConfig(rank=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(11)

    def base_of(model):
        lora = {n for n, _ in lora_parameters(model)}
        return {base_name(k): v for k, v in gather_full_state_dict(model).items() if k not in lora}

    # save at TP=2 (x DP=2), with a LoRA
    pgs = init_parallel(ParallelConfig(tensor_model_parallel_size=2))
    m = CausalWanDiT(model_config("tiny", tensor_model_parallel_size=2), local_spec(), pg_collection=pgs)
    load_full_state_dict(m, full)
    apply_lora(m, lcfg)
    lora_ref = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lora_full_state_dict(m).items()}
    load_lora_full_state_dict(m, lora_ref, source_name="test")
    save_model_dist(m, root, info={"model": {"preset": "tiny", "overrides": {}},
                                   "lora": {"rank": RANK, "alpha": ALPHA, "target_modules": list(lcfg.target_modules)}})
    for tp, cp, with_lora in ((1, 1, True), (4, 1, True), (2, 2, False)):
        pgs = init_parallel(ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp))
        torch.manual_seed(100 + tp)  # a different random init everywhere
        m = build_model(ModelSection(preset="tiny"), pg_collection=pgs, tp=tp, cp=cp)
        if with_lora:
            apply_lora(m, lcfg)
        load_model_weights(m, root)
        got = base_of(m)
        assert got.keys() == full.keys()
        if with_lora:
            assert all(torch.equal(got[k], full[k]) for k in full), (tp, cp)
            lora = lora_full_state_dict(m)
            assert all(torch.equal(lora[k], lora_ref[k]) for k in lora_ref), (tp, cp)
        else:  # merged: W + alpha/r B A
            for k in lora_ref:
                if k.endswith("lora_A.weight"):
                    mod = k[: -len(".lora_A.weight")]
                    full[mod + ".weight"] = full[mod + ".weight"] + ALPHA / RANK * (lora_ref[mod + ".lora_B.weight"] @ lora_ref[k])
            assert all(torch.allclose(got[k], full[k], atol=1e-6, rtol=0) for k in full), (tp, cp)


def test_dist_checkpoint_saved_at_tp2_loads_at_tp1_tp4_and_tp2_cp2(tmp_path):
    run_workers(_reshard_worker, 4, str(tmp_path / "ckpt"), tiny_full_state_dict(3))
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert sum(f.endswith(".distcp") for f in files) == 2  # only the two TP ranks of DP replica 0 write


# ------------------------------------------------------------------------------------------ training
def _train_step(model, opt, metrics):
    import random

    import numpy as np

    x = torch.randn(1, 4, 3, 8, 8)
    text = model.encode_text(torch.randn(1, 16, 32))
    loss = model(x, torch.tensor([500.0]), text=text).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    metrics.append((loss.item(), random.random(), float(np.random.rand())))


class _Wrapper(torch.nn.Module):
    """Stands for a DDP wrapper: parameters named ``module.*`` and no ``pg_collection`` attribute."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def _training_worker(rank, world, root, full):
    import random

    import numpy as np

    from kvpo_megatron.checkpoint.training import (CheckpointConfig, TrainingState, find_latest_checkpoint,
                                                   load_training_checkpoint, save_training_checkpoint)
    from kvpo_megatron.kvpo.ema import ParameterEMA
    from kvpo_megatron.lora import LoRAConfig, apply_lora, lora_full_state_dict
    from kvpo_megatron.model import CausalWanDiT, model_config
    from kvpo_megatron.parallel.state import ParallelConfig, init_parallel

    def build(tp, pgs):
        from kvpo_megatron.checkpoint.sharding import load_full_state_dict
        m = CausalWanDiT(model_config("tiny", tensor_model_parallel_size=tp), None, pg_collection=pgs)
        load_full_state_dict(m, full)
        apply_lora(m, LoRAConfig(rank=RANK, alpha=ALPHA, target_modules=("q", "ffn_fc2")))
        with torch.no_grad():  # nonzero B so that both halves train
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)

    cfg = CheckpointConfig(dir=root, every=1, keep_last=2)
    pgs = init_parallel(ParallelConfig(tensor_model_parallel_size=2))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    model, opt = build(2, pgs)
    ema = ParameterEMA([(n, p) for n, p in model.named_parameters() if p.requires_grad], decay=0.5)
    metrics, ema_at = [], {}
    for it in range(1, 5):
        _train_step(model, opt, metrics)
        ema.update()
        ema_at[it] = {n: t.clone() for n, t in ema.shadow.items()}
        save_training_checkpoint(cfg, it, model=model, optimizer=opt, scheduler_state={"lr": 1e-2 * it},
                                 data_state={"cursor": it * 3}, extra={"metrics": list(metrics)}, pg_collection=pgs,
                                 ema=ema.shadow)
    final = lora_full_state_dict(model)
    assert sorted(p.name for p in Path(root).iterdir()) == ["iter_0000003", "iter_0000004", "latest"]
    assert (Path(root) / "latest").read_text() == "iter_0000004"
    assert find_latest_checkpoint(cfg).name == "iter_0000004"
    # partial checkpoints are never picked or loaded
    torch.distributed.barrier()  # every rank has listed the directory before rank 0 adds partial ones
    if rank == 0:
        (Path(root) / "iter_0000009.tmp").mkdir()
        (Path(root) / "iter_0000008").mkdir()
    torch.distributed.barrier()
    assert find_latest_checkpoint(cfg).name == "iter_0000004"
    try:
        load_training_checkpoint(Path(root) / "iter_0000008", model=model, optimizer=opt, pg_collection=pgs)
        raise AssertionError("a partial checkpoint was loaded")
    except ConfigError as e:
        assert "not a complete training checkpoint" in str(e)
    # resume from iteration 3 into a freshly built model/optimizer with scrambled RNGs
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    model2, opt2 = build(2, pgs)
    ema2 = ParameterEMA([(n, p) for n, p in model2.named_parameters() if p.requires_grad], decay=0.5)
    state = load_training_checkpoint(find_latest_checkpoint(CheckpointConfig(resume=str(Path(root) / "iter_0000003"))),
                                     model=_Wrapper(model2), optimizer=opt2, pg_collection=pgs,  # DDP-style names
                                     ema=ema2.shadow)
    assert state == TrainingState(iteration=3, scheduler_state={"lr": 1e-2 * 3}, data_state={"cursor": 9},
                                  extra={"metrics": [list(m) for m in metrics[:3]]},  # JSON: tuples read as lists
                                  ema_restored=True), state
    assert all(torch.equal(ema2.shadow[n], t) for n, t in ema_at[3].items())  # this rank's EMA shards, bitwise
    files = {p.name for p in (Path(root) / "iter_0000003").iterdir()}
    assert {"training_state.json", "rng_00000.json", "rng_00001.json", "integrity.json", "complete.json"} <= files
    # the EMA shards live in the torch_dist files the integrity manifest covers, beside the model's
    from kvpo_megatron.checkpoint.dist import tensor_metadata
    from kvpo_megatron.checkpoint.training import verify_training_checkpoint
    verify_training_checkpoint(Path(root) / "iter_0000003")
    meta = tensor_metadata(Path(root) / "iter_0000003")
    assert {k[len("ema."):] for k in meta if k.startswith("ema.")} == {k[len("model."):] for k in meta
                                                                        if k.startswith("model.")}
    resumed = metrics[:3]
    _train_step(model2, opt2, resumed)
    ema2.update()
    assert resumed == metrics, (resumed, metrics)  # loss and every RNG stream continue exactly
    assert all(torch.equal(v, lora_full_state_dict(model2)[k]) for k, v in final.items())
    assert all(torch.equal(ema2.shadow[n], t) for n, t in ema_at[4].items())
    # the same checkpoint at TP=1 (x DP=2): the LoRA and AdamW state reshard
    exp_avg = {n: opt.state[p]["exp_avg"] for n, p in model.named_parameters() if p.requires_grad}
    pgs1 = init_parallel(ParallelConfig(tensor_model_parallel_size=1))
    model1, opt1 = build(1, pgs1)
    ema1 = ParameterEMA([(n, p) for n, p in model1.named_parameters() if p.requires_grad], decay=0.5)
    load_training_checkpoint(Path(root) / "iter_0000004", model=model1, optimizer=opt1, pg_collection=pgs1,
                             ema=ema1.shadow)
    assert all(torch.equal(v, lora_full_state_dict(model1)[k]) for k, v in final.items())
    tp_rank = torch.distributed.get_rank(pgs.tp)
    for n, p in model1.named_parameters():
        if p.requires_grad:
            for full_t, local in ((opt1.state[p]["exp_avg"], exp_avg[n]), (ema1.shadow[n], ema_at[4][n])):
                if local.shape != full_t.shape:  # the TP=2 shard of this rank
                    dim = [i for i in range(local.dim()) if local.shape[i] != full_t.shape[i]][0]
                    full_t = full_t.chunk(2, dim=dim)[tp_rank]
                assert torch.equal(full_t, local), n
            assert opt1.state[p]["step"].item() == 4
    # a truncated shard in the newest checkpoint: rank 0 finds it before any rank loads, every rank falls back
    from kvpo_megatron.checkpoint.training import select_checkpoint
    torch.distributed.barrier()
    if rank == 0:
        shard = sorted((Path(root) / "iter_0000004").glob("*.distcp"))[-1]
        shard.write_bytes(shard.read_bytes()[:-7])
    torch.distributed.barrier()
    assert select_checkpoint(cfg).name == "iter_0000003"
    assert (Path(root) / "iter_0000004.damaged").is_dir()


def test_training_checkpoint_resume_is_exact_and_reshards(tmp_path):
    run_workers(_training_worker, 2, str(tmp_path / "train"), tiny_full_state_dict(0))


def test_checkpoint_config_validation():
    from kvpo_megatron.checkpoint.training import CheckpointConfig, find_latest_checkpoint

    with pytest.raises(ConfigError, match="checkpoint.keep_last must be an integer >= 1, got 0"):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ConfigError, match="checkpoint.every"):
        CheckpointConfig(every=-1)
    assert find_latest_checkpoint(CheckpointConfig(dir="/nonexistent", resume="never")) is None
    assert find_latest_checkpoint(CheckpointConfig(dir=os.devnull + "_nope")) is None
    with pytest.raises(ConfigError, match="no complete checkpoint there"):
        find_latest_checkpoint(CheckpointConfig(resume="/nonexistent/iter_0000001"))
