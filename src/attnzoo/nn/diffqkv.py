"""Sigma's DiffQKV attention: keys and values compressed differently, with their own numbers of heads
and head dimensions."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..core.info import Paper
from .common import (ROPE_PAPER, KVCache, SizeMixin, apply_rope, check_bool, check_cache, check_float, check_input,
                     check_inputs, check_int, positions, require_softmax, resolve_variant, rope_cos_sin)

SIGMA_PAPER = Paper("Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models", 2025,
                    "2501.13629")


class DiffQKVAttention(SizeMixin, nn.Module):
    """DiffQKV (Sigma): `k_heads` key heads of dim `head_dim` and `v_heads` value heads of dim
    `v_head_dim`, each count dividing `heads` (Sigma keeps fewer K heads than V heads: the model is
    less sensitive to compressing K). Query head h reads key head h // (heads // k_heads) and value
    head h // (heads // v_heads); scores scaled by 1/sqrt(head_dim). The cache (`KVCache`) holds k
    (B, k_heads, S, head_dim) and v (B, v_heads, S, v_head_dim): k_heads head_dim + v_heads
    v_head_dim numbers per token. For the core (which pairs each key head with one value head) the
    smaller of the two head sets is repeated up to the larger, which it must divide. Sigma's other
    half, an augmented query, is not modelled. RoPE (rotate-half) on q and k; softmax-family variants."""

    paper: ClassVar[Paper] = SIGMA_PAPER
    rope_paper: ClassVar[Paper] = ROPE_PAPER

    def __init__(self, dim: int, heads: int, k_heads: int, v_heads: int, head_dim: int, v_head_dim: int | None = None,
                 variant: str = "full", rope: bool = True, rope_base: float = 10000.0, bias: bool = False, **params):
        super().__init__()
        owner = type(self).__name__
        self.dim, self.heads = check_int(owner, "dim", dim), check_int(owner, "heads", heads)
        self.k_heads, self.v_heads = check_int(owner, "k_heads", k_heads), check_int(owner, "v_heads", v_heads)
        for name, n in (("k_heads", k_heads), ("v_heads", v_heads)):
            if n > heads or heads % n:
                raise ValueError(f"{owner}: heads % {name} must be 0 with {name} <= heads; got heads={heads}, "
                                 f"{name}={n}")
        if max(k_heads, v_heads) % min(k_heads, v_heads):
            raise ValueError(f"{owner}: the smaller of k_heads={k_heads}, v_heads={v_heads} must divide the larger")
        self.head_dim = check_int(owner, "head_dim", head_dim)
        self.v_head_dim = head_dim if v_head_dim is None else check_int(owner, "v_head_dim", v_head_dim)
        self.rope = check_bool(owner, "rope", rope)
        self.rope_base = check_float(owner, "rope_base", rope_base)
        self.bias = check_bool(owner, "bias", bias)
        if rope and head_dim % 2:
            raise ValueError(f"{owner}: RoPE rotates pairs of channels, head_dim must be even; got {head_dim}")
        self.variant, self.params = variant, dict(params)
        self.attn = resolve_variant(owner, variant, params)
        require_softmax(owner, self.attn)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, k_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, v_heads * self.v_head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.v_head_dim, dim, bias=bias)

    @property
    def config(self) -> dict:
        return dict(dim=self.dim, heads=self.heads, k_heads=self.k_heads, v_heads=self.v_heads, head_dim=self.head_dim,
                    v_head_dim=self.v_head_dim, variant=self.variant, rope=self.rope, rope_base=self.rope_base,
                    bias=self.bias, **self.params)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, k_heads={self.k_heads}, v_heads={self.v_heads}, "
                f"head_dim={self.head_dim}, v_head_dim={self.v_head_dim}, variant={self.variant!r}")

    def kv_elements_per_token(self) -> int:
        return self.k_heads * self.head_dim + self.v_heads * self.v_head_dim

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, causal: bool = True, **inputs):
        owner = type(self).__name__
        x = check_input(owner, x, self.dim)
        check_inputs(owner, inputs)
        b, s, _ = x.shape
        if cache is not None:
            check_cache(owner, cache, KVCache, b, x.device)
            if cache.k.shape[1::2] != (self.k_heads, self.head_dim) or cache.v.shape[1::2] != (self.v_heads,
                                                                                               self.v_head_dim):
                raise ValueError(f"{owner}: cache holds keys {tuple(cache.k.shape)} and values {tuple(cache.v.shape)}, "
                                 f"this module makes (B, {self.k_heads}, S, {self.head_dim}) and "
                                 f"(B, {self.v_heads}, S, {self.v_head_dim})")
        offset = 0 if cache is None else cache.length
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.k_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.v_heads, self.v_head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = rope_cos_sin(positions(offset, s, x.device), self.head_dim, self.rope_base, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        cache = KVCache(k, v)
        n = max(self.k_heads, self.v_heads)
        o = self.attn(q, k.repeat_interleave(n // self.k_heads, dim=1), v.repeat_interleave(n // self.v_heads, dim=1),
                      causal=causal, **inputs)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.v_head_dim)), cache
