"""Per-GPU memory of one KVPO iteration, from the configuration (``tools/memory_model.py`` prints it as JSON).

Terms (bytes per GPU; ``t`` = TP, ``c`` = CP, ``d`` hidden, ``f`` FFN width, ``r`` LoRA rank, ``T`` tokens per
latent frame, ``F`` frames per block, ``L = F T`` block tokens, ``Ls = L / c`` this rank's tokens, ``Lc`` cached
tokens a block attends, ``tl`` text tokens, ``h`` heads, ``hd`` head dim):

* weights: every block linear column- (q, k, v, fc1: weight and bias / t) or row-parallel (o, fc2: weight / t,
  bias whole), q/k RMSNorm weights / t, affine LayerNorm (float32) and modulation whole; the embeddings, time
  MLPs and head are replicated. CP and DP replicate everything.
* LoRA on each target linear: column base -> A [r, in] whole, B [out/t, r]; row base -> A [r, in/t], B [out, r].
  Per LoRA parameter: the parameter, its ``.grad`` and AdamW's two states in the LoRA dtype, plus megatron DDP's
  float32 ``main_grad``.
* KV cache per latent frame and sample: ``layers * T * 2 (K, V) * d / (t c) * bytes`` (heads over TP; over CP
  Ulysses shards heads, all-gather shards tokens: the same bytes).
* rollout cache (``paged``, the engine's ``model/kv_pages.py``): per prompt group one page pool holding the
  prefix's resident frames once (``sink + history``) and, per sample of the batch that advances together
  (anchor + branches, ``rollout.batch_size`` or as many as ``rollout.kv_budget_gb`` allows), a private ring of
  ``max(local, W F)`` frames; the replay forks the same pool (chunks of branches with ``local``-frame rings).
  A group's pool lives until its replay, so ``prompts_per_rank`` pools coexist in the replay phase.
  ``legacy``: the engine before (one working cache and a fork snapshot of ``sink + history`` slots per group).
* replay activations per tuple and layer (autograd's saved tensors of one block-step, local spec, LoRA trains,
  base frozen; equal byte for byte to a small model's at TP=1, TP=2, CP=2 Ulysses and CP=2 all-gather:
  tests/kvpo/test_memory_model.py, tests/parallel/test_kvpo_layouts.py), in the compute dtype ``B`` and float32:
  ``B (2 Lc D_kv + cur + 2 Ls f/t + 3 Ls d + 2 Ls d/t + Ls d/t + n_tok Ls r + 2 tl d/t + n_txt tl r)
  + 4 (3 Ls d + 3 Ls d/t + 2 Ls hd + lse_self + Ls h/t + 9 Ls + 8 F d + tl d/t + tl)``
  where the split attention (``model/split_attention.py``) keeps the cached K/V, ``D_kv = d/(t c)`` (``d/t``
  under CP all-gather), and the current block's ``cur`` = q, k, v ``3 L d/t`` (c = 1), under Ulysses the
  all-to-all's stacked q, k, v and the output ``4 L d/(t c)``, under all-gather the local q and all ranks'
  current K/V ``Ls d/t + 2 L d/t``; ``lse_self`` the attention's log-sum-exp likewise (``L h/t``, ``L h/(t c)``,
  ``Ls h/t``); ``n_tok`` LoRA linears on video tokens (8 with every target), ``n_txt`` on
  text (cross k, v). Per-layer recompute keeps each layer's input ``B Ls d`` and rebuilds one layer at a time.
* replay schedule: tuples per batch and recompute as ``kvpo.replay.plan_replay`` picks them on a GPU
  (``replay.batch_size``/``memory_budget_gb``/``recompute``; it sizes with its own coarser estimate).
* the forward's transient working set (no grad; not measured here): per sample of a batch, one layer's FFN
  hidden, K/V with context, q/k/v/output and float32 residual copies; the backward's transient: one layer's
  activations again (its gradients).
* small terms: the G+1 videos' latents and the shared noise (float32), replay tuples (x and v_target, float32),
  the prompt's cross-attention K/V for generation (merged LoRA), scoring and the reference.
* merged-LoRA rollout (``rollout.merge_lora``): one exact copy of the adapted base weights during the rollout
  (found on 2 H200s: the 14B TP=2 rollout with 9 batched samples ran out of memory where this term was missing).
* found in a GPU memory snapshot of the 14B TP=2 iteration (tools/BENCHMARKS.md): the LoRA EMA's float32 shadow
  (``ema``); under the TE spec without CUDA graphs, every layer's gathered context buffer during a block's
  denoising steps (``batch x (sink + local) frames`` of K and V; a commit frees it); the head's float32 input per
  replay tuple.

Assumptions: Wan's patch (1, 2, 2); weights in ``bytes`` (the trainer builds float32 and the benches cast: that
transient copy at build time is not counted); activations are the local spec's with the split replay attention
(TransformerEngine's linears and compiled element-wise code save a similar set). Not modelled: the CUDA context, NCCL buffers, allocator
fragmentation, TE/compile workspaces and CUDA-graph pools (keep ~10 GB of a GPU for them). The LoRA terms are a
steady state's: a first iteration has no AdamW states yet (they appear at the first update) and no ``.grad``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

from kvpo_megatron.kvpo.branch_schedule import plan_counts
from kvpo_megatron.kvpo.config import ReplayConfig, RolloutConfig, split_evenly
from kvpo_megatron.parallel.layout import check_heads

GB = 1e9
COLUMN = ("q", "k", "v", "ffn_fc1")
"""LoRA targets whose base linear is column-parallel (the rest, o and ffn_fc2, are row-parallel)."""


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    preset: str = "wan-1.3b"
    tp: int = 1
    cp: int = 1
    cp_attention: str = "ulysses"
    """``ulysses``, ``allgather`` or ``auto`` (only with cp > 1; ``parallel/layout.py``)."""
    frames: int = 147
    latent_hw: tuple[int, int] = (60, 104)
    branches: int = 8
    """G per prompt; with ``branches_over_dp`` this rank runs G / dp of them."""
    window: int = 5
    branches_over_dp: int = 1
    """DP ranks sharing one prompt's branches (1 = none)."""
    prompts_per_rank: int = 1
    frames_per_block: int = 3
    sink: int = 3
    local: int = 9
    history: int = 30
    routed_steps: int = 2
    recent_fixed: int = 3
    """``routing.num_recent_fixed``."""
    pivot: int | None = None
    """Pivot block (None: the earliest allowed, which leaves the most frames after it and the longest window)."""
    lora_rank: int = 256
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "ffn_fc1", "ffn_fc2")
    lora_bytes: int = 4
    """LoRA parameter, gradient and AdamW-state bytes (float32; 2 after casting the model to bf16)."""
    bytes: int = 2
    """Weights, activations and KV cache (bf16)."""
    cache: str = "paged"
    """``paged`` (the engine: shared prefix pages + private rings per batched sample) or ``legacy`` (the engine
    before it: a working cache and a fork snapshot per group, one sample at a time; kept to compare with the
    one GPU measurement of it)."""
    merge_lora: bool = True
    """``rollout.merge_lora``: the rollout holds an exact copy of the adapted base weights."""
    branch_batch: int | None = None
    """``rollout.batch_size``: samples advancing together (None: as many as ``kv_budget_gb`` allows)."""
    kv_budget_gb: float | None = None
    """``rollout.kv_budget_gb`` (None: the config's default)."""
    replay_batch: int | None = None
    """``replay.batch_size``: tuples per forward + backward (None: from ``replay_budget_gb``, as the trainer)."""
    replay_budget_gb: float | None = None
    """``replay.memory_budget_gb`` (None: the config's default)."""
    recompute: str = "auto"
    """``replay.recompute``: auto | none | blocks."""
    ema: bool = True
    """``ema.decay > 0`` (the default): a float32 shadow of every LoRA parameter (``kvpo/ema.py``)."""
    spec: str = "local"
    """``model.overrides.spec``: with ``te`` and no CUDA graphs the TE attention core keeps every layer's gathered
    context through a block's denoising steps (``te_spec.TECachedAttention``; a commit frees it)."""
    cuda_graphs: bool = False
    """``model.cuda_graphs``: captured forwards gather the context on every call and keep no buffer."""


def model_sizes(preset: str, **overrides) -> dict:
    """The preset's architecture fields (``kvpo_megatron.model.config.PRESETS``) with overrides."""
    from kvpo_megatron.model.config import PRESETS  # megatron-free import of this module (the CLI)

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return {**PRESETS[preset], **overrides}


def weight_params(m: dict, tp: int) -> tuple[int, int]:
    """(parameters, of which float32 LayerNorm) per GPU."""
    d, f, L = m["hidden_size"], m["ffn_hidden_size"], m["num_layers"]
    col = lambda i, o: (i * o + o) // tp  # noqa: E731
    row = lambda i, o: i * o // tp + o  # noqa: E731
    attn = 3 * col(d, d) + row(d, d) + 2 * d // tp
    block = 2 * attn + 2 * d + col(d, f) + row(f, d) + 6 * d
    patch = m["in_channels"] * d * math.prod((1, 2, 2)) + d
    text = m["text_dim"] * d + d + d * d + d
    time = m["freq_dim"] * d + d + d * d + d + d * 6 * d + 6 * d
    head = d * m["out_channels"] * 4 + m["out_channels"] * 4 + 2 * d
    return L * block + patch + text + time + head, L * 2 * d


def lora_params(m: dict, rank: int, targets: tuple[str, ...], tp: int) -> int:
    """LoRA parameters per GPU (q, k, v, o in self- and cross-attention; ffn_fc1, ffn_fc2)."""
    d, f = m["hidden_size"], m["ffn_hidden_size"]
    shape = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "ffn_fc1": (d, f), "ffn_fc2": (f, d)}
    per = 0
    for t in targets:
        i, o = shape[t]
        n = rank * i + rank * o // tp if t in COLUMN else rank * i // tp + rank * o
        per += n * (1 if t.startswith("ffn") else 2)
    return m["num_layers"] * per


def tokens_per_frame(plan: MemoryPlan) -> int:
    return (plan.latent_hw[0] // 2) * (plan.latent_hw[1] // 2)


def kv_bytes_per_frame(plan: MemoryPlan, m: dict | None = None) -> int:
    m = m or model_sizes(plan.preset)
    return m["num_layers"] * tokens_per_frame(plan) * 2 * m["hidden_size"] // (plan.tp * plan.cp) * plan.bytes


def activation_bytes_per_layer(plan: MemoryPlan, m: dict | None = None, *, cached_frames: int | None = None,
                               batch: int = 1) -> int:
    """Autograd's saved tensors of one replay block-step and layer for ``batch`` tuples (the prompt's text terms
    once per forward; see the module docstring)."""
    m = m or model_sizes(plan.preset)
    d, f, h = m["hidden_size"], m["ffn_hidden_size"], m["num_attention_heads"]
    hd, tl, t, c, r = d // h, m["text_len"], plan.tp, plan.cp, plan.lora_rank
    F = plan.frames_per_block
    L = F * tokens_per_frame(plan)
    Ls = L // c
    Lc = (plan.sink + plan.local - F if cached_frames is None else cached_frames) * tokens_per_frame(plan)
    ag = c > 1 and plan.cp_attention == "allgather"
    d_kv = d // t if ag else d // (t * c)
    cur, lse_self = ((Ls * d // t + 2 * L * d // t, Ls * h // t) if ag else
                     (4 * L * d // (t * c), L * h // (t * c)) if c > 1 else (3 * L * d // t, L * h // t))
    tg = set(plan.lora_targets)
    n_tok = 2 * len(tg & {"q", "o"}) + len(tg & {"k", "v"}) + len(tg & {"ffn_fc1", "ffn_fc2"})
    n_txt = len(tg & {"k", "v"})
    low = 2 * Lc * d_kv + cur + 2 * Ls * f // t + 3 * Ls * d + 2 * Ls * d // t + Ls * d // t + n_tok * Ls * r
    fp32 = 3 * Ls * d + 3 * Ls * d // t + 2 * Ls * hd + lse_self + Ls * h // t + 9 * Ls + 8 * F * d
    text = plan.bytes * (2 * tl * d // t + n_txt * tl * r) + 4 * (tl * d // t + tl)
    return batch * (plan.bytes * low + 4 * fp32) + text


def forward_workspace_bytes(plan: MemoryPlan, m: dict, batch: int) -> int:
    """No-grad forward, one layer live at a time (estimate): FFN hidden x2, K/V with context, q/k/v/out, float32
    residual copies."""
    d, f, t, c = m["hidden_size"], m["ffn_hidden_size"], plan.tp, plan.cp
    L = plan.frames_per_block * tokens_per_frame(plan)
    Lk = (plan.sink + plan.local) * tokens_per_frame(plan)
    return batch * (plan.bytes * (2 * L // c * f // t + 2 * Lk * d // (t * c) + 4 * L * d // (t * c))
                    + 4 * 3 * L // c * d)


def earliest_pivot(plan: MemoryPlan) -> int:
    """The first block whose routable history exceeds the routed slots (``kvpo.routing.pivot_range``)."""
    fpb, routed = plan.frames_per_block, plan.local - plan.recent_fixed
    return next(b for b in range(plan.frames // fpb + 1)
                if b * fpb + fpb - plan.recent_fixed - plan.sink > routed and b * fpb >= plan.sink)


def rollout_batch(plan: MemoryPlan, kv_frame: int, samples: int, private: int) -> int:
    """The largest batch of samples advanced together: ``branch_batch``, or the most whose pages fit
    ``kv_budget_gb``, evened out over the batches (the rollout's rule, ``kvpo/rollout.py``)."""
    if plan.branch_batch is not None:
        return min(plan.branch_batch, samples)
    budget = RolloutConfig().kv_budget_gb if plan.kv_budget_gb is None else plan.kv_budget_gb
    fit = int((budget * GB - (plan.sink + plan.history) * kv_frame) // (private * kv_frame))
    return len(split_evenly(list(range(samples)), max(1, min(samples, fit)))[0])  # the largest of even batches


def replay_schedule(plan: MemoryPlan, m: dict) -> tuple[int, bool]:
    """(tuples per replay batch, recompute) as ``kvpo.replay.plan_replay`` chooses them on a GPU (it sizes with
    its own, coarser estimate)."""
    from kvpo_megatron.kvpo.replay import activation_bytes  # megatron-free import of this module (the CLI)

    cfg = SimpleNamespace(hidden_size=m["hidden_size"], ffn_hidden_size=m["ffn_hidden_size"],
                          num_layers=m["num_layers"], tensor_model_parallel_size=plan.tp,
                          context_parallel_size=plan.cp)
    tokens = plan.frames_per_block * tokens_per_frame(plan)
    full, rc = (activation_bytes(cfg, tokens, recompute=r) for r in (False, True))
    budget = (ReplayConfig().memory_budget_gb if plan.replay_budget_gb is None else plan.replay_budget_gb) * GB
    recompute = (plan.replay_batch or 1) * full > budget if plan.recompute == "auto" else plan.recompute == "blocks"
    return plan.replay_batch or max(1, int(budget // (rc if recompute else full))), recompute


def predict(plan: MemoryPlan, m: dict | None = None) -> dict:
    """Per-GPU bytes of each term and the two phases' peaks (GB); ``m``: architecture (default: the preset's)."""
    m = m or model_sizes(plan.preset)
    kind = check_heads(m["num_attention_heads"], tp=plan.tp, cp=plan.cp, cp_attention=plan.cp_attention)
    plan = dataclasses.replace(plan, cp_attention=kind.value)
    g_rank, P = plan.branches // plan.branches_over_dp, plan.prompts_per_rank
    blocks = plan.frames // plan.frames_per_block
    pivot = earliest_pivot(plan) if plan.pivot is None else plan.pivot
    window = min(plan.window, blocks - pivot)
    n_par, n_ln = weight_params(m, plan.tp)
    weights = (n_par - n_ln) * plan.bytes + n_ln * 4
    n_lora = lora_params(m, plan.lora_rank, plan.lora_targets, plan.tp)
    lora = n_lora * (4 * plan.lora_bytes + 4)  # param, grad, 2 Adam states; DDP main_grad float32
    ema = n_lora * 4 if plan.ema else 0  # float32 shadow
    kv_frame = kv_bytes_per_frame(plan, m)
    resident = plan.sink + plan.history
    private = max(plan.local, window * plan.frames_per_block)
    rb, recompute = replay_schedule(plan, m)
    if plan.cache == "paged":  # one page pool per prompt group, alive until its replay
        batch = rollout_batch(plan, kv_frame, g_rank + 1, private)
        per_chunk = min(g_rank, max(1, rb // plan.routed_steps))  # branches whose tuples fill a replay batch
        pool = kv_frame * (resident + max(batch * private, per_chunk * plan.local))
        rollout_cache = replay_cache = P * pool
    elif plan.cache == "legacy":  # a working cache + one fork snapshot per group; replay: its own working cache
        batch, rb, recompute = 1, plan.replay_batch or 1, plan.recompute == "blocks"
        rollout_cache = replay_cache = kv_frame * resident * (1 + P)
    else:
        raise ValueError(f"cache must be paged or legacy, got {plan.cache!r}")
    layer_act = activation_bytes_per_layer(plan, m, batch=rb)
    tpf = tokens_per_frame(plan)
    L_tok = plan.frames_per_block * tpf // plan.cp
    held = m["num_layers"] * rb * plan.bytes * L_tok * m["hidden_size"] if recompute else 0
    acts = held + layer_act if recompute else m["num_layers"] * layer_act
    acts += rb * plan.frames_per_block * tpf * m["hidden_size"] * 4  # the head's float32 input (all tokens)
    video = m["in_channels"] * plan.frames * plan.latent_hw[0] * plan.latent_hw[1] * 4
    tuple_el = m["in_channels"] * plan.frames_per_block * plan.latent_hw[0] * plan.latent_hw[1]
    tuples = P * g_rank * window * plan.routed_steps * 2 * tuple_el * 4
    text = 3 * m["num_layers"] * 2 * m["text_len"] * m["hidden_size"] // plan.tp * plan.bytes  # gen, score, ref
    small = P * (g_rank + 2) * video + tuples + P * text
    base = weights + lora + ema + small
    workspace = forward_workspace_bytes(plan, m, batch)
    if plan.spec not in ("local", "te"):
        raise ValueError(f"spec must be local or te, got {plan.spec!r}")
    te_context = 0  # the other layers' context buffers (the forward workspace counts one layer's)
    if plan.spec == "te" and not plan.cuda_graphs:
        te_context = (m["num_layers"] - 1) * batch * plan.bytes * 2 * (plan.sink + plan.local) * tpf \
            * m["hidden_size"] // (plan.tp * plan.cp)
    # merged-LoRA generation keeps an exact copy of every adapted base weight to unmerge to (lora.merged); the replay
    # differentiates the unmerged form, whose copies are dropped while it runs
    backup = weights if plan.merge_lora else 0
    rollout = base + rollout_cache + workspace + te_context + backup
    # branches over DP: the ranks without the anchor replay ``ahead`` branches early, holding each one's gradient
    # and the earlier groups' sum until the coefficients arrive (kvpo/branch_schedule.py's GradStash; float32)
    ahead, _ = plan_counts(dp_size=plan.branches_over_dp, per_rank=g_rank, suffix_blocks=blocks - pivot,
                           steps=2 * plan.routed_steps, window_blocks=window, routed_steps=plan.routed_steps,
                           recompute=recompute)
    stash = (ahead + 1) * n_lora * 4 if ahead else 0
    replay = base + replay_cache + acts + layer_act + stash  # + the backward's transient: one layer's gradients
    gb = lambda x: round(x / GB, 3)  # noqa: E731
    return {
        "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(plan).items()},
        "params_per_gpu": n_par, "lora_params_per_gpu": n_lora, "rollout_batch": batch, "replay_batch": rb,
        "replay_recompute": recompute, "private_frames": private,
        "weights_gb": gb(weights), "lora_and_optimizer_gb": gb(lora), "kv_per_frame_gb": gb(kv_frame),
        "rollout_cache_gb": gb(rollout_cache), "replay_cache_gb": gb(replay_cache),
        "activations_per_tuple_gb": gb(m["num_layers"] * activation_bytes_per_layer(plan, m)),
        "replay_activations_gb": gb(acts), "forward_workspace_gb": gb(workspace),
        "latents_tuples_text_gb": gb(small), "ema_gb": gb(ema), "te_context_gb": gb(te_context),
        "merge_backup_gb": gb(backup), "grad_stash_gb": gb(stash), "peak_rollout_gb": gb(rollout),
        "peak_replay_gb": gb(replay),
        "peak_gb": gb(max(rollout, replay)),
    }


def fit(plan: MemoryPlan, capacity_gb: float) -> tuple[MemoryPlan, dict] | None:
    """The first plan, in order of cost, whose predicted peak fits ``capacity_gb``: as given, then smaller
    rollout batches, then replay recompute with one tuple per batch; None if none fits."""
    tries = [plan] + [dataclasses.replace(plan, branch_batch=b) for b in (4, 2, 1)]
    tries += [dataclasses.replace(p, recompute="blocks", replay_batch=1) for p in list(tries)]
    for p in tries:
        pred = predict(p)
        if pred["peak_gb"] <= capacity_gb:
            return p, pred
    return None
