"""Shared Attention (SA): later layers reuse the attention weights an earlier layer computed, with
values of their own."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.info import Paper
from .common import (KVCache, apply_rope, check_bool, check_cache, check_input, check_inputs, positions,
                     require_softmax, rope_cos_sin)
from .mha import MultiheadAttention

SA_PAPER = Paper("Beyond KV Caching: Shared Attention for Efficient LLMs", 2024, "2407.12866")


@dataclass
class SharedWeightsCache(KVCache):
    """The cache of the layer that computes the shared attention weights: its keys and values, and
    the queries of the last call (what the sharing layers need to weigh their own values alike;
    not part of the cache's size)."""

    q: torch.Tensor | None = None


class SharedAttention(MultiheadAttention):
    """Multi-head (GQA/MQA) attention where a span of layers shares one layer's attention weights
    (Liao & Vargas, 2024): the first layer (`computes_weights=True`) is ordinary attention and returns
    a `SharedWeightsCache`; the following ones (`computes_weights=False`) have no query or key
    projections and compute softmax(q k^T / sqrt(d)) V_own with that layer's q and k:
    `forward(x, cache=None, causal=True, weights_from=<that cache>)`. Their cache holds only their
    values (a `KVCache` whose keys have 0 channels): head_dim * kv_heads numbers per token. The
    shared weights are never materialised: the core runs on the first layer's q, k and the layer's
    own v. Softmax-family variants only."""

    paper: ClassVar[Paper] = SA_PAPER

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 computes_weights: bool = True, variant: str = "full", rope: bool = True, rope_base: float = 10000.0,
                 bias: bool = False, **params):
        super().__init__(dim, heads, kv_heads, head_dim, variant, rope, rope_base, bias, **params)
        owner = type(self).__name__
        self.computes_weights = check_bool(owner, "computes_weights", computes_weights)
        require_softmax(owner, self.attn)
        if not computes_weights:
            self.q_proj = self.k_proj = None

    @property
    def config(self) -> dict:
        return {**super().config, "computes_weights": self.computes_weights}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", computes_weights={self.computes_weights}"

    def kv_elements_per_token(self) -> int:
        return (2 if self.computes_weights else 1) * self.kv_heads * self.head_dim

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, causal: bool = True,
                weights_from: SharedWeightsCache | None = None, **inputs):
        owner = type(self).__name__
        if self.computes_weights:
            if weights_from is not None:
                raise ValueError(f"{owner}: this layer computes the attention weights (computes_weights=True); "
                                 "weights_from must be None")
            y, full = super().forward(x, cache, causal, **inputs)
            b, s = x.shape[:2]
            # the queries again (one projection) rather than a second copy of the forward
            q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            if self.rope:
                cos, sin = rope_cos_sin(positions(full.length - s, s, x.device), self.head_dim, self.rope_base, q.dtype)
                q = apply_rope(q, cos, sin)
            return y, SharedWeightsCache(full.k, full.v, q)
        if not isinstance(weights_from, SharedWeightsCache) or weights_from.q is None:
            raise TypeError(f"{owner}: weights_from must be the SharedWeightsCache returned by this step's call of the "
                            f"layer that computes the weights, got {type(weights_from).__name__}")
        x = check_input(owner, x, self.dim)
        check_inputs(owner, inputs)
        b, s, _ = x.shape
        src = weights_from
        if src.q.shape[:3] != (b, self.heads, s) or src.k.shape[1] != self.kv_heads:
            raise ValueError(f"{owner}: weights_from holds queries {tuple(src.q.shape)} and keys {tuple(src.k.shape)}; "
                             f"expected (B={b}, {self.heads}, S={s}, ...) and {self.kv_heads} KV heads")
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            check_cache(owner, cache, KVCache, b, x.device)
            v = torch.cat([cache.v, v], dim=2)
        if v.shape[2] != src.k.shape[2]:
            raise ValueError(f"{owner}: this layer has values for {v.shape[2]} tokens, weights_from keys for "
                             f"{src.k.shape[2]}; feed both layers the same tokens")
        o = self.attn(src.q, src.k, v, causal=causal, **inputs)
        y = self.o_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
        return y, KVCache(v.new_empty(b, self.kv_heads, v.shape[2], 0), v)
