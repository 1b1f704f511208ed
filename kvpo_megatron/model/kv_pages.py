"""Physical storage of the streaming KV cache: per-layer pools of frame *pages*.

A page holds one latent frame's K (or V) for this rank's tokens and heads: ``[T, h, d]``. Layer ``i`` keeps all
its pages in one tensor ``k[i]``/``v[i]`` of shape ``[num_pages, T, h, d]``, so that any list of pages of any
samples is read with one ``index_select`` and written with one ``index_copy_``. Which page holds which frame of
which sample is the business of :class:`~kvpo_megatron.model.kv_cache.KVCache` (its page table); several caches
may share one pool (a forked batch reads its parent's pages and writes pages of its own).

The buffers are allocated at the first write (the token count, heads and dtype come from the model) and stay
where they are: a CUDA graph captured over a pool stays valid as long as :attr:`PagePool.generation` does not
change (it changes only when the pool grows).
"""
from __future__ import annotations

import torch


class PagePool:
    """Per-layer K/V page buffers ``[num_pages, T, h, d]``."""

    def __init__(self, num_layers: int, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_layers, self.num_pages = num_layers, num_pages
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.generation = 0
        """Changes whenever the buffers are reallocated (captured CUDA graphs key on it)."""

    def allocate(self, layer: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        """Make sure ``layer``'s buffers exist with this page shape (zero-filled on first use)."""
        shape = (self.num_pages, tokens, heads, head_dim)
        k = self.k[layer]
        if k is not None and tuple(k.shape) == shape and k.dtype == dtype and k.device == device:
            return
        if k is not None:
            raise ValueError(f"KV page pool of layer {layer} holds pages {tuple(k.shape[1:])} {k.dtype} on {k.device}; "
                             f"cannot store {shape[1:]} {dtype} on {device} (use a new cache)")
        self.k[layer] = torch.zeros(shape, dtype=dtype, device=device)
        self.v[layer] = torch.zeros(shape, dtype=dtype, device=device)

    def grow(self, num_pages: int) -> None:
        """Enlarge every layer's buffers to ``num_pages`` pages, keeping their contents."""
        if num_pages <= self.num_pages:
            return
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                if t is not None:
                    new = t.new_zeros((num_pages, *t.shape[1:]))
                    new[: t.shape[0]].copy_(t)
                    store[i] = new
        self.num_pages = num_pages
        self.generation += 1

    def store(self, layer: int, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ([b, F*T, h, d]) into ``pages`` ([b, F]): frame ``j`` of sample ``s`` -> ``pages[s, j]``."""
        b, n_tok, h, d = k.shape
        if pages.shape[0] != b:
            raise ValueError(f"the KV cache holds {pages.shape[0]} sample(s) but the forward writes {b}")
        t = n_tok // pages.shape[1]
        self.allocate(layer, t, h, d, k.dtype, k.device)
        idx = pages.to(k.device).reshape(-1)
        self.k[layer].index_copy_(0, idx, k.detach().reshape(-1, t, h, d))
        self.v[layer].index_copy_(0, idx, v.detach().reshape(-1, t, h, d))

    def gather(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of ``pages`` ([b, n]) as ``[b, n*T, h, d]`` each."""
        k, v = self.k[layer], self.v[layer]
        b, n = pages.shape
        idx = pages.to(k.device).reshape(-1)
        return k.index_select(0, idx).view(b, n * k.shape[1], *k.shape[2:]), \
            v.index_select(0, idx).view(b, n * v.shape[1], *v.shape[2:])

    def pages_kv(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of ``pages`` ([b, n]) as ``[b, n, T, h, d]`` each (a copy)."""
        k, v = self.k[layer], self.v[layer]
        idx = pages.to(k.device)
        return k[idx], v[idx]

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the contents of pages ``src`` into pages ``dst`` (same shape; every allocated layer)."""
        for store in (self.k, self.v):
            for t in store:
                if t is not None:
                    t.index_copy_(0, dst.to(t.device).reshape(-1), t.index_select(0, src.to(t.device).reshape(-1)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def clone_buffers(self) -> tuple[list, list]:
        clone = lambda ts: [None if t is None else t.clone() for t in ts]  # noqa: E731
        return clone(self.k), clone(self.v)

    def load_buffers(self, k: list, v: list) -> None:
        """Copy buffers (as returned by :meth:`clone_buffers`) back in place."""
        for dst, src in ((self.k, k), (self.v, v)):
            for i, t in enumerate(src):
                if t is None:
                    dst[i] = None
                elif dst[i] is None or dst[i].shape != t.shape:
                    dst[i] = t.clone()
                    self.num_pages = max(self.num_pages, t.shape[0])
                    self.generation += 1
                else:
                    dst[i].copy_(t)
