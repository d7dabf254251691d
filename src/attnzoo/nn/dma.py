"""Dynamic Mask Attention's learned mask, and the layer that uses it.

`DynamicMask` turns value states into the `dma` variant's per-key scores, as the release (Doge):
dt = exp(A softplus(W [v of every kv head])) with W (Hkv * Dv -> Hkv) and A (Hkv,) learned (A starts at 0:
every key scores 1 and the first layer of training decides). `DynamicMaskAttention` is multi-head attention
over the `dma` variant whose dt comes from its own values, the cache included, so a cached step equals
recomputing the whole sequence.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..core.info import Paper
from ..variants.sparse.dma import PAPER
from .common import check_int
from .mha import MultiheadAttention


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


class DynamicMaskAttention(MultiheadAttention):
    """MultiheadAttention over `dma` (each query keeps its `top_k` visible keys by dt, dt added to their scores),
    dt made by a `DynamicMask` from the layer's values."""

    paper: ClassVar[Paper] = PAPER

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 top_k: int = 2048, **kwargs):
        super().__init__(dim, heads, kv_heads, head_dim, variant="dma", top_k=top_k, **kwargs)
        self.mask = DynamicMask(self.kv_heads, self.head_dim)

    @property
    def config(self) -> dict:
        config = super().config
        config.pop("variant")
        return config

    def attention_inputs(self, q, k, v) -> dict:
        return {"dt": self.mask(v).to(v.dtype)}
