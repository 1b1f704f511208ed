"""Benchmarks on CPU: bench_rollout on ``tiny`` prints one JSON line; FLOP formula vs torch's FLOP counter;
the plain reference model equals ours; the TE spec fails cleanly without TransformerEngine."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kvpo_megatron import flops
from kvpo_megatron.benchmarks import iteration as bench_iteration
from kvpo_megatron.benchmarks import rollout as bench_rollout
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model import CacheConfig, model_config
from tests.dist_utils import run_workers
from tests.helpers import tiny_model


def test_bench_rollout_tiny_cpu_prints_one_json_line(pgs, capsys):
    res = bench_rollout.main(["--config", "tiny", "--latent-h", "8", "--latent-w", "8", "--frames", "12",
                              "--steps", "2", "--device", "cpu", "--dtype", "fp32"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out == json.loads(json.dumps(res))
    assert out["sec_per_block"] > 0 and out["peak_mem_gb"] > 0
    assert out["video_fps"] == pytest.approx(12 / out["sec_per_block"])  # 3 latent frames x 4 video frames
    cfg = model_config("tiny")
    f = dict(batch=1, frames=3, tokens_per_frame=16, cached_frames=9)
    want = 2 * flops.forward_flops(cfg, **f)["total"] + flops.forward_flops(cfg, head=False, **f)["total"]
    assert out["tflop_per_block"] == pytest.approx(want / 1e12)
    assert out["mfu"] is None  # no known peak on CPU
    assert out["rel_err_vs_reference"] < 1e-5  # same weights, same function, float32
    assert out["speedup_vs_reference"] > 0


def test_forward_flops_match_torch_flop_counter(pgs):
    """Formula vs torch.utils.flop_counter on a streaming forward (9 cached frames + head) and a commit pass."""
    model = tiny_model(pgs).eval()
    cfg, cc = model.config, CacheConfig(history_frames=9)
    from kvpo_megatron.model import KVCache

    cache = KVCache(cc, cfg.num_layers)
    text = model.encode_text(torch.randn(1, cfg.text_len, cfg.text_dim))
    with torch.no_grad():
        for s in range(0, 12, 3):  # commits frames 0..11; frames 3..11 + sink resident
            cache_view = cache.view(cc.default_read_frames(s), write_frames=range(s, s + 3))
            model(torch.randn(1, 4, 3, 8, 8), torch.tensor([0.0]), text=text, frame_offset=s, cache=cache,
                  view=cache_view, compute_output=False)
        for head in (True, False):
            with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
                view = cache.view(cc.default_read_frames(12))
                model(torch.randn(1, 4, 3, 8, 8), torch.tensor([500.0]), text=text, frame_offset=12, cache=cache,
                      view=view, compute_output=head)
            want = flops.forward_flops(cfg, batch=1, frames=3, tokens_per_frame=16,
                                              cached_frames=len(view.read_frames), head=head)["total"]
            assert len(view.read_frames) == 9
            assert fc.get_total_flops() == pytest.approx(want, rel=1e-9)


def test_replay_flops_formula():
    cfg = model_config("wan-1.3b")
    f = dict(batch=1, frames=3, tokens_per_frame=1560, cached_frames=9)
    fwd = flops.forward_flops(cfg, **f)
    assert 27e12 < fwd["total"] < 30e12 and 0.55 < fwd["attention"] / fwd["total"] < 0.62  # ~28 TFLOP, ~59% attn
    r0 = flops.replay_flops(cfg, lora_rank=0, **f)
    assert r0 == pytest.approx(2 * fwd["linear"] + 3 * fwd["attention"])
    assert flops.replay_flops(cfg, lora_rank=256, **f) > r0


def test_te_spec_without_transformer_engine():
    from kvpo_megatron.model.te_spec import LinearGroup, te_spec

    cfg = model_config("tiny", spec="te")
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(ConfigError, match="TransformerEngine"):
            te_spec(cfg)
    else:  # with TE installed: the spec builds and names the TE modules
        spec = te_spec(cfg)
        assert "TECachedAttention" in repr(spec.block.submodules.self_attention.submodules.core_attention)
    assert {g.value for g in LinearGroup} == {"self_attn", "cross_attn", "ffn"}


# ---- tools/bench_iteration.py ----------------------------------------------------------------------------
TINY_ITER = ["--preset", "tiny", "--frames", "15", "--latent-h", "8", "--latent-w", "8", "--branches", "2",
             "--window", "1", "--lora-rank", "8", "--device", "cpu", "--dtype", "fp32"]


def _bench_iteration_worker(rank, world, base, out):
    bench_iteration.main([*TINY_ITER, "--layouts", "dp,branches,tp", "--baseline-json", base,
                          "--profile-comm", "--json-out", out])


def test_workload_counts_what_the_trainer_does(pgs, tmp_path):
    """kvpo/workload.py's pivot, window and replay tuples are what one trainer step produced."""
    from kvpo_megatron.config import deep_merge, from_dict
    from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
    from kvpo_megatron.kvpo.trainer import KVPOTrainer
    from kvpo_megatron.kvpo.workload import default_pivot, group_workload

    tree = deep_merge(TINY_DEFAULT, {"video": {"num_frames": 18}, "train": {"out_dir": str(tmp_path)},
                                     "objective": {"guard": False}})
    pivot = default_pivot(from_dict(KVPOTrainConfig, tree))
    cfg = from_dict(KVPOTrainConfig, deep_merge(tree, {"routing": {"pivot_min_block": pivot,
                                                                    "pivot_max_block": pivot}}))
    tr = KVPOTrainer(cfg)
    tr.step()
    work, group = group_workload(cfg, pivot), tr.last_results[0].group
    assert (pivot, work.blocks, work.window) == (group.pivot, 6, len(group.window)) and pivot == 4
    steps = 4 if cfg.routing.steps == "all" else 2  # routed solver steps of 4
    assert work.tuples == sum(len(b.tuples) for b in group.branches) == 4 * 2 * steps  # G * W * routed steps
    assert work.latent_frames == 3 * (4 + 5 * 2) and work.video_frames == 4 * work.latent_frames


def test_bench_iteration_layouts_scaling_comm_on_two_gloo_ranks(pgs, tmp_path, capsys):
    """1-process baseline, then dp / branches / tp on 2 ranks in one launch: one JSON line each."""
    base, out = str(tmp_path / "base.jsonl"), str(tmp_path / "scaling.jsonl")
    b = bench_iteration.main([*TINY_ITER, "--json-out", base])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(b))
    assert (b["world_size"], b["layout"], b["pivot"], b["groups_per_iteration"]) == (1, "dp", 4, 1)
    assert b["workload"]["tuples"] == 2 * 1 * 2 and b["sec_per_iteration"] > 0 and len(b["peak_mem_gb"]) == 1
    assert b["video_fps_per_gpu"] == pytest.approx(b["workload"]["video_frames"] / b["sec_per_iteration"])
    assert {"time_rollout", "time_replay", "time_update", "time_reward"} <= set(b)
    with pytest.raises(SystemExit, match="baseline workload differs"):  # a baseline of other work is refused
        bench_iteration.scaling({**b, "frames": 21}, b)

    run_workers(_bench_iteration_worker, 2, base, out)
    rows = {r["layout"]: r for r in map(json.loads, open(out))}
    assert list(rows) == ["dp", "branches", "tp"]
    want = {"dp": (1, 1, 2, "weak", 2), "branches": (1, 1, 2, "strong", 1), "tp": (2, 1, 1, "strong", 1)}
    for name, r in rows.items():
        assert (r["tp"], r["cp"], r["dp"], r["scaling"], r["groups_per_iteration"]) == want[name]
        assert r["world_size"] == 2 and len(r["peak_mem_gb"]) == 2 and len(r["comm_s"]) == 2
        assert [sorted(p) == sorted(r["rank_phases"][0]) and "time_rollout" in p for p in r["rank_phases"]] == [True] * 2
        assert r["speedup"] == pytest.approx(r["groups_per_iteration"] * b["sec_per_iteration"] /
                                             r["sec_per_iteration"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / 2)
        assert r["tuples_per_s_per_gpu"] == pytest.approx(
            r["groups_per_iteration"] * 4 / r["sec_per_iteration"] / 2)
        assert r["sec_per_iteration"] == max(r["step_s"]) and r["comm_calls"] > 0
    # FLOPs per GPU: a DP rank does one group's work; a TP rank half of the one group's (the engine's count is the
    # model's, recorded on both ranks of the TP group)
    assert b["tflop_per_gpu"] > 0 and rows["dp"]["tflop_per_gpu"] == pytest.approx(b["tflop_per_gpu"])
    assert rows["tp"]["tflop_per_gpu"] == pytest.approx(b["tflop_per_gpu"] / 2)
    # TP all-reduces in every layer: far more collectives than DP's few per iteration
    assert rows["tp"]["comm_calls"] > 10 * rows["dp"]["comm_calls"] and max(rows["tp"]["comm_s"]) > 0


def test_bench_iteration_layout_names():
    p = bench_iteration.parse_layout
    assert p("dp", 8) | {} == {"name": "dp", "tp": 1, "cp": 1, "branches_over_dp": False, "cp_attention": "auto",
                               "dp": 8, "dp_prompts": 8}
    assert [p("tp", 8)[k] for k in ("tp", "cp", "dp", "dp_prompts")] == [8, 1, 1, 1]
    assert [p("tp4-branches", 8)[k] for k in ("tp", "dp", "dp_prompts")] == [4, 2, 1]
    assert [p("tp2-cp", 8)[k] for k in ("tp", "cp", "dp")] == [2, 4, 1]
    assert p("cp2-allgather", 2)["cp_attention"] == "allgather"
    for bad in ("tp3", "pp2", "tp-cp"):
        with pytest.raises(SystemExit):
            p(bad, 8)


def test_bench_tools_take_the_longlive2_generator_layout(pgs, capsys):
    """--generator longlive2-5b: blocks of 8, a 32-frame span and UniPC in bench_rollout (ours == the plain
    reference) and bench_iteration, here on the tiny Wan2.2-shaped model with small latents."""
    res = bench_rollout.main(["--config", "tiny-wan2.2", "--generator", "longlive2-5b", "--latent-h", "4",
                              "--latent-w", "4", "--frames", "40", "--device", "cpu", "--dtype", "fp32"])
    assert (res["frames_per_block"], res["span_frames"], res["steps"], res["sampler"]) == (8, 32, 4, "unipc")
    assert res["steady_blocks"] == 2 and res["rel_err_vs_reference"] < 1e-5  # blocks 3, 4 see the full span
    assert res["video_fps"] == pytest.approx(32 / res["sec_per_block"])
    it = bench_iteration.main(["--generator", "longlive2-5b", "--preset", "tiny-wan2.2", "--frames", "40",
                               "--latent-h", "4", "--latent-w", "4", "--branches", "2", "--window", "1",
                               "--lora-rank", "4", "--device", "cpu", "--dtype", "fp32"])
    assert (it["preset"], it["generator"], it["frames"], it["latent"]) == ("tiny-wan2.2", "longlive2-5b", 40, [4, 4])
    assert it["time_rollout"] > 0
    with pytest.raises(SystemExit, match="multiple of 8"):
        bench_rollout.main(["--config", "tiny-wan2.2", "--generator", "longlive2-5b", "--frames", "12",
                            "--device", "cpu"])


def test_bench_iteration_profiles_the_replay_phase(pgs, tmp_path):
    """--profile-replay profiles tuple batches of the gradient phase (the rollout's no-grad scoring runs the same
    forward first, so the window must be placed by the phase, not by the forward's call count): the host table
    holds autograd's backward, and the per-batch wall and busy fraction come back in the JSON."""
    path = tmp_path / "replay_prof.txt"
    res = bench_iteration.main(["--preset", "tiny", "--frames", "24", "--latent-h", "8", "--latent-w", "8",
                                "--branches", "4", "--window", "3", "--lora-rank", "4", "--device", "cpu",
                                "--dtype", "fp32", "--profile-replay", str(path), "replay.batch_size=1"])
    table = (tmp_path / "replay_prof.txt.rank0").read_text()
    assert "autograd::engine::evaluate_function" in table and "kvpo::cached_attention_bwd" in table
    assert 0 < res["replay_profile_wall_s"] < res["time_replay"]
    assert res["replay_profile_busy"] == 0.0  # no device kernels on the CPU
