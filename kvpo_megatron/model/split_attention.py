"""Attention of a block over [detached cached frames ; its own tokens] (placeholder, replaced by the split op)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cached_attention(q, k, v, ck, cv):
    """q, k, v [b, L, h, d]; ck, cv [b, N, h, d] (no grad) -> [b, L, h, d]."""
    kk, vv = torch.cat([ck.detach(), k], 1), torch.cat([cv.detach(), v], 1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2)).transpose(1, 2)
