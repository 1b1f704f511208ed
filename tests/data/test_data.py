"""Prompt files, sharded resumable loader, embedding store (+ precompute tool), rollout archive."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpo_megatron.conditioning import HashTextEncoder, TextEncoderConfig, build_text_encoder
from kvpo_megatron.data import DataError, EmbeddingStore, PromptDataset, PromptLoader, RolloutArchive, read_archive
from kvpo_megatron.errors import ConfigError
from tests.cli_utils import load_script

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    return load_script("tools/precompute_text_embeddings.py")


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def jsonl(tmp_path: Path, rows: list) -> Path:
    return write(tmp_path, "p.jsonl", "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


# ----------------------------------------------------------------------------- prompt files
def test_plain_text_prompts(tmp_path):
    p = write(tmp_path, "p.txt", "a cat\n\n# comment\n  a dog  \n")
    ds = PromptDataset(p, num_frames=21)
    assert [s.prompts for s in ds.samples] == [["a cat"], ["a dog"]]
    assert ds[1].switch_frames == [] and ds[1].index == 1
    assert ds[0].segments(21) == [(0, 21)]


def test_jsonl_switch_frames_interval_and_even_split(tmp_path):
    p = write(tmp_path, "even.jsonl", "\n".join(json.dumps(r) for r in [
        {"prompts": ["a", "b", "c", "d"], "switch_frames": [3, 6, 9]}, {"prompts": ["e", "f", "g", "h", "i"]},
        {"prompt": "single"}]))
    # the paper's long setting: 4 segments switching every 147 latent frames
    ds = PromptDataset(jsonl(tmp_path, [{"prompts": ["a", "b", "c", "d"], "switch_frames": [147, 294, 441]},
                                        {"prompts": ["e", "f", "g", "h", "i"]}]),
                       num_frames=588, num_segments=4, switch_interval=147)
    assert ds[0].switch_frames == [147, 294, 441]
    assert ds[1].prompts == ["e", "f", "g", "h"] and ds[1].switch_frames == [147, 294, 441]
    assert ds[0].segments(588) == [(0, 147), (147, 294), (294, 441), (441, 588)]
    even = PromptDataset(p, num_frames=12)
    assert even[1].switch_frames == [2, 4, 7, 9] and even[2].prompts == ["single"] and even[2].switch_frames == []
    assert PromptDataset(p, num_frames=12).unique_prompts()[:2] == ["a", "b"]


@pytest.mark.parametrize("content, kwargs, message", [
    ("", {}, "is empty"),
    ("\n   \n# only a comment\n", {}, "is empty"),
    ('{"prompts": ["a"]}\n{"prompts": ["b",]}\n', {}, "p.jsonl:2: bad JSON line"),
    ('{"prompts": ["a"]}\n[1, 2]\n', {}, "p.jsonl:2: expected a JSON object"),
    ('{"prompts": []}\n', {}, "p.jsonl:1: 'prompts' must be a non-empty list"),
    ('{"prompts": ["a", "b"]}\n{"prompts": ["c"]}\n', {"num_segments": 2}, "p.jsonl:2: too few segments: 1"),
    ('{"prompts": ["a", "b"], "switch_frames": [30]}\n', {}, "p.jsonl:1: switch index 30 (segment 2) is beyond"),
    ('{"prompts": ["a", "b", "c"], "switch_frames": [8, 4]}\n', {}, "must be increasing"),
    ('{"prompts": ["a", "b", "c"], "switch_frames": [8]}\n', {}, "1 switch_frames for 3 prompts"),
    ('{"prompts": ["a", "b", "c", "d"]}\n', {"switch_interval": 8}, "switch index 24 (segment 4) is beyond"),
])
def test_prompt_file_errors(tmp_path, content, kwargs, message):
    p = write(tmp_path, "p.jsonl", content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PromptDataset(p, num_frames=21, **kwargs)


def test_plain_text_too_few_segments_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"p.txt:1: too few segments: 1 prompt\(s\), num_segments=4 .*use JSONL"):
        PromptDataset(write(tmp_path, "p.txt", "a cat\n"), num_frames=600, num_segments=4)
    with pytest.raises(DataError, match="prompt file not found: .*nope.txt"):
        PromptDataset(tmp_path / "nope.txt", num_frames=21)
    assert issubclass(DataError, ConfigError)


# ----------------------------------------------------------------------------- loader
def _loaders(ds, world, seed=7, ppr=2):
    return [PromptLoader(ds, dp_rank=r, dp_size=world, seed=seed, prompts_per_rank=ppr) for r in range(world)]


def test_loader_sharding_deterministic_disjoint_and_resumable(tmp_path):
    ds = PromptDataset(write(tmp_path, "p.txt", "\n".join(f"prompt {i}" for i in range(24))), num_frames=4)
    a, b = _loaders(ds, 3), _loaders(ds, 3)
    steps = [[[s.index for s in ld.next()] for ld in a] for _ in range(4)]  # one epoch: 4 steps x 3 ranks x 2
    assert steps == [[[s.index for s in ld.next()] for ld in b] for _ in range(4)]  # deterministic
    flat = [i for step in steps for rank in step for i in rank]
    assert sorted(flat) == list(range(24))  # disjoint across ranks, whole epoch covered
    assert flat != list(range(24))  # shuffled
    other_seed = [[s.index for s in ld.next()] for ld in _loaders(ds, 3, seed=8)]
    assert other_seed != steps[0]
    # epoch 2 is a different permutation, still a partition
    ep2 = [i for _ in range(4) for ld in a for i in (s.index for s in ld.next())]
    assert sorted(ep2) == list(range(24)) and ep2 != flat
    # resume from the cursor: a fresh loader continues exactly where the saved one stopped
    fresh = _loaders(ds, 3)
    for ld, old in zip(fresh, a):
        ld.load_state_dict(old.state_dict())
    assert [[s.index for s in ld.next()] for ld in fresh] == [[s.index for s in ld.next()] for ld in a]
    # resume with another dp_size: global positions continue, no prompt skipped or repeated in the epoch
    two = _loaders(ds, 2, ppr=3)
    for ld in two:
        ld.load_state_dict(a[0].state_dict())
    assert two[0].cursor == a[0].cursor


def test_loader_state_mismatch_and_bad_rank(tmp_path):
    ds = PromptDataset(write(tmp_path, "p.txt", "a\nb\nc\n"), num_frames=4)
    ld = PromptLoader(ds, dp_rank=0, dp_size=1, seed=1)
    ld.next()
    other = PromptLoader(ds, dp_rank=0, dp_size=1, seed=2)
    with pytest.raises(DataError, match="saved seed=1, now 2"):
        other.load_state_dict(ld.state_dict())
    with pytest.raises(DataError, match="dp_rank=2, dp_size=2"):
        PromptLoader(ds, dp_rank=2, dp_size=2, seed=0)


# ----------------------------------------------------------------------------- embedding store
def test_embedding_store_round_trip_resume_and_hash_mismatch(tmp_path):
    prompts_file = jsonl(tmp_path, [{"prompts": ["a red car", "a blue car"]}, {"prompts": ["a red car", "a boat"]},
                                    {"prompt": "a dog running on grass"}])
    out = tmp_path / "store"
    tool = _tool()
    args = ["--encoder", "hash", "--text-len", "16", "--text-dim", "8", "--dtype", "float32", "--batch-size", "2",
            "--no-progress"]
    # a partial store (as if interrupted): only the first prompt written
    prompts = ["a red car", "a blue car", "a boat", "a dog running on grass"]
    enc = HashTextEncoder(text_len=16, text_dim=8)
    partial = EmbeddingStore.create_or_resume(out, prompts, text_len=16, text_dim=8, dtype="float32",
                                              encoder="hash(seed=0)")
    partial.write(0, *enc.encode(prompts[:1]))
    with pytest.raises(DataError, match="incomplete: 3 of 4 prompts not encoded"):
        EmbeddingStore.open(out)
    assert tool.main([str(prompts_file), "--out", str(out), *args]) == 0  # resumes
    store = EmbeddingStore.open(out, prompts_file=prompts_file)
    emb, lengths = store.lookup(["a boat", "a red car"])
    ref_emb, ref_len = enc.encode(["a boat", "a red car"])
    torch.testing.assert_close(emb, ref_emb, rtol=0, atol=0)
    assert lengths.tolist() == ref_len.tolist() == [3, 4]
    # training reads through the text-encoder interface
    te = build_text_encoder(TextEncoderConfig(kind="store", store=str(out), prompts=str(prompts_file),
                                              text_len=16, text_dim=8))
    torch.testing.assert_close(te.encode(["a blue car"])[0], enc.encode(["a blue car"])[0])
    with pytest.raises(DataError, match="prompt not in embedding store"):
        store.lookup(["a submarine"])
    # the prompt file changed after precompute -> clear hash-mismatch error
    changed = jsonl(tmp_path, [{"prompts": ["a red car", "a green car"]}, {"prompts": ["a red car", "a boat"]},
                               {"prompt": "a dog running on grass"}])
    with pytest.raises(DataError, match=r"does not match .*p.jsonl: hash mismatch at prompt 1 \('a green car'\)"):
        EmbeddingStore.open(out, prompts_file=changed)
    with pytest.raises(DataError, match="hash mismatch"):
        build_text_encoder(TextEncoderConfig(kind="store", store=str(out), prompts=str(changed), text_len=16,
                                             text_dim=8))
    # resuming into the store with a different prompt file is refused too
    assert tool.main([str(changed), "--out", str(out), *args]) == 2


def test_embedding_store_bfloat16_and_missing(tmp_path):
    p = write(tmp_path, "p.txt", "one prompt\nanother prompt here\n")
    tool = _tool()
    assert tool.main([str(p), "--out", str(tmp_path / "s"), "--encoder", "hash", "--text-len", "8",
                      "--text-dim", "4", "--no-progress"]) == 0
    emb, lengths = EmbeddingStore.open(tmp_path / "s", prompts_file=p).lookup(["another prompt here"])
    ref, _ = HashTextEncoder(text_len=8, text_dim=4).encode(["another prompt here"])
    torch.testing.assert_close(emb, ref, rtol=1e-2, atol=1e-2)
    assert emb.dtype == torch.float32 and lengths.tolist() == [4] and emb[0, 4:].abs().sum() == 0
    with pytest.raises(DataError, match="embedding store not found: .*nowhere"):
        EmbeddingStore.open(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- rollout archive
def test_rollout_archive_write_read(tmp_path):
    root = tmp_path / "archive"
    latents = torch.randn(4, 16, 3, 2, 2, dtype=torch.bfloat16)
    routing = torch.tensor([[0, 1, 5], [0, 2, 5]])
    with RolloutArchive(root) as arch:
        for it in range(3):
            arch.write(it, {
                "branch_latents": latents + it, "anchor_latents": latents[:1],
                "rewards": {"brightness": torch.full((4,), float(it)), "motion": np.arange(4, dtype=np.float32)},
                "advantages.brightness": torch.linspace(-1, 1, 4), "tve": torch.randn(4, 6), "pivot": 2 + it,
                "routing_indices": routing, "kl": 0.125,
            })
            latents.add_(100.0)  # the caller may reuse its buffers right after write()
    reader = read_archive(root)
    assert reader.iterations() == [0, 1, 2]
    assert reader.keys(1) == sorted(["anchor_latents", "advantages.brightness", "branch_latents", "kl", "pivot",
                                     "rewards.brightness", "rewards.motion", "routing_indices", "tve"])
    rec = reader.load(1)
    expected = (latents - 300.0 + 100.0 + 1).float().numpy()
    np.testing.assert_allclose(rec["branch_latents"].astype(np.float32), expected, atol=1.0)
    assert str(rec["branch_latents"].dtype) == "bfloat16" and rec["branch_latents"].shape == (4, 16, 3, 2, 2)
    assert int(rec["pivot"]) == 3 and float(rec["kl"]) == 0.125
    np.testing.assert_array_equal(rec["routing_indices"], routing.numpy())
    np.testing.assert_array_equal(rec["rewards.brightness"], np.ones(4, dtype=np.float32))
    assert reader.load(2, keys=["pivot"]) == {"pivot": np.asarray(4)}
    with pytest.raises(DataError, match="iteration 7 is missing"):
        reader.load(7)


def test_rollout_archive_async_errors_and_incomplete(tmp_path):
    arch = RolloutArchive(tmp_path / "a", max_pending=1)
    t0 = time.perf_counter()
    arch.write(0, {"x": torch.zeros(64, 64)})
    assert time.perf_counter() - t0 < 5.0
    with pytest.raises(TypeError, match=r"record\['name'\] has unsupported type str"):
        arch.write(1, {"name": "not a tensor"})
    with pytest.raises(ValueError, match="key 'bad/key'"):
        arch.write(1, {"bad/key": 1})
    arch.close()
    (tmp_path / "a" / "iter_00000005").mkdir()  # a write that never finished (no record.json)
    assert read_archive(tmp_path / "a").iterations() == [0]
    with pytest.raises(RuntimeError, match="after close"):
        arch.write(2, {"x": 1})
    with pytest.raises(DataError, match="rollout archive not found"):
        read_archive(tmp_path / "missing")
