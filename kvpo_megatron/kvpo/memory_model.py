"""Per-GPU memory of one KVPO iteration, from the configuration (``tools/memory_model.py`` prints it as JSON).

Terms (bytes per GPU; ``t`` = TP, ``c`` = CP, ``d`` hidden, ``f`` FFN width, ``r`` LoRA rank, ``T`` tokens per
latent frame, ``F`` frames per block, ``L = F T`` block tokens, ``Ls = L / c`` this rank's tokens, ``Lc`` cached
tokens a block attends, ``Lk = Lc + L``, ``tl`` text tokens, ``h`` heads, ``hd`` head dim):

* weights: every block linear column- (q, k, v, fc1: weight and bias / t) or row-parallel (o, fc2: weight / t,
  bias whole), q/k RMSNorm weights / t, affine LayerNorm (float32) and modulation whole; the embeddings, time
  MLPs and head are replicated. CP and DP replicate everything.
* LoRA on each target linear: column base -> A [r, in] whole, B [out/t, r]; row base -> A [r, in/t], B [out, r].
  Per LoRA parameter: the parameter, its ``.grad`` and AdamW's two states in the LoRA dtype, plus megatron DDP's
  float32 ``main_grad``.
* KV cache per latent frame and sample: ``layers * T * 2 (K, V) * d / (t c) * bytes`` (heads over TP; over CP
  Ulysses shards heads, all-gather shards tokens: the same bytes).
* rollout cache: ``legacy`` (today's trainer): one working cache of ``sink + history`` slots plus one fork
  snapshot per prompt group held until its replay (and the replay's own working cache); ``shared`` (the
  batched-branch engine): one copy of the prefix's resident frames (``sink + history``) plus, per sample of a
  batch that advances together (anchor + branches, ``branch_batch``), a private ring of
  ``max(local, W * F)`` frames.
* replay activations per tuple and layer (autograd's saved tensors of one block-step, local spec, LoRA trains,
  base frozen; counted exactly by tests/test_memory_model.py on a small model for TP=1, TP=2, CP=2 Ulysses and
  all-gather), in the compute dtype ``B`` and float32:
  ``B (2 Lk D_kv + 2 Ls f/t + 3 Ls d + 2 Ls d/t + Ls d/t + q_self + n_tok Ls r + 2 tl d/t + n_txt tl r)
  + 4 (3 Ls d + 3 Ls d/t + 2 Ls hd + lse_self + Ls h/t + 9 Ls + 8 F d + tl d/t + tl)``
  with ``D_kv = d/(t c)`` (``d/t`` under CP all-gather), ``q_self`` = ``L d/t`` (c = 1), ``4 L d/(t c)`` (Ulysses:
  the stacked q, k, v after the all-to-all and the attention output), ``Ls d/t`` (all-gather); ``lse_self`` the
  attention's log-sum-exp likewise; ``n_tok`` LoRA linears on video tokens (8 with every target), ``n_txt`` on
  text (cross k, v). Per-layer recompute keeps each layer's input ``B Ls d`` and rebuilds one layer at a time.
* the forward's transient working set (no grad; not measured here): per sample of a batch, one layer's FFN
  hidden, K/V with context, q/k/v/output and float32 residual copies; the backward's transient: one layer's
  activations again (its gradients).
* small terms: the G+1 videos' latents and the shared noise (float32), replay tuples (x and v_target, float32),
  the prompt's cross-attention K/V for the policy and the reference.

Not modelled: the CUDA context, NCCL buffers, allocator fragmentation (budget ~2-5 GB), TransformerEngine or
compiled kernels' workspaces and CUDA-graph pools (the fast path adds static buffers of one forward).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

GB = 1e9
COLUMN = ("q", "k", "v", "ffn_fc1")
"""LoRA targets whose base linear is column-parallel (the rest, o and ffn_fc2, are row-parallel)."""


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    preset: str = "wan-1.3b"
    tp: int = 1
    cp: int = 1
    cp_attention: str = "ulysses"
    """``ulysses`` or ``allgather`` (only with cp > 1)."""
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
    lora_rank: int = 256
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "ffn_fc1", "ffn_fc2")
    lora_bytes: int = 4
    """LoRA parameter, gradient and AdamW-state bytes (float32; 2 after casting the model to bf16)."""
    bytes: int = 2
    """Weights, activations and KV cache (bf16)."""
    cache: str = "legacy"
    """``legacy`` (today's trainer) or ``shared`` (batched branches over a shared prefix)."""
    branch_batch: int | None = None
    """Samples advancing together in the rollout (None: 1 for legacy, anchor + this rank's branches for shared)."""
    replay_batch: int = 1
    """Tuples replayed together (one block's tuples share its context)."""
    recompute: bool = False
    """Per-layer activation recompute in the replay."""


def model_sizes(preset: str, **overrides) -> dict:
    """The preset's architecture fields (``kvpo_megatron.model.config.PRESETS``) with overrides."""
    from kvpo_megatron.model.config import PRESETS

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


def activation_bytes_per_layer(plan: MemoryPlan, m: dict | None = None, *, cached_frames: int | None = None) -> int:
    """Autograd's saved tensors of one replay block-step, one layer, one tuple (see the module docstring)."""
    m = m or model_sizes(plan.preset)
    d, f, h = m["hidden_size"], m["ffn_hidden_size"], m["num_attention_heads"]
    hd, tl, t, c, r = d // h, m["text_len"], plan.tp, plan.cp, plan.lora_rank
    F = plan.frames_per_block
    L = F * tokens_per_frame(plan)
    Ls = L // c
    Lc = (plan.sink + plan.local - F if cached_frames is None else cached_frames) * tokens_per_frame(plan)
    Lk = Lc + L
    ag = c > 1 and plan.cp_attention == "allgather"
    d_kv = d // t if ag else d // (t * c)
    q_self, lse_self = ((Ls * d // t, Ls * h // t) if ag else (4 * L * d // (t * c), L * h // (t * c)) if c > 1
                        else (L * d // t, L * h // t))
    tg = set(plan.lora_targets)
    n_tok = 2 * len(tg & {"q", "o"}) + len(tg & {"k", "v"}) + len(tg & {"ffn_fc1", "ffn_fc2"})
    n_txt = len(tg & {"k", "v"})
    low = (2 * Lk * d_kv + 2 * Ls * f // t + 3 * Ls * d + 2 * Ls * d // t + Ls * d // t + q_self
           + n_tok * Ls * r + 2 * tl * d // t + n_txt * tl * r)
    fp32 = (3 * Ls * d + 3 * Ls * d // t + 2 * Ls * hd + lse_self + Ls * h // t + 9 * Ls + 8 * F * d
            + tl * d // t + tl)
    return plan.bytes * low + 4 * fp32


def forward_workspace_bytes(plan: MemoryPlan, m: dict, batch: int) -> int:
    """No-grad forward, one layer live at a time (estimate): FFN hidden x2, K/V with context, q/k/v/out, float32
    residual copies."""
    d, f, t, c = m["hidden_size"], m["ffn_hidden_size"], plan.tp, plan.cp
    L = plan.frames_per_block * tokens_per_frame(plan)
    Lk = (plan.sink + plan.local) * tokens_per_frame(plan)
    return batch * (plan.bytes * (2 * L // c * f // t + 2 * Lk * d // (t * c) + 4 * L * d // (t * c))
                    + 4 * 3 * L // c * d)


def predict(plan: MemoryPlan, m: dict | None = None) -> dict:
    """Per-GPU bytes of each term and the two phases' peaks (GB); ``m``: architecture (default: the preset's)."""
    m = m or model_sizes(plan.preset)
    if plan.cp > 1 and plan.cp_attention not in ("ulysses", "allgather"):
        raise ValueError(f"cp_attention must be ulysses or allgather, got {plan.cp_attention!r}")
    g_rank = plan.branches // plan.branches_over_dp
    n_par, n_ln = weight_params(m, plan.tp)
    weights = (n_par - n_ln) * plan.bytes + n_ln * 4
    n_lora = lora_params(m, plan.lora_rank, plan.lora_targets, plan.tp)
    lora = n_lora * (4 * plan.lora_bytes + 4)  # param, grad, 2 Adam states; DDP main_grad float32
    kv_frame = kv_bytes_per_frame(plan, m)
    resident = plan.sink + plan.history
    private = max(plan.local, plan.window * plan.frames_per_block)
    P = plan.prompts_per_rank
    if plan.cache == "legacy":
        batch = plan.branch_batch or 1
        rollout_cache = kv_frame * resident * (batch + P)  # working cache(s) + one fork snapshot per group
        replay_cache = kv_frame * resident * (1 + P)
    elif plan.cache == "shared":
        batch = plan.branch_batch or (g_rank + 1)
        rollout_cache = kv_frame * (resident + batch * private)
        replay_cache = kv_frame * (resident + plan.replay_batch * private)
    else:
        raise ValueError(f"cache must be legacy or shared, got {plan.cache!r}")
    layer_act = activation_bytes_per_layer(plan, m)
    L_tok = plan.frames_per_block * tokens_per_frame(plan) // plan.cp
    if plan.recompute:
        acts = plan.replay_batch * (m["num_layers"] * plan.bytes * L_tok * m["hidden_size"] + layer_act)
    else:
        acts = plan.replay_batch * m["num_layers"] * layer_act
    backward_transient = plan.replay_batch * layer_act
    video = 16 * plan.frames * plan.latent_hw[0] * plan.latent_hw[1] * 4
    tuple_el = 16 * plan.frames_per_block * plan.latent_hw[0] * plan.latent_hw[1]
    tuples = P * g_rank * min(plan.window, plan.frames // plan.frames_per_block) * plan.routed_steps * 2 * tuple_el * 4
    text = 2 * m["num_layers"] * 2 * m["text_len"] * m["hidden_size"] // plan.tp * plan.bytes
    small = P * (g_rank + 2) * video + tuples + P * text
    base = weights + lora + small
    rollout = base + rollout_cache + forward_workspace_bytes(plan, m, batch)
    replay = base + replay_cache + acts + backward_transient
    gb = lambda x: round(x / GB, 3)  # noqa: E731
    return {
        "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(plan).items()},
        "params_per_gpu": n_par, "lora_params_per_gpu": n_lora,
        "weights_gb": gb(weights), "lora_and_optimizer_gb": gb(lora), "kv_per_frame_gb": gb(kv_frame),
        "rollout_cache_gb": gb(rollout_cache), "replay_cache_gb": gb(replay_cache),
        "activations_per_tuple_gb": gb(m["num_layers"] * layer_act), "replay_activations_gb": gb(acts),
        "backward_transient_gb": gb(backward_transient), "forward_workspace_gb": gb(rollout - base - rollout_cache),
        "latents_tuples_text_gb": gb(small), "peak_rollout_gb": gb(rollout), "peak_replay_gb": gb(replay),
        "peak_gb": gb(max(rollout, replay)),
    }


def fit(plan: MemoryPlan, capacity_gb: float) -> tuple[MemoryPlan, dict] | None:
    """The first plan, in order of cost, whose predicted peak fits ``capacity_gb``: as given, then the shared
    cache with smaller branch batches, then replay recompute; None if none fits."""
    tries = [plan]
    if plan.cache == "shared":
        tries += [dataclasses.replace(plan, branch_batch=b) for b in (4, 2, 1)]
    tries += [dataclasses.replace(p, recompute=True) for p in list(tries)]
    for p in tries:
        pred = predict(p)
        if pred["peak_gb"] <= capacity_gb:
            return p, pred
    return None
