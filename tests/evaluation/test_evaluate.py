"""tools/evaluate.py on the tiny default: the HTML report names videos and tables that exist and whose numbers
match the CSV; the evaluated weights are the trained ones (raw and EMA); reruns resume; DP over prompts gives
the single-process results; adapters export from a training checkpoint (raw or EMA)."""
from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from kvpo_megatron.config import deep_merge, from_dict, parse_overrides
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.evaluation import load_eval_configs, run_evaluation
from kvpo_megatron.kvpo.train_config import TINY_DEFAULT, KVPOTrainConfig
from tests.cli_utils import load_script
from tests.dist_utils import run_workers

ROOT = Path(__file__).resolve().parents[2]


evaluate_tool, convert_tool = load_script("tools/evaluate.py"), load_script("tools/convert_checkpoint.py")

EVAL = ["eval.short.max_prompts=2", "eval.long.max_prompts=1", "eval.progress=false"]


class _Report(HTMLParser):
    """Video/poster sources, links, and every ``data-value`` cell/bar of the report."""

    def __init__(self):
        super().__init__()
        self.videos, self.posters, self.links, self.cells, self.bars = [], [], [], [], []
        self._table = None
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "video":
            self.videos.append(a["src"])
            self.posters.append(a["poster"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "table":
            self._table = a.get("id")
        elif tag == "tr":
            self._row = a
        elif tag == "td" and "data-value" in a:
            self.cells.append((self._table, dict(self._row), a["data-key"], float(a["data-value"])))
        elif tag == "rect" and "data-value" in a:
            self.bars.append((a["data-variant"], a["data-setting"], float(a["data-value"])))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration tiny run with checkpoints and an EMA (decay 0.5 so that it differs from the raw weights)."""
    from kvpo_megatron.kvpo.trainer import KVPOTrainer

    tmp = tmp_path_factory.mktemp("trained")
    prompt = tmp / "prompt.txt"
    prompt.write_text("a red fox running through fresh snow at dawn\n")
    cfg = from_dict(KVPOTrainConfig, deep_merge(TINY_DEFAULT, parse_overrides(
        [f"train.out_dir={tmp / 'run'}", "train.progress=false", f"data.prompts={prompt}", "train.iterations=2",
         f"checkpoint.dir={tmp / 'run' / 'ckpt'}", "checkpoint.every=1", "ema.decay=0.5", "objective.guard=false"])))
    trainer = KVPOTrainer(cfg)
    trainer.train()
    return tmp / "run", cfg, trainer


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_names_existing_videos_and_matches_the_csv(trained, tmp_path):
    run, _, _ = trained
    out = tmp_path / "eval"
    ckpt = run / "ckpt" / "iter_0000002"
    evaluate_tool.main([str(ckpt), str(run / "final_adapter_ema"), "--out", str(out), *EVAL])
    html = (out / "report.html").read_text()
    rep = _Report()
    rep.feed(html)
    labels = ["base", "iter_0000002", "iter_0000002-ema", "final_adapter_ema"]
    assert len(rep.videos) == len(labels) * 3  # 2 short prompts + 1 long prompt, one video per variant each
    for src in rep.videos + rep.posters:
        assert not Path(src).is_absolute() and (out / src).is_file() and (out / src).stat().st_size > 0, src
    for link in ("summary.csv", "results.csv", "results.json"):
        assert link in rep.links and (out / link).is_file()
    summary = {(r["variant"], r["setting"]): r for r in _csv(out / "summary.csv")}
    assert sorted(summary) == sorted((v, s) for v in labels for s in ("short", "long"))
    cells = [c for c in rep.cells if c[0] == "summary"]
    assert len(cells) == len(summary) * 4  # segments, brightness, total, total_vs_base
    for _, row, key, value in cells:
        want = float(summary[(row["data-variant"], row["data-setting"])][key])
        assert value == want or math.isnan(value) and math.isnan(want), (row, key)
    for variant, setting, value in rep.bars:  # the charts show the summary's numbers
        assert value in (float(summary[(variant, setting)]["brightness"]), float(summary[(variant, setting)]["total"]))
    rows = _csv(out / "results.csv")
    seg_cells = [c for c in rep.cells if c[0] == "segments"]
    assert len(rows) == len(labels) * (2 + 3) and len(seg_cells) == 2 * len(rows)  # long: 3 prompt segments
    by = {(r["variant"], r["setting"], r["prompt_index"], r["segment"]): r for r in rows}
    for _, row, key, value in seg_cells:
        assert value == float(by[(row["data-variant"], row["data-setting"], row["data-prompt"],
                                  row["data-segment"])][key])
    long_rows = [r for r in rows if r["setting"] == "long" and r["variant"] == "base"]
    assert [(int(r["frame_start"]), int(r["frame_end"])) for r in long_rows] == [(0, 12), (12, 24), (24, 36)]
    assert len({r["prompt"] for r in long_rows}) == 3  # each segment scored against its own prompt
    # the EMA of the last checkpoint is what final_adapter_ema holds; raw and EMA differ; base differs
    for s in ("short", "long"):
        assert summary[("iter_0000002-ema", s)]["total"] == summary[("final_adapter_ema", s)]["total"]
        assert summary[("iter_0000002", s)]["total"] != summary[("iter_0000002-ema", s)]["total"]
        assert summary[("base", s)]["total"] != summary[("iter_0000002", s)]["total"]
    # resumable: a second run generates nothing and keeps the videos; a new variant only adds its own
    stamps = {p: p.stat().st_mtime_ns for p in (out / "videos").rglob("*.mp4")}
    res = run_evaluation([str(ckpt), str(run / "final_adapter_ema")],
                                       *load_eval_configs([str(ckpt)], overrides=EVAL), out)
    assert res["generated"] == 0 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    res = run_evaluation([str(ckpt), str(run / "final_adapter_ema"), str(run / "final_adapter")],
                                       *load_eval_configs([str(ckpt)], overrides=EVAL), out)
    assert res["generated"] == 3
    meta = json.loads((out / "results.json").read_text())
    assert [v["label"] for v in meta["meta"]["variants"]] == [*labels, "final_adapter"]


def test_evaluated_weights_are_the_trained_ones(trained, tmp_path):
    """The evaluator rebuilds the trainer's base model and loads exactly its LoRA (raw and EMA) from a checkpoint."""
    from safetensors.torch import load_file

    from kvpo_megatron.checkpoint.training_adapter import load_training_adapter, read_training_adapter
    from kvpo_megatron.evaluation.config import EvalConfig
    from kvpo_megatron.evaluation.runner import Evaluator
    from kvpo_megatron.lora import PEFT_PREFIX, lora_full_state_dict

    run, cfg, trainer = trained
    ev = Evaluator(cfg, EvalConfig(), tmp_path)
    mine, theirs = dict(ev.model.named_parameters()), dict(trainer.model.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if "lora_" not in k)  # same base model
    ckpt = run / "ckpt" / "iter_0000002"
    for weights, adapter in (("raw", "final_adapter"), ("ema", "final_adapter_ema")):
        saved = load_file(str(run / adapter / "adapter_model.safetensors"))
        final = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
        load_training_adapter(ev.model, ckpt, weights)
        got = lora_full_state_dict(ev.model)
        assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in got), weights
        full = read_training_adapter(ckpt, weights)
        assert all(torch.equal(full[k], final[k]) for k in final), weights
    ema, raw = read_training_adapter(ckpt, "ema"), read_training_adapter(ckpt, "raw")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_export_adapter_from_training_checkpoint(trained, tmp_path):
    from safetensors.torch import load_file

    run, _, _ = trained
    ckpt = run / "ckpt" / "iter_0000002"
    for weights, adapter in (("raw", "final_adapter"), ("ema", "final_adapter_ema")):
        out = tmp_path / weights
        assert convert_tool.main(["export", str(ckpt), str(out), "--lora-only", "--lora-format", "peft",
                                  "--weights", weights]) == 0
        a = load_file(str(out / "adapter_model.safetensors"))
        b = load_file(str(run / adapter / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    # the default --lora-format (comfyui) of the raw weights is the run's final_lora.safetensors
    assert convert_tool.main(["export", str(ckpt), str(tmp_path / "comfy"), "--lora-only"]) == 0
    a, b = load_file(str(tmp_path / "comfy" / "lora.safetensors")), load_file(str(run / "final_lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_name_the_problem(trained, tmp_path, capsys):
    run, _, _ = trained
    with pytest.raises(ConfigError, match="neither a training checkpoint"):
        evaluate_tool.main([str(tmp_path), "--out", str(tmp_path / "e")])
    with pytest.raises(ConfigError, match="unknown config key"):
        evaluate_tool.main([str(run / "ckpt"), "--out", str(tmp_path / "e"), "eval.shrt.max_prompts=1"])
    with pytest.raises(ConfigError, match="must be a multiple of cache.frames_per_block"):
        evaluate_tool.main([str(run / "final_adapter"), "--out", str(tmp_path / "e"), "eval.short.num_frames=10"])
    assert convert_tool.main(["export", str(run / "final_adapter"), str(tmp_path / "x"), "--to", "wan",
                                    "--weights", "ema"]) == 2
    assert "--weights applies to --lora-only" in capsys.readouterr().err


def _dp_worker(rank, world, paths, out, overrides):
    from kvpo_megatron.evaluation import load_eval_configs, run_evaluation

    train_cfg, eval_cfg = load_eval_configs(paths, overrides=overrides)
    res = run_evaluation(paths, train_cfg, eval_cfg, out)
    assert res["generated"] == (2 if rank == 0 else 1), res  # 3 prompts over 2 DP ranks, one variant


def test_dp_over_prompts_matches_one_process(trained, tmp_path):
    run, _, _ = trained
    paths = [str(run / "ckpt" / "iter_0000002")]
    over = [*EVAL, "eval.base=false", "eval.weights=raw"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_evaluation(paths, *load_eval_configs(paths, overrides=over), one)
    run_workers(_dp_worker, 2, paths, str(two), over)
    a, b = _csv(one / "results.csv"), _csv(two / "results.csv")
    assert a == b and len(a) == 5
