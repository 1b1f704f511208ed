"""An independent re-implementation of the upstream causal inference loops (Self-Forcing, LongLive, MemFlow),
written from their code, not from this engine, for ``tests/sampling/test_upstream_inference.py``.

Files read (line numbers at the commits named):

* Self-Forcing (guandeh17/Self-Forcing 33593df): ``pipeline/causal_inference.py`` 26-31 (warped step list),
  176-235 (denoise with ``x0`` then ``scheduler.add_noise(x0, randn, next_t)``; commit of ``denoised_pred`` at
  ``timestep = context_noise`` as given, no noise); ``utils/scheduler.py`` 106-176 (``FlowMatchScheduler``:
  ``sigmas = linspace(1, 0, 1001)[:-1]`` shifted, ``timesteps = 1000 sigmas``, ``add_noise``); ``utils/
  wan_wrapper.py`` 136-139 (``shift``, ``sigma_min=0``, ``extra_one_step``), 169-193 (``x0 = x - sigma v`` in
  float64); ``wan/modules/causal_model.py`` 194-235 (cache write, roll, attention window).
* LongLive 1.0 (NVlabs/LongLive 2462895): ``wan/modules/causal_model.py`` 205-348 (roll, sink protection during
  recompute, ``[sink ; last max_attention_size - sink tokens]`` window), 837-889 (updates applied after the
  forward); ``pipeline/interactive_causal_inference.py`` 34-96 (recache at a switch with ``global_sink``).
* MemFlow (KlingTeam/MemFlow 7ed5147): ``pipeline/causal_inference.py`` 161-226 (``q_bank`` on the first step,
  ``update_bank`` on every forward); ``wan/modules/causal_model.py`` 300-486 (``current_end_bank``, the attended
  bank prefix), 994-1099 (``k_new``, ``_apply_cache_updates_before``), 1101-1191 (``compress_kv_bank``).

The model itself (the same converted weights) is this package's ``CausalWanDiT``: the reference passes a cache
object of its own that keeps upstream's token buffers and hands each attention layer upstream's window.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


# ---- scheduler -------------------------------------------------------------------------------------------------
class UpstreamSchedule:
    """``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000)`` and the warped list."""

    def __init__(self, steps=(1000, 750, 500, 250), shift: float = 5.0):
        sig = torch.linspace(1.0, 0.0, 1001)[:-1]
        self.sigmas = shift * sig / (1 + (shift - 1) * sig)
        self.timesteps = self.sigmas * 1000
        table = torch.cat([self.timesteps, torch.zeros(1)])
        self.steps = table[1000 - torch.tensor(steps, dtype=torch.long)]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[torch.argmin((self.timesteps - t).abs())]

    def x0(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.sigma(t).double() * v.double()).to(v.dtype)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t)
        return ((1 - s) * x0 + s * eps).type_as(eps)


# ---- cache -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Upstream ``model_kwargs`` (frames)."""

    local_attn_size: int  # -1: global attention over a ``global_frames`` cache
    sink_size: int
    bank_size: int = 0  # MemFlow
    record_interval: int = 3
    global_frames: int = 21  # Self-Forcing's 32760-token cache is 21 frames of 1560 tokens


@dataclass
class Pass:
    """What upstream hands one forward: ``current_start`` (tokens), the prompt's cross-attention K per layer,
    and MemFlow's flags."""

    start: int
    text_k: list
    q_bank: bool = False
    update_bank: bool = True


@dataclass
class _State:
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    global_end: int = 0
    local_end: int = 0
    bank_k: torch.Tensor | None = None
    bank_v: torch.Tensor | None = None
    k_new: torch.Tensor | None = None
    v_new: torch.Tensor | None = None
    bank_global_end: int = 0
    bank_local_end: int = 0
    pending: dict = field(default_factory=dict)


class UpstreamCache:
    """Per-layer token buffers under upstream's rules. The model calls ``layer(i, view).read(q)`` then
    ``.write(k, v)``: ``read`` returns upstream's attention window without the current tokens (it checks that they
    end the window), ``write`` applies upstream's update."""

    def __init__(self, layout: Layout, num_layers: int, tokens_per_frame: int):
        self.layout, self.t = layout, tokens_per_frame
        self.states = [_State() for _ in range(num_layers)]
        frames = layout.global_frames if layout.local_attn_size == -1 else layout.local_attn_size
        self.size = frames * tokens_per_frame  # kv_cache_size == max_attention_size here
        self.windows: list[tuple[int, int, int]] = []  # (layer, start, attended tokens) for the tests

    def layer(self, i: int, view: Pass) -> "_Layer":
        return _Layer(self, i, view)


class _Layer:
    def __init__(self, cache: UpstreamCache, i: int, view: Pass):
        self.c, self.i, self.p = cache, i, view

    def read(self, q: torch.Tensor):
        c, st, lay, t = self.c, self.c.states[self.i], self.c.layout, self.c.t
        b, n, h, d = q.shape
        if st.k is None:
            st.k, st.v = q.new_zeros(b, c.size, h, d), q.new_zeros(b, c.size, h, d)
            if lay.bank_size:
                st.bank_k, st.bank_v = q.new_zeros(b, lay.bank_size * t, h, d), q.new_zeros(b, lay.bank_size * t, h, d)
        if lay.bank_size and self.p.q_bank:
            self._bank_before(st)
        start, end, sink = self.p.start, self.p.start + n, lay.sink_size * t
        recompute = end <= st.global_end and start > 0
        k, v = st.k.clone(), st.v.clone()
        if lay.local_attn_size != -1 and end > st.global_end and n + st.local_end > c.size:  # roll
            evicted = n + st.local_end - c.size
            rolled = st.local_end - evicted - sink
            k[:, sink:sink + rolled] = k[:, sink + evicted:sink + evicted + rolled].clone()
            v[:, sink:sink + rolled] = v[:, sink + evicted:sink + evicted + rolled].clone()
            local_end = st.local_end + end - st.global_end - evicted
        else:
            local_end = st.local_end + end - st.global_end
        local_start = local_end - n
        write_start = max(local_start, sink) if recompute else local_start
        if sink > 0:
            window = list(range(sink)) + list(range(max(sink, local_end - (c.size - sink)), local_end))
        else:
            window = list(range(max(0, local_end - c.size), local_end))
        current = list(range(local_start, local_end))
        assert write_start == local_start and window[len(window) - n:] == current, \
            "upstream's window does not end with the current tokens"
        assert not set(window[:len(window) - n]) & set(current), "current tokens attended twice"
        old = window[:len(window) - n]
        n_sink = sum(1 for j in old if j < sink)
        parts_k, parts_v = [k[:, old[:n_sink]]], [v[:, old[:n_sink]]]
        bank = {}
        if lay.bank_size:
            bank = self._bank_indices(st, start, end, n)
            parts_k.append(st.bank_k[:, :bank["attended"]])
            parts_v.append(st.bank_v[:, :bank["attended"]])
        parts_k.append(k[:, old[n_sink:]])
        parts_v.append(v[:, old[n_sink:]])
        st.pending = dict(k=k, v=v, local_start=local_start, local_end=local_end, end=end, recompute=recompute, **bank)
        ctx_k, ctx_v = torch.cat(parts_k, 1), torch.cat(parts_v, 1)
        c.windows.append((self.i, start, ctx_k.shape[1] + n))
        return (ctx_k, ctx_v) if ctx_k.shape[1] else None

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        st, p = self.c.states[self.i], self.c.states[self.i].pending
        p["k"][:, p["local_start"]:p["local_end"]] = k
        p["v"][:, p["local_start"]:p["local_end"]] = v
        st.k, st.v = p["k"], p["v"]
        if self.c.layout.bank_size and self.p.update_bank:
            st.k_new, st.v_new = k[:, :self.c.t].clone(), v[:, :self.c.t].clone()
        if not p["recompute"]:
            st.global_end, st.local_end = p["end"], p["local_end"]
            if self.c.layout.bank_size and self.p.update_bank:
                st.bank_global_end, st.bank_local_end = p["bank_end"], p["bank_local_end"]

    # ---- MemFlow -------------------------------------------------------------------------------------------
    def _bank_indices(self, st: _State, start: int, end: int, n: int) -> dict:
        t, ri = self.c.t, self.c.layout.record_interval
        bank_end = ((end // (t * 3) - 1) // ri + 1) * t
        local_end = st.bank_local_end + bank_end - st.bank_global_end
        local_start = local_end - n // 3
        update = (start // (3 * t)) % ri == 0
        attended = min(local_start if update else local_end, st.bank_k.shape[1])
        return dict(bank_end=bank_end, bank_local_end=local_end, attended=attended)

    def _bank_before(self, st: _State) -> None:
        t, end = self.c.t, st.bank_local_end
        if end < t:
            return
        if end <= st.bank_k.shape[1]:
            st.bank_k[:, end - t:end], st.bank_v[:, end - t:end] = st.k_new, st.v_new
            return
        text_q = self.p.text_k[self.i]  # [B, Lt, H, D]: the cross-attention cache's K, every position
        hist_k, hist_v = st.bank_k.clone(), st.bank_v.clone()
        b, length, h, d = hist_k.shape
        q = text_q.permute(0, 2, 1, 3).reshape(b * h, -1, d)
        kk = hist_k.permute(0, 2, 1, 3).reshape(b * h, length, d)
        scores = torch.bmm(q.float(), kk.float().transpose(1, 2)) * d ** -0.5
        per_block = scores.mean(1).view(b, h, length).mean(1).view(b, length // t, t).mean(2)
        keep = self.c.layout.bank_size - 1
        top = torch.topk(per_block, k=min(keep, length // t), dim=1).indices
        idx = top.view(b, -1, 1, 1, 1).expand(-1, -1, t, h, d)
        sel_k = torch.gather(hist_k.view(b, -1, t, h, d), 1, idx)
        sel_v = torch.gather(hist_v.view(b, -1, t, h, d), 1, idx)
        st.bank_k = torch.cat([sel_k, st.k_new.view(b, 1, t, h, d)], 1).reshape(b, -1, h, d)
        st.bank_v = torch.cat([sel_v, st.v_new.view(b, 1, t, h, d)], 1).reshape(b, -1, h, d)


# ---- the pipeline loop -----------------------------------------------------------------------------------------
@torch.no_grad()
def upstream_generate(model, noise: torch.Tensor, prompts: list[tuple[int, object]], layout: Layout,
                      schedule: UpstreamSchedule, *, context_noise: float, eps: list[list[torch.Tensor]],
                      frames_per_block: int = 3, recache: bool = False) -> torch.Tensor:
    """``noise`` [b, C, F, H, W]; ``prompts``: (start frame, TextKV); ``eps[block][step]``: the fresh noise of each
    re-noising step. Returns the latents, block by block as upstream's ``output``."""
    b, _, nf, hh, ww = noise.shape
    _, ph, pw = model.config.patch_size
    t_tok = (hh // ph) * (ww // pw)
    cache = UpstreamCache(layout, model.config.num_layers, t_tok)
    out = torch.zeros_like(noise)
    switches = dict(prompts)
    text = switches[0]

    def forward(x, t, start_frame, q_bank=False, update_bank=True, compute_output=True):
        view = Pass(start=start_frame * t_tok, text_k=[kv[0] for kv in text.layers], q_bank=q_bank,
                    update_bank=update_bank)
        ts = torch.full((b,), float(t), dtype=torch.float32)
        return model(x, ts, text=text, frame_offset=start_frame, cache=cache, view=view,
                     compute_output=compute_output)

    for blk in range(nf // frames_per_block):
        s = blk * frames_per_block
        if s > 0 and s in switches:
            text = switches[s]
            if recache:  # LongLive, global_sink: recompute the window's non-sink frames under the new prompt
                # Upstream runs min(local_attn_size, s) frames from s - that; with s > local_attn_size its first
                # sink_size frames are neither written (sink protection) nor attended, so the forward of the
                # last local_attn_size - sink_size frames is the same computation.
                first = s - (layout.local_attn_size - layout.sink_size)
                forward(out[:, :, first:s], context_noise, first, compute_output=False)
        x = noise[:, :, s:s + frames_per_block]
        for i, t in enumerate(schedule.steps):
            x0 = schedule.x0(forward(x, t, s, q_bank=i == 0), x, t)
            if i < len(schedule.steps) - 1:
                x = schedule.add_noise(x0, eps[blk][i], schedule.steps[i + 1])
        out[:, :, s:s + frames_per_block] = x0
        forward(x0, context_noise, s, compute_output=False)  # the clean latents at context_noise as given
    return out
