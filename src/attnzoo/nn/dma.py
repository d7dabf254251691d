"""Dynamic Mask Attention's learned mask.

`DynamicMask` turns value states into the `dma` variant's per-key scores, as the release (Doge):
dt = exp(A softplus(W [v of every kv head])) with W (Hkv * Dv -> Hkv) and A (Hkv,) learned (A starts at 0:
every key scores 1 until training moves it). `az.nn.MultiheadAttention(..., variant="dma", top_k=...)` learns one
(`layer.learned["dt"]`) and feeds it the layer's values, the cache included, so a cached step equals
recomputing the whole sequence.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..core.info import Paper
from ..variants.sparse.dma import PAPER
from .common import check_int


class DynamicMask(nn.Module):
    """v (B, Hkv, S, Dv) -> dt (B, Hkv, S) = exp(A softplus(v W))."""

    paper: ClassVar[Paper] = PAPER

    def __init__(self, kv_heads: int, head_dim: int, bias: bool = False):
        super().__init__()
        self.kv_heads = check_int(type(self).__name__, "kv_heads", kv_heads)
        self.head_dim = check_int(type(self).__name__, "head_dim", head_dim)
        self.proj = nn.Linear(kv_heads * head_dim, kv_heads, bias=bias)
        self.A = nn.Parameter(torch.zeros(kv_heads))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 4 or v.shape[1] != self.kv_heads or v.shape[3] != self.head_dim:
            raise ValueError(f"DynamicMask: v must be (B, kv_heads={self.kv_heads}, S, head_dim={self.head_dim}), "
                             f"got {tuple(v.shape)}")
        b, h, s, d = v.shape
        x = v.transpose(1, 2).reshape(b, s, h * d).to(self.proj.weight.dtype)
        return torch.exp(self.A * nn.functional.softplus(self.proj(x))).transpose(1, 2)
