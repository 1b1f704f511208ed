"""kvpo/memory_model.py against measured tensor sizes of a small model (one process; TP=2 and CP=2 are measured in
tests/parallel/test_kvpo_layouts.py's spawned group), its predictions' consistency, and the tools/memory_model.py CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kvpo_megatron.benchmarks import memory as cli
from kvpo_megatron.kvpo import memory_model as mm
from tests.memory_probe import PROBE_SHAPES as S
from tests.memory_probe import probe


M = mm.model_sizes("tiny", hidden_size=S["d"], ffn_hidden_size=S["f"], text_len=S["text_len"],
                   num_attention_heads=S["heads"], num_layers=1)
PLAN = mm.MemoryPlan(preset="tiny", latent_hw=(S["lh"], S["lw"]), local=S["local"], lora_rank=S["r"])


def test_formulas_equal_measured_sizes_tp1(pgs):
    """bf16 model (the memory model's compute dtype), LayerNorms float32 as the benches cast them."""
    one, two = probe(pgs, layers=1, dtype=torch.bfloat16), probe(pgs, layers=2, dtype=torch.bfloat16)
    # replay activations: autograd's saved tensors of one block-step, per layer (the model-level text embedding
    # output, the only term outside the layers, is what remains)
    per_layer = mm.activation_bytes_per_layer(PLAN, M, cached_frames=one["cached_frames"])
    assert two["activation_bytes"] - one["activation_bytes"] == per_layer
    assert one["activation_bytes"] - per_layer == S["text_len"] * S["d"] * 2
    n, ln = mm.weight_params(M, 1)
    lora = mm.lora_params(M, S["r"], PLAN.lora_targets, 1)
    assert one["lora_params"] == lora and two["lora_params"] == 2 * lora
    assert one["param_bytes"] == (n - ln) * 2 + ln * 4 + lora * 2  # LayerNorm affine stays float32
    assert one["kv_bytes"] == mm.kv_bytes_per_frame(PLAN, M) * one["kv_slots"] and one["kv_slots"] == 33


def test_presets_and_predictions():
    # parameter counts of the real architectures (Wan2.1 1.3B: 1.42e9, 14B: 14.3e9 with the text/time MLPs)
    assert mm.weight_params(mm.model_sizes("wan-1.3b"), 1)[0] == pytest.approx(1.419e9, rel=1e-3)
    assert mm.weight_params(mm.model_sizes("wan-14b"), 1)[0] == pytest.approx(14.288e9, rel=1e-3)
    # the one GPU measurement of a whole iteration (tools/BENCHMARKS.md, the engine before paged caches: 43.5 GB
    # peak, 1.3B, 147 frames, G=8, W=5, bf16 model and LoRA) is predicted within 5%
    legacy = mm.predict(mm.MemoryPlan(cache="legacy", lora_bytes=2, ema=False))  # measured before the EMA existed
    assert legacy["peak_gb"] == pytest.approx(43.5, rel=0.05)
    # KV cache per frame, 1.3B at 480x832: 30 layers x 1560 tokens x 2 x 1536 x 2 bytes
    base = mm.predict(mm.MemoryPlan())
    assert base["kv_per_frame_gb"] == pytest.approx(30 * 1560 * 2 * 1536 * 2 / 1e9, abs=1e-3)
    # sharding divides what it shards and nothing else
    tp2 = mm.predict(mm.MemoryPlan(tp=2))
    assert tp2["kv_per_frame_gb"] == pytest.approx(base["kv_per_frame_gb"] / 2, abs=1e-3)
    assert base["weights_gb"] / 2 < tp2["weights_gb"] < base["weights_gb"] * 0.52  # embeddings are replicated
    cp2 = mm.predict(mm.MemoryPlan(cp=2))
    assert cp2["weights_gb"] == base["weights_gb"] and cp2["kv_per_frame_gb"] == tp2["kv_per_frame_gb"]
    # recompute and smaller batches trade memory, as they should
    full = mm.predict(mm.MemoryPlan(replay_batch=2, recompute="none"))
    rc = mm.predict(mm.MemoryPlan(replay_batch=2, recompute="blocks"))
    assert rc["replay_activations_gb"] < full["replay_activations_gb"] / 5
    big = mm.predict(mm.MemoryPlan(kv_budget_gb=48))
    # 48 GB hold the prefix (33 frames, 9.5 GB) and 8 rings of 15 frames, not 9: the 9 samples run as 5 + 4
    assert big["rollout_batch"] == 5
    assert mm.predict(mm.MemoryPlan(kv_budget_gb=60))["rollout_batch"] == 9  # 9 rings fit: one batch
    assert mm.predict(mm.MemoryPlan(kv_budget_gb=24))["rollout_batch"] == 3  # 3 rings: 3 + 3 + 3
    small = mm.predict(mm.MemoryPlan(kv_budget_gb=48, branch_batch=2))
    assert small["rollout_cache_gb"] < big["rollout_cache_gb"] and small["rollout_batch"] == 2


def test_ema_te_context_and_the_14b_measurement():
    """Terms found in a GPU memory snapshot of the 14B TP=2 iteration (tools/BENCHMARKS.md, sixth session)."""
    plan = mm.MemoryPlan(preset="wan-14b", tp=2, frames=27, pivot=4, branch_batch=1, replay_batch=4,
                         recompute="blocks")
    base = mm.predict(plan)
    assert base["ema_gb"] == pytest.approx(4 * base["lora_params_per_gpu"] / 1e9, abs=1e-3)
    assert mm.predict(mm.MemoryPlan(ema=False))["ema_gb"] == 0
    te = mm.predict(dataclasses.replace(plan, spec="te"))
    # every layer but the one the forward workspace counts keeps [batch, sink + local frames] of K and V
    assert te["te_context_gb"] == pytest.approx(39 * 1 * 2 * 2 * 12 * 1560 * 5120 / 2 / 1e9, abs=1e-3)
    assert te["peak_rollout_gb"] == pytest.approx(base["peak_rollout_gb"] + te["te_context_gb"], abs=2e-3)
    assert te["peak_replay_gb"] == base["peak_replay_gb"]  # a commit frees it: the replay holds none
    assert mm.predict(dataclasses.replace(plan, spec="te", cuda_graphs=True))["te_context_gb"] == 0
    assert base["te_context_gb"] == 0
    # measured in a first iteration (AdamW's two states and the .grad do not exist yet): rollout 79.6 GB per GPU
    first = te["peak_rollout_gb"] - 3 * 4 * te["lora_params_per_gpu"] / 1e9
    assert first == pytest.approx(79.6, rel=0.05)


def test_fit_finds_a_cheaper_plan():
    plan = mm.MemoryPlan(preset="wan-14b", tp=2, branch_batch=9, kv_budget_gb=500, replay_batch=13,
                         recompute="blocks")
    assert mm.predict(plan)["peak_gb"] > 140
    found, pred = mm.fit(plan, 140)
    assert pred["peak_gb"] <= 140 and found != plan
    assert mm.fit(dataclasses.replace(plan, preset="wan-14b", tp=1, cp=1, branches=64), 10) is None


def test_cli_prints_json_lines(capsys):
    rows = cli.main(["--scenarios"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in lines] == list(cli.SCENARIOS) == [r["name"] for r in rows]
    assert all(r["peak_gb"] == max(r["peak_rollout_gb"], r["peak_replay_gb"]) for r in lines)
    one = cli.main(["--preset", "wan-14b", "--tp", "2", "--frames", "21", "--replay-batch", "4", "--recompute",
                    "blocks", "--fit"])[0]
    assert one["plan"]["tp"] == 2 and one["replay_batch"] == 4 and one["replay_recompute"] and one["fits"]
    with pytest.raises(SystemExit):
        cli.main(["--cache", "nope"])
    with pytest.raises(SystemExit):
        cli.main(["--spec", "TE"])  # a misspelt spec would otherwise drop the TE context term silently
