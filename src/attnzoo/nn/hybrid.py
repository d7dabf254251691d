"""Hybrid heads (Hymba, Falcon-H1): attention heads and recurrent (linear-attention / SSM-like) heads
reading the same input in parallel, their normalised outputs averaged."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.info import Paper
from .common import KVCache, SizeMixin, StateCache, check_input, check_int, is_recurrent
from .mha import MultiheadAttention

HYMBA_PAPER = Paper("Hymba: A Hybrid-head Architecture for Small Language Models", 2024, "2411.13676")
FALCON_H1_PAPER = Paper("Falcon-H1: A Family of Hybrid-Head Language Models Redefining Efficiency and Performance",
                        2025, "2507.22448")


@dataclass
class HybridCache:
    """The attention path's KVCache and the recurrent path's StateCache."""

    kv: KVCache
    state: StateCache

    @property
    def length(self) -> int:
        return self.kv.length

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.state.nbytes


class HybridHeadAttention(SizeMixin, nn.Module):
    """Hymba's hybrid-head layer: `attn_heads` attention heads (any softmax-family `attn_variant`, e.g.
    sliding_window for Hymba's local layers) and `rec_heads` recurrent heads (a linear-family
    `rec_variant`, GLA by default with its learned gates, standing in for Hymba's Mamba heads) read x
    in parallel, each path with its projections; the outputs are RMS-normalised, scaled by learned
    vectors beta_1, beta_2 and averaged:

        y = (beta_1 * norm(attn(x)) + beta_2 * norm(rec(x))) / 2

    (Falcon-H1 likewise runs attention and SSM channels side by side in each layer.) Each path is an
    attnzoo `MultiheadAttention`; `attn_params` / `rec_params` configure the variants. The cache is a
    `HybridCache`: the attention KV grows per token, the recurrent state is constant."""

    paper: ClassVar[Paper] = HYMBA_PAPER
    also: ClassVar[Paper] = FALCON_H1_PAPER

    def __init__(self, dim: int, attn_heads: int, rec_heads: int, kv_heads: int | None = None,
                 head_dim: int | None = None, attn_variant: str = "full", rec_variant: str = "gla",
                 attn_params: dict | None = None, rec_params: dict | None = None, rope: bool = True, eps: float = 1e-6):
        super().__init__()
        owner = type(self).__name__
        self.dim = check_int(owner, "dim", dim)
        check_int(owner, "attn_heads", attn_heads)
        check_int(owner, "rec_heads", rec_heads)
        head_dim = head_dim or dim // (attn_heads + rec_heads)
        self.attn_path = MultiheadAttention(dim, attn_heads, kv_heads, head_dim, attn_variant, rope,
                                            **(attn_params or {}))
        self.rec_path = MultiheadAttention(dim, rec_heads, None, head_dim, rec_variant, rope, **(rec_params or {}))
        if is_recurrent(self.attn_path.attn):
            raise ValueError(f"{owner}: attn_variant must be a softmax-family variant, got {attn_variant!r} "
                             "(recurrent)")
        if not self.rec_path.recurrent:
            raise ValueError(f"{owner}: rec_variant must be a recurrent (linear-family) variant, got {rec_variant!r}")
        self.attn_norm, self.rec_norm = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        self.beta_attn, self.beta_rec = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def kv_elements_per_token(self) -> int:
        return self.attn_path.kv_elements_per_token()

    def state_bytes(self, batch: int = 1, dtype: torch.dtype | None = None) -> int:
        return self.rec_path.state_bytes(batch, dtype)

    def forward(self, x: torch.Tensor, cache: HybridCache | None = None, causal: bool = True):
        owner = type(self).__name__
        x = check_input(owner, x, self.dim)
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(f"{owner}: cache must be a HybridCache returned by this module, got {type(cache).__name__}")
        a, kv = self.attn_path(x, None if cache is None else cache.kv, causal)
        r, state = self.rec_path(x, None if cache is None else cache.state, causal)
        y = (self.beta_attn * self.attn_norm(a) + self.beta_rec * self.rec_norm(r)) / 2
        return y, HybridCache(kv, state)
