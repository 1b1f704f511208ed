"""Pipelined KVPO iteration (train.overlap): bitwise equal to the sequential one, and it overlaps.

The reference is the sequential trainer step (train.overlap=false) in the same process, which the rest of the
suite checks against single-process and parallel references.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from kvpo_megatron.config import deep_merge, from_dict, parse_overrides
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.kvpo.pipeline import (GuardedModel, ModelGuard, Timeline, check_overlap_supported,
                                         run_overlapped)
from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
from kvpo_megatron.kvpo.trainer import KVPOTrainer
from kvpo_megatron.lora import lora_full_state_dict


def _trainer(tmp_path, name, *overrides):
    return KVPOTrainer(from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, parse_overrides([
        f"train.out_dir={tmp_path / name}", "train.progress=false", "objective.guard=false",
        "rollout.merge_lora=false", *overrides]))))


def _rollouts(trainer):
    out = []
    for r in trainer.last_results:
        g = r.group
        out.append({"prompt": g.prompt_index, "pivot": g.pivot, "forwards": g.forwards, "anchor": g.anchor.latents,
                    "branches": [(b.branch, b.latents, b.routes, b.commit_frames, b.tve_old, b.tve_ref,
                                  [(t.block, t.step, t.x, t.v_target) for t in b.tuples]) for b in g.branches],
                    "adv": r.adv, "coeffs": r.coeffs, "loss": r.terms.total.detach()})
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("groups", [2, 3])
def test_pipelined_iterations_equal_sequential_bitwise(tmp_path, groups):
    """Two iterations (the second after an AdamW step): LoRA, metrics and rollouts identical bit for bit."""
    runs = {}
    for overlap in (False, True):
        tr = _trainer(tmp_path, f"run{overlap}", "train.iterations=2", f"data.prompts_per_rank={groups}",
                      f"train.overlap={str(overlap).lower()}")
        lora0 = {k: v.clone() for k, v in lora_full_state_dict(tr.model).items()}
        hist = tr.train()
        runs[overlap] = (tr, lora0, hist)
    (seq, lora0, h_seq), (pip, _, h_pip) = runs[False], runs[True]
    la, lb = lora_full_state_dict(seq.model), lora_full_state_dict(pip.model)
    assert max((la[k] - lora0[k]).abs().max().item() for k in la) > 1e-4  # the LoRA did move
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    strip = lambda h: [{k: v for k, v in row.items() if not k.startswith("time_")} for row in h]  # noqa: E731
    assert strip(h_seq) == strip(h_pip)
    assert len(pip.last_results) == groups and _same(_rollouts(seq), _rollouts(pip))

    # the timeline: rollout(j+1) ran while replay(j) ran, and every phase of a group follows its rollout
    tl = pip.last_timeline
    for j in range(groups - 1):
        assert tl.overlaps("rollout", j + 1, "replay", j) > 0, tl.to_dict()
    spans = {(s.phase, s.group): s for s in tl.spans}
    for j in range(groups):
        assert spans[("reward", j)].start >= spans[("rollout", j)].end
        assert spans[("replay", j)].start >= spans[("coefficients", j)].end >= spans[("reward", j)].end
    assert h_pip[-1]["time_overlap_saved"] > 0 and h_pip[-1]["time_pipeline"] > 0
    rows = [json.loads(line) for line in (tmp_path / "runTrue" / "timeline.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert {(p, g) for p, g, _, _ in rows[-1]["spans"]} == {(p, g) for p in ("rollout", "reward", "coefficients",
                                                                              "replay") for g in range(groups)}


def test_reference_policy_excludes_replay_forwards():
    """While the rollout thread has the adapters disabled, a replay forward waits (and then sees them enabled)."""
    class Model:
        disabled = False
        seen: list = []

        def __call__(self, x):
            self.seen.append(self.disabled)
            return x

        def encode_text(self, x):
            self.seen.append(self.disabled)
            return x

    @contextmanager
    def disable(model):
        model.disabled = True
        try:
            yield
        finally:
            model.disabled = False

    model = Model()
    guard = ModelGuard(model, disable)
    replay_model = GuardedModel(model, guard)
    inside = threading.Event()

    def rollout_thread():
        with guard.reference():
            inside.set()
            time.sleep(0.2)

    t = threading.Thread(target=rollout_thread)
    t.start()
    inside.wait()
    replay_model(1)
    replay_model.encode_text(2)
    t.join()
    assert model.seen == [False, False]


def test_run_overlapped_order_threads_and_failures():
    main = threading.get_ident()
    log = []

    def produce(j):
        time.sleep(0.02)
        log.append(("p", j, threading.get_ident() == main))
        return j * 10

    def consume(j, item):
        log.append(("c", j, threading.get_ident() == main))
        return item + 1

    tl = Timeline()
    assert run_overlapped(4, produce, consume, device=torch.device("cpu"), timeline=tl) == [1, 11, 21, 31]
    assert [e[1] for e in log if e[0] == "c"] == [0, 1, 2, 3]
    assert all(e[2] for e in log if e[0] == "p") and not any(e[2] for e in log if e[0] == "c")
    assert tl.wall > 0

    produced = []

    def slow_produce(j):
        produced.append(j)
        time.sleep(0.25)
        return j

    def failing(j, item):  # fails while group 1 is being produced
        time.sleep(0.05)
        raise ValueError(f"group {j} failed")

    with pytest.raises(ValueError, match="group 0 failed"):
        run_overlapped(6, slow_produce, failing, device=torch.device("cpu"))
    assert produced == [0, 1]  # no group is produced after the failure is known


def test_overlap_refused_where_not_exact(tmp_path):
    ok = dict(tp=1, cp=1, te_spec=False, merge_lora=False, cuda_graphs=False)
    for bad, match in ((dict(tp=2), "tensor_model_parallel_size"), (dict(cp=2), "context_parallel_size"),
                       (dict(te_spec=True), "'te'"), (dict(merge_lora=True), "rollout.merge_lora"),
                       (dict(cuda_graphs=True), "model.cuda_graphs")):
        with pytest.raises(ConfigError, match=match):
            check_overlap_supported(**{**ok, **bad})
    check_overlap_supported(**ok)
    with pytest.raises(ConfigError, match="rollout.merge_lora"):
        _trainer(tmp_path, "merged", "train.overlap=true", "rollout.merge_lora=true")


def _alternate_modes(tmp_path, *overrides) -> dict[str, list[dict]]:
    """One trainer (lr 0), the same prompts and iteration each step: two sequential steps, then a pipelined one.

    Returns per mode the rollouts and the accumulated LoRA gradient. The second sequential step is the
    control: it shows how far two runs of the same work differ on this device.
    """
    tr = _trainer(tmp_path, "alt", "train.overlap=true", "optim.lr=0.0", *overrides)
    cursor, out = tr.loader.cursor, {}
    for mode, overlap in (("sequential", False), ("control", False), ("pipelined", True)):
        tr.cfg.train.overlap = overlap
        tr.loader.cursor = cursor
        tr.step()  # tr.iteration stays 0: the same pivots, noise and routes every time
        out[mode] = {"rollouts": _rollouts(tr), "grad": torch.cat([p.grad.detach().flatten() for p in tr.params])}
    out["timeline"] = tr.last_timeline
    return out


@pytest.mark.gpu
def test_pipelined_iteration_equals_sequential_on_gpu(tmp_path):
    """CUDA streams: the worker's stream waits for each rollout and the update waits for the worker.

    Same trainer and work in both modes: separately built trainers are not compared, since fp32 SDPA backward
    (memory-efficient kernel) is not deterministic on CUDA and Adam's first step (~lr * sign(g)) would
    amplify that run-to-run noise in the updated weights.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res = _alternate_modes(tmp_path, "data.prompts_per_rank=3", "video.latent_height=16", "video.latent_width=16")
    seq, ctl, pip = res["sequential"], res["control"], res["pipelined"]
    for a, b in zip(seq["rollouts"], pip["rollouts"]):  # forward-only work: equal to fp32 round-off
        assert a["pivot"] == b["pivot"] and a["forwards"] == b["forwards"]
        assert (a["anchor"] - b["anchor"]).abs().max() <= 1e-6
        for x, y in zip(a["branches"], b["branches"]):
            assert (x[1] - y[1]).abs().max() <= 1e-6 and x[2] == y[2] and abs(x[4] - y[4]) <= 1e-6 * max(1, x[4])
        assert (a["loss"] - b["loss"]).abs() <= 1e-6
    rel = lambda u, v: float((u - v).norm() / v.norm())  # noqa: E731
    assert rel(pip["grad"], seq["grad"]) <= max(1e-5, 2 * rel(ctl["grad"], seq["grad"]))
    tl = res["timeline"]
    assert all(tl.overlaps("rollout", j + 1, "replay", j) > 0 for j in range(2)), tl.to_dict()
