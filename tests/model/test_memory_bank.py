"""MemFlow's memory bank (issue 9): bookkeeping against a hand-worked table, compression on hand-built tensors,
attended frames = sink + bank + local (KVPO with the bank: tests/kvpo/test_memory_bank_kvpo.py; TP/CP:
tests/parallel/test_memory_bank_layouts.py)."""
from __future__ import annotations

import dataclasses
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kvpo_megatron.config import from_dict
from kvpo_megatron.errors import ConfigError
from kvpo_megatron.model import CacheConfig, KVCache, TextKV
from kvpo_megatron.model.kv_cache import LayerKV
from kvpo_megatron.model.memory_bank import (LOCAL, MemoryBankConfig, ScoreReduction, bank_scores, keep_indices,
                                             update_after_commit)
from kvpo_megatron.presets import GENERATE_SECTIONS, generator_preset
from kvpo_megatron.sampling import FlowMatchSampler, PromptSwitch, SamplerConfig, StreamingGenerator
from tests.helpers import tiny_model

log = logging.getLogger(__name__)
T_TOK, HEADS, HDIM = 4, 2, 4  # tokens per frame, heads, head dim of the hand-built tensors
U = torch.full((HEADS, HDIM), 1 / math.sqrt(HDIM))  # <u_h, u_h> = 1 in every head
# The rules issue 9 specified (record every record_interval-th block, padding masked); MemFlow's released
# schedule (the default) is checked against a reference of its inference code in tests/sampling/test_upstream_inference.py.
ISSUE9 = dict(schedule="interval", mask_padding=True)


# ---- (1) bookkeeping: a 40-block video against a table worked out by hand ---------------------------------
# Rules (issue 9; bank_size 3, record_interval 3, sink 3, 3 frames per block): block b records its first frame
# 3b iff b % 3 == 0 and 3b >= 3 -> frames 9, 18, ..., 117 after blocks 3, 6, ..., 39. A full bank keeps the 2
# best old entries (score = p * a_layer(frame), see KeyWriter) plus the new frame.
# Relevance a of the recordable frames (layer 0; layer 1 uses -a, so the layers disagree):
#   frame  9 18 27 36 45 54 63 72 81 90 99 108 117
#   a      5 10  2  7 12  4  9  1  6 11  3   8   0
# Prompts: p = +1 throughout (NO_SWITCH); with switches p = +1 (blocks 0-19), -1 (20-29), +1 (30-39).
# Padded text keys point the other way (-50 p u): counting them would flip every decision.
NO_SWITCH = """
0-2   : -          | -
3-5   : 9          | 9
6-8   : 9 18       | 9 18
9-11  : 9 18 27    | 9 18 27
12-14 : 9 18 36    | 9 27 36
15-17 : 18 36 45   | 9 27 45
18-20 : 18 45 54   | 9 27 54
21-23 : 18 45 63   | 27 54 63
24-26 : 18 45 72   | 27 54 72
27-29 : 18 45 81   | 27 72 81
30-32 : 18 45 90   | 27 72 90
33-35 : 45 90 99   | 27 72 99
36-38 : 45 90 108  | 27 72 108
39    : 45 90 117  | 27 72 117
"""
TWO_SWITCHES = """
0-2   : -          | -
3-5   : 9          | 9
6-8   : 9 18       | 9 18
9-11  : 9 18 27    | 9 18 27
12-14 : 9 18 36    | 9 27 36
15-17 : 18 36 45   | 9 27 45
18-20 : 18 45 54   | 9 27 54
21-23 : 18 54 63   | 9 54 63
24-26 : 54 63 72   | 9 63 72
27-29 : 54 72 81   | 9 63 81
30-32 : 54 81 90   | 9 81 90
33-35 : 81 90 99   | 9 81 99
36-38 : 81 90 108  | 9 99 108
39    : 90 108 117 | 9 99 117
"""
A0 = dict(zip(range(9, 118, 9), [5, 10, 2, 7, 12, 4, 9, 1, 6, 11, 3, 8, 0]))


def _parse(table: str) -> dict[int, tuple[list[int], list[int]]]:
    rows = {}
    for line in table.strip().splitlines():
        blocks, banks = line.split(":")
        lo, _, hi = blocks.strip().partition("-")
        per_layer = tuple([int(f) for f in part.split() if f != "-"] for part in banks.split("|"))
        for b in range(int(lo), int(hi or lo) + 1):
            rows[b] = per_layer
    assert sorted(rows) == list(range(40))
    return rows


class KeyWriter(nn.Module):
    """Test double of the model's cache contract: per layer, read the view, then write for each frame f the key
    a_i(f) * u on every token (a_0 = A0, a_1 = -A0; 0 for other frames). Records what every layer attended."""

    def __init__(self, relevance: dict[int, int] = A0):
        super().__init__()
        self.a = relevance
        self.config = SimpleNamespace(num_layers=2)
        self.seen: list[tuple[int, bool, int, list[int]]] = []  # (frame_offset, commit, layer, attended frames)

    def forward(self, x, timestep, *, text, frame_offset, cache, view, compute_output=True):
        b, nf = x.shape[0], x.shape[2]
        for i in range(2):
            kv = cache.layer(i, view)
            frames = cache.attended_frames(i, view)[0]
            self.seen.append((frame_offset, bool(view.write_frames), i, frames))
            ctx = kv.read()
            assert (ctx is None and not frames) or ctx[0].shape[1] == len(frames) * T_TOK
            a = torch.tensor([(1 - 2 * i) * self.a.get(frame_offset + j, 0) for j in range(nf)], dtype=torch.float32)
            k = (a[:, None, None, None] * U).expand(nf, T_TOK, HEADS, HDIM).reshape(1, -1, HEADS, HDIM)
            kv.write(k.expand(b, -1, -1, -1), k.expand(b, -1, -1, -1))
        return torch.zeros_like(x) if compute_output else None


def _text(p: float, valid: int, length: int = 5) -> TextKV:
    k = torch.cat([p * U.expand(valid, -1, -1), -50 * p * U.expand(length - valid, -1, -1)])[None]
    return TextKV(layers=[(k, k)] * 2, mask=torch.arange(length)[None] < valid)


@pytest.mark.parametrize("switches", [False, True])
def test_bank_bookkeeping_matches_hand_table(switches):
    model = KeyWriter()
    cc = CacheConfig(history_frames=12, memory_bank=MemoryBankConfig(**ISSUE9))
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), cc, recache_on_switch=True,
                             bank_reduction=LOCAL)
    prompts = [PromptSwitch(0, _text(1.0, 3))]
    if switches:  # the recache at block 20 rewrites frames 51..59 (incl. recorded 54): it must not record again
        prompts += [PromptSwitch(60, _text(-1.0, 4)), PromptSwitch(90, _text(1.0, 2))]
    table = _parse(TWO_SWITCHES if switches else NO_SWITCH)
    cache = gen.new_cache()
    orig_commit = gen.commit_block
    after = {}

    def commit_and_log(cache_, x0, start, text, **kw):
        orig_commit(cache_, x0, start, text, **kw)
        if kw.get("record_bank", True):
            after[start // 3] = tuple(cache_.bank_frames[i][0].tolist() if cache_.bank_len else [] for i in range(2))
    gen.commit_block = commit_and_log
    gen.generate(torch.zeros(1, 1, 120, 1, 1), prompts, cache=cache)
    assert {b: tuple(map(list, v)) for b, v in after.items()} == table
    # entries outlive the ring (history 12 keeps frames 108..119 only): their keys are the committed ones
    for i in range(2):
        k, _ = cache.bank_kv(i)
        for j, f in enumerate(cache.bank_frames[i][0].tolist()):
            assert torch.equal(k[0, j], ((1 - 2 * i) * A0[f] * U).expand(T_TOK, -1, -1)), (i, f)
    assert not cache.is_resident(table[39][1][0])
    # (3) every forward of every layer attended exactly [sink ; bank after the previous block ; local window]; a
    # recache (LongLive: one forward of the 9 frames before the switch) attends [sink ; bank] and itself
    want_seen = []
    for b in range(40):
        bank = lambda layer: table[b - 1][layer] if b > 0 else []  # noqa: E731
        if switches and 3 * b in (60, 90):
            want_seen += [(3 * b - 9, True, i, [0, 1, 2] + bank(i)) for i in range(2)]
        local = list(range(max(3, 3 * b - 6), 3 * b))
        for step in range(5):  # 4 solver steps, then the commit
            want_seen += [(3 * b, step == 4, i, [0, 1, 2][:3 * b] + bank(i) + local) for i in range(2)]
    assert model.seen == want_seen
    assert max(len(f) for *_, f in model.seen) + 3 == 15  # sink 3 + bank 3 + local span 9 with the block


def test_caches_get_the_score_reduction_once():
    """The engine's reduction reaches its caches at construction (``new_cache``, forks); a cache built without it is
    refused, instead of scoring with another layout's reduction (the engine never reassigns it)."""
    cc = CacheConfig(history_frames=12, memory_bank=MemoryBankConfig(**ISSUE9))
    sharded = ScoreReduction()  # stands for a TP/CP layout's reduction: another object than LOCAL
    gen = StreamingGenerator(KeyWriter(), FlowMatchSampler(SamplerConfig()), cc, bank_reduction=sharded)
    cache = gen.new_cache()
    assert cache.reduction is sharded and cache.fork(2, 9).reduction is sharded
    noise, prompts, layers = torch.zeros(1, 1, 12, 1, 1), [PromptSwitch(0, _text(1.0, 3))], gen.model.config.num_layers
    with pytest.raises(ConfigError, match="new_cache"):
        gen.generate(noise, prompts, cache=KVCache(cc, layers))
    gen.generate(noise, prompts, cache=KVCache(cc, layers, reduction=sharded))


# ---- (2) compression on hand-built tensors ------------------------------------------------------------------
def _entries() -> torch.Tensor:
    """Three entries of 2 tokens, one head, head dim 4 (sqrt = 2), against text keys e_0, e_1 (+ a pad)."""
    e = torch.zeros(3, 2, 4)
    e[0, 0, 0], e[0, 1, 0] = 4, -4  # z(l0) = [2, -2], z(l1) = [0, 0]
    e[1, :, :2] = 1  # z = 0.5 everywhere
    e[2, 0, 1] = 2  # z(l0) = [0, 0], z(l1) = [1, 0]
    return e[None, :, :, None]  # [b=1, n=3, T=2, h=1, d=4]


def _hand_text(valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.zeros(1, 3, 1, 4)
    k[0, 0, 0, 0] = k[0, 1, 0, 1] = 1
    k[0, 2, 0, 1] = -10  # a padded position: z = [-5, -5] for entry 1, [-10, 0] for entry 2
    return k, torch.arange(3)[None] < valid


def test_compression_scores_and_picks_by_hand():
    e = _entries()
    k, mask = _hand_text(2)
    dot = bank_scores([k], mask, [e], "dot")[0, 0]
    assert torch.allclose(dot, torch.tensor([0.0, 0.5, 0.25]), atol=1e-6)  # mean of z over l, h, t
    soft = bank_scores([k], mask, [e], "softmax")[0, 0]
    # attention-weighted mean of z over the entry's tokens, then the mean over l and h:
    # entry 0: (2 tanh 2 + 0) / 2; entry 1: 0.5; entry 2: (0 + e / (e + 1)) / 2
    want = torch.tensor([math.tanh(2), 0.5, math.e / (math.e + 1) / 2])
    assert torch.allclose(soft, want, atol=1e-6)
    assert keep_indices(dot, 2).tolist() == [1, 2] and keep_indices(soft, 2).tolist() == [0, 1]
    # the padded position counted (mask ignored) would change both picks
    unmasked = [bank_scores([k], None, [e], m)[0, 0] for m in ("dot", "softmax")]
    assert torch.allclose(unmasked[0], torch.tensor([0.0, (2 - 10) / 6, (1 - 10) / 6]), atol=1e-6)
    assert keep_indices(unmasked[0], 2).tolist() == [0, 1] and keep_indices(unmasked[1], 2).tolist() == [0, 2]
    # per sample: a second prompt with one valid token; dot ties entries 0 and 2 at 0 -> the older one stays
    k2, m2 = torch.cat([k, k]), torch.cat([mask, _hand_text(1)[1]])
    both = bank_scores([k2], m2, [torch.cat([e, e])], "dot")[0]
    assert torch.allclose(both[1], torch.tensor([0.0, 0.5, 0.0]), atol=1e-6)
    assert keep_indices(both, 2).tolist() == [[1, 2], [0, 1]]
    # an empty or zeroed prompt is never scored
    with pytest.raises(ConfigError, match="no valid text position"):
        bank_scores([k], torch.zeros(1, 3, dtype=torch.bool), [e], "dot")
    with pytest.raises(ConfigError, match="text K is all zero"):
        bank_scores([torch.zeros_like(k)], mask, [e], "softmax")


@pytest.mark.parametrize("mode,kept", [("dot", [2, 3]), ("softmax", [1, 2])])
def test_full_bank_keeps_best_plus_newest_through_the_cache(mode, kept):
    """The same entries as frames 1..3 of a cache (one frame per block), then frame 4 arrives."""
    cc = CacheConfig(frames_per_block=1, num_sink_frames=1, local_attn_frames=1, history_frames=4,
                     memory_bank=MemoryBankConfig(**ISSUE9, bank_size=3, record_interval=1, bank_score=mode))
    cache = KVCache(cc, 1)
    k, mask = _hand_text(2)
    text = TextKV(layers=[(k, k)], mask=mask)
    entries = torch.cat([_entries()[0], torch.randn(1, 2, 1, 4)])  # frame f holds entry f - 1; frame 4: anything
    for f in range(5):
        view = cache.view([], write_frames=[f])
        kf = torch.zeros(1, 2, 1, 4) if f == 0 else entries[f - 1][None]
        cache.store(0, view.write_slots, kf, kf + 100)
        assert update_after_commit(cache, f, text) == (f >= 1)  # the sink frame is never recorded
    assert cache.bank_frames[0].tolist() == [kept + [4]]
    kb, vb = cache.bank_kv(0)
    want = torch.stack([entries[f - 1] for f in kept + [4]])[None]
    assert torch.equal(kb, want) and torch.equal(vb, want + 100)


def test_config_and_presets():
    from kvpo_megatron.generation import GenerateConfig
    from kvpo_megatron.kvpo.train_config import KVPOTrainConfig

    with pytest.raises(ConfigError, match="bank_size must be >= 1, got 0"):
        MemoryBankConfig(bank_size=0)
    with pytest.raises(ConfigError, match="sma_top_k must be >= 1, got 0"):
        MemoryBankConfig(sma=True, sma_top_k=0)
    with pytest.raises(ConfigError, match="bank_score must be one of"):
        MemoryBankConfig(bank_score="max")
    with pytest.raises(ConfigError, match="schedule must be one of"):
        MemoryBankConfig(schedule="every")
    mem = from_dict(KVPOTrainConfig, generator_preset("memflow-1.3b"))
    ll = from_dict(KVPOTrainConfig, generator_preset("longlive-1.3b"))
    assert mem.cache.memory_bank == MemoryBankConfig(bank_size=3, record_interval=3, schedule="release",
                                                     bank_score="dot", mask_padding=False)
    assert mem.routing.num_recent_fixed == 3 and mem.model.preset == "wan-1.3b" and mem.recache_on_switch
    assert ll.cache.memory_bank is None
    assert dataclasses.replace(mem.cache, memory_bank=None) == ll.cache and mem.routing == ll.routing
    gen = from_dict(GenerateConfig, generator_preset("memflow-1.3b", GENERATE_SECTIONS))
    assert gen.cache == mem.cache and gen.sampler == mem.sampler
    with pytest.raises(ConfigError, match="unknown generator preset 'memflow'"):
        generator_preset("memflow")


# ---- (2b) sparse memory activation (sma) on hand-built tensors -------------------------------------------
def _sparse_cache(top_k: int, sma: bool = True) -> KVCache:
    """Frames 0..11 resident, keys per head h: a_h(f) * u + an alternating +-10 e_0 that cancels in the token mean.
    Bank (every layer) = frames 3, 6, 9. a_0 / a_1 per frame below; values are arbitrary, chosen by hand."""
    cc = CacheConfig(history_frames=12, memory_bank=MemoryBankConfig(**ISSUE9, sma=sma, sma_top_k=top_k))
    cache = KVCache(cc, num_layers=1)
    a = {0: (1, 0), 1: (-2, 0), 2: (3, 0), 3: (5, 0), 4: (0, 0), 5: (0, 0), 6: (1, 2), 7: (0, 0), 8: (0, 0),
         9: (-4, 0), 10: (0, 0), 11: (0, 0)}
    wiggle = torch.zeros(T_TOK, 1, HDIM)
    wiggle[:, 0, 0] = torch.tensor([10.0, -10.0] * (T_TOK // 2))
    for f in range(12):
        k = torch.stack([a[f][h] * U[h] for h in range(HEADS)])[None] + wiggle  # [T, H, d]
        view = cache.view([], write_frames=[f])
        cache.layer(0, view).write(k[None], -k[None])
    for f, keep in ((3, [[0]]), (6, [[0, 1]]), (9, [[0, 1, 2]])):
        cache.set_bank(0, f, torch.tensor(keep))
    return cache


def _queries(c0: float, c1: float) -> torch.Tensor:
    """[1, 2T, H, d] queries whose token mean is c_h * u_h in head h (tokens vary around it)."""
    q = torch.stack([c0 * U[0], c1 * U[1]])[None].expand(2 * T_TOK, -1, -1).clone()
    q[::2, :, 1] += 7
    q[1::2, :, 1] -= 7
    return q[None]


@pytest.mark.parametrize("c, chosen", [
    ((1, 0), [2, 3]),  # head 0 only: scores = a_0 -> frame 3 (5), then frames 2 and 6 tie at 3: the older slot
    ((-1, 0), [1, 9]),  # -a_0 -> frames 9 (4) and 1 (2), in view order
    ((1, 1), [2, 3]),  # heads are summed: frame 6 scores 1 + 2 = 3, a tie with frame 2 again (older wins) ...
    ((1, 1.5), [3, 6]),  # ... and 1 + 3 = 4 > 3 when head 1's query is 1.5 u
])
def test_sparse_activation_picks_top_k_by_hand(c, chosen):
    cache = _sparse_cache(top_k=2)
    cache.sparse_log = []
    read = cache.cfg.default_read_frames(12)
    assert read == [0, 1, 2, 6, 7, 8, 9, 10, 11]
    view = cache.view(read)
    assert (view.bank_entries, view.sparse_candidates, view.sparse_top_k) == (3, 6, 2)
    k, v = cache.layer(0, view).read(_queries(*c))
    local = [6, 7, 8, 9, 10, 11]
    bank_pos = {3: 0, 6: 1, 9: 2}
    parts = [cache.frame_kv(0, [f])[0] if f < 3 or f not in bank_pos else cache.bank_kv(0)[0][:, [bank_pos[f]]]
             for f in chosen]
    want = torch.cat(parts + [cache.frame_kv(0, local)[0]], 1).flatten(1, 2)
    assert torch.equal(k, want) and torch.equal(v, -want)
    assert cache.sparse_log == [(0, [chosen + local])]


def test_sparse_activation_off_small_and_missing_queries():
    read = [0, 1, 2, 6, 7, 8, 9, 10, 11]
    full = _sparse_cache(top_k=2, sma=False)
    assert full.view(read).sparse_candidates == 0
    assert full.layer(0, full.view(read)).read(_queries(1, 0))[0].shape[1] == 12 * T_TOK  # sink 3 + bank 3 + 6
    few = _sparse_cache(top_k=6)  # 6 candidates, keep 6: nothing to choose
    assert few.view(read).sparse_candidates == 0
    early = _sparse_cache(top_k=2)  # a view without bank slots (bank=False) never selects
    assert early.view(read, bank=False).sparse_candidates == 0
    some = _sparse_cache(top_k=2)
    with pytest.raises(ValueError, match="did not pass its queries"):
        some.layer(0, some.view(read)).read()
    per_sample = _sparse_cache(top_k=5)  # per-sample views keep their own rows
    view = per_sample.view([read, [0, 1, 2, 3, 4, 5, 9, 10, 11]])
    assert view.sparse_candidates == 6 and view.read_slots.shape == (2, 12)


def test_real_model_sparse_activation_attends_top_k_plus_local(pgs):
    model = tiny_model(pgs).eval()
    noise = torch.randn(1, 4, 30, 8, 8, generator=torch.Generator().manual_seed(1))
    text = model.encode_text(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2)))
    out, logs = {}, {}
    for sma in (False, True):
        cc = CacheConfig(history_frames=12, memory_bank=MemoryBankConfig(**ISSUE9, bank_size=2, record_interval=1,
                                                                        sma=sma, sma_top_k=2))
        gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), cc)
        cache = gen.new_cache()
        cache.sparse_log = []
        with torch.no_grad():
            out[sma] = gen.generate(noise, [PromptSwitch(0, text)], cache=cache)
        logs[sma] = cache.sparse_log
    assert logs[False] == [] and logs[True]
    for layer, (frames,) in logs[True]:  # 2 of sink (0-2) + bank, then the local window (frames >= 3, ascending)
        assert len(frames) >= 3 and all(f < 3 or f % 3 == 0 for f in frames[:2])
        local = frames[2:]
        assert local == list(range(local[0], local[0] + len(local))) and local[0] >= 3
    picks = {tuple(f[:2]) for _, (f,) in logs[True]}
    assert len(picks) > 2, picks  # the choice follows the queries (layers, steps, blocks)
    assert (out[True] - out[False]).abs().max() > 1e-3  # and changes the video


class SpyKV(LayerKV):
    """A LayerKV that hands what it read to a check."""

    __slots__ = ("check",)

    def __init__(self, cache, layer, view, check):
        super().__init__(cache, layer, view)
        self.check = check

    def read(self, q=None):
        got = super().read(q)
        self.check(got)
        return got


# ---- (3) the real model: attended K = [sink ; bank ; local], entries = commit-pass K/V after eviction -------
def test_real_model_attends_sink_bank_local_and_keeps_committed_kv(pgs):
    model = tiny_model(pgs).eval()
    cc = CacheConfig(history_frames=12, memory_bank=MemoryBankConfig(**ISSUE9))
    gen = StreamingGenerator(model, FlowMatchSampler(SamplerConfig()), cc)
    cache = gen.new_cache()
    reads, committed = [], {}
    orig_commit = gen.commit_block

    def layer(i, view):
        def check(got):
            frames = cache.attended_frames(i, view)[0]
            sink, bank = [f for f in frames[:3] if f < 3], cache.bank_frames[i]
            bank = [] if bank is None else bank[0].tolist()
            reads.append((view.read_frames, i, frames, bank))
            if got is not None:  # the K read is the frames' K, in order [sink ; bank ; local]
                parts = [cache.frame_kv(i, sink)[0]] if sink else []
                parts += [cache.bank_kv(i)[0]] if bank else []
                local = list(view.read_frames[len(sink):])
                parts += [cache.frame_kv(i, local)[0]] if local else []
                assert torch.equal(got[0], torch.cat(parts, 1).flatten(1, 2))
        return SpyKV(cache, i, view, check)

    def commit(cache_, x0, start, text, **kw):
        orig_commit(cache_, x0, start, text, **kw)
        committed[start] = [tuple(t.clone() for t in cache_.frame_kv(i, [start])) for i in range(2)]
    cache.layer, gen.commit_block = layer, commit
    ctx = torch.randn(1, 16, 32)
    ctx[:, 11:] = 0  # padding read off the zero rows
    text = model.encode_text(ctx)
    assert text.mask.tolist() == [[True] * 11 + [False] * 5]
    with torch.no_grad():
        gen.generate(torch.randn(1, 4, 42, 8, 8), [PromptSwitch(0, text)], cache=cache)
    n_bank = {b: min(3, sum(1 for r in (3, 6, 9, 12) if r < b)) for b in range(14)}  # entries before block b
    for read_frames, i, frames, bank in reads:
        s = (max(read_frames) + 1) if read_frames else 0
        b = -(-s // 3)  # the block being denoised/committed
        assert len(bank) == n_bank[b], (b, bank)
        assert frames == list(read_frames[:3]) + bank + list(read_frames[3:])
    assert max(len(f) for _, _, f, _ in reads) + 3 == 15
    assert len(reads) == 2 * 14 * 5
    for i in range(2):
        frames = cache.bank_frames[i][0].tolist()
        assert len(frames) == 3 and frames[-1] == 36 and set(frames) <= {9, 18, 27, 36}
        kb, vb = cache.bank_kv(i)
        for j, f in enumerate(frames):
            assert torch.equal(kb[:, j], committed[f][i][0][:, 0]) and torch.equal(vb[:, j], committed[f][i][1][:, 0])
    assert not cache.is_resident(9) and not cache.is_resident(27)
