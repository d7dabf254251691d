"""Differential attention (Differential Transformer): the difference of two softmax maps cancels the
attention both give to irrelevant context."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..core.info import Paper
from .common import (ROPE_PAPER, KVCache, SizeMixin, apply_rope, check_bool, check_cache, check_float, check_input,
                     check_inputs, check_int, head_layout, positions, require_softmax, resolve_variant, rope_cos_sin)

DIFF_PAPER = Paper("Differential Transformer", 2024, "2410.05258")
NORMS = ("rmsnorm", "groupnorm")


def lambda_init(layer: int) -> float:
    """The paper's schedule, layer counted from 1: 0.8 - 0.6 exp(-0.3 (layer - 1))."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


class DifferentialAttention(SizeMixin, nn.Module):
    """Differential attention, as the paper (Sec. 2.1-2.2) and its released `multihead_diffattn`:

        [Q1; Q2] = x W_Q, [K1; K2] = x W_K, V = x W_V         (per head: Q1, Q2, K1, K2 of dim d, V of dim 2d)
        DiffAttn = (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V
        lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init   (4 learned vectors in R^d)
        head_i' = (1 - lambda_init) Norm(head_i),  y = [head_1' ... head_H'] W_O

    with lambda_init = 0.8 - 0.6 exp(-0.3 (layer - 1)) (`layer` counted from 1) and lambda shared by the
    heads of a layer. `heads` differential heads of value dim 2d; d = `head_dim` (default
    dim // (2 heads)), so the projections have the sizes of a `heads`-head transformer. `norm`:
    "rmsnorm" (the release: RMSNorm over each head's 2d channels, one affine weight shared by the
    heads) or "groupnorm" (the paper's GroupNorm: per-head statistics, mean removed, per-channel
    affine). lambda vectors start at N(0, 0.1^2) as released.

    GQA: `kv_heads` groups; head h reads K1, K2 and V of KV head h // (heads // kv_heads). (The release
    repeats its 2 kv_heads key heads over the 2 heads query heads in order, which for heads //
    kv_heads > 1 pairs Q1 and Q2 of a head with the same key head; this module keeps K1 and K2
    apart; with kv_heads = heads both are the same.) RoPE (rotate-half) on each of Q1, Q2, K1, K2.
    The core is any softmax-family attnzoo variant, applied to each of the two maps (by linearity,
    (A1 - lambda A2) V = A1 V - lambda A2 V); the cache (`KVCache`) holds K1, K2 as k (B, 2 kv_heads,
    S, d), head g's pair at 2g, 2g + 1, and V as v (B, kv_heads, S, 2d).
    """

    paper: ClassVar[Paper] = DIFF_PAPER
    rope_paper: ClassVar[Paper] = ROPE_PAPER

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 layer: int = 1, variant: str = "full", rope: bool = True, rope_base: float = 10000.0,
                 bias: bool = False, norm: str = "rmsnorm", eps: float = 1e-5, **params):
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "dim", dim)
        check_int(owner, "heads", heads)
        if head_dim is None:
            if dim % (2 * heads):
                raise ValueError(f"{owner}: dim must be divisible by 2 * heads (each head has Q1, Q2, K1, K2 of dim "
                                 f"dim // (2 heads)) when head_dim is not given; got dim={dim}, heads={heads}")
            head_dim = dim // (2 * heads)
        self.heads, self.kv_heads, self.head_dim = head_layout(owner, dim, heads, kv_heads, head_dim)
        self.dim = dim
        self.layer = check_int(owner, "layer", layer)
        self.lambda_init = lambda_init(layer)
        self.rope = check_bool(owner, "rope", rope)
        self.rope_base = check_float(owner, "rope_base", rope_base)
        self.bias = check_bool(owner, "bias", bias)
        self.eps = check_float(owner, "eps", eps)
        if rope and self.head_dim % 2:
            raise ValueError(f"{owner}: RoPE rotates pairs of channels, head_dim must be even; got head_dim="
                             f"{self.head_dim} (or pass rope=False)")
        if norm not in NORMS:
            raise ValueError(f"{owner}: norm must be one of {list(NORMS)}, got {norm!r}")
        self.norm_kind = norm
        self.variant, self.params = variant, dict(params)
        self.attn = resolve_variant(owner, variant, params)
        require_softmax(owner, self.attn)
        d, h, hkv = self.head_dim, self.heads, self.kv_heads
        self.q_proj = nn.Linear(dim, h * 2 * d, bias=bias)
        self.k_proj = nn.Linear(dim, hkv * 2 * d, bias=bias)
        self.v_proj = nn.Linear(dim, hkv * 2 * d, bias=bias)
        self.o_proj = nn.Linear(h * 2 * d, dim, bias=bias)
        self.lambda_q1 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
        self.lambda_k1 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
        self.lambda_q2 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
        self.lambda_k2 = nn.Parameter(torch.empty(d).normal_(0.0, 0.1))
        if norm == "rmsnorm":
            self.norm = nn.RMSNorm(2 * d, eps=eps)
        else:
            self.norm = nn.GroupNorm(h, h * 2 * d, eps=eps)

    @property
    def config(self) -> dict:
        return dict(dim=self.dim, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim, layer=self.layer,
                    variant=self.variant, rope=self.rope, rope_base=self.rope_base, bias=self.bias,
                    norm=self.norm_kind, eps=self.eps, **self.params)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"layer={self.layer}, lambda_init={self.lambda_init:.4f}, variant={self.variant!r}, "
                f"norm={self.norm_kind!r}")

    def kv_elements_per_token(self) -> int:
        """K1, K2 (d each) and V (2d) per KV head."""
        return 4 * self.kv_heads * self.head_dim

    def lambda_full(self) -> torch.Tensor:
        """lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init (a scalar tensor)."""
        first = torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
        second = torch.exp(torch.dot(self.lambda_q2, self.lambda_k2))
        return first - second + self.lambda_init

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, causal: bool = True, **inputs):
        owner = type(self).__name__
        x = check_input(owner, x, self.dim)
        check_inputs(owner, inputs)
        b, s, _ = x.shape
        d, h, hkv = self.head_dim, self.heads, self.kv_heads
        if cache is not None:
            check_cache(owner, cache, KVCache, b, x.device)
            if cache.k.shape[1] != 2 * hkv or cache.k.shape[3] != d or cache.v.shape[3] != 2 * d:
                raise ValueError(f"{owner}: cache holds keys {tuple(cache.k.shape)} and values {tuple(cache.v.shape)}, "
                                 f"this module makes (B, {2 * hkv}, S, {d}) and (B, {hkv}, S, {2 * d})")
        offset = 0 if cache is None else cache.length
        q = self.q_proj(x).view(b, s, 2 * h, d).transpose(1, 2)  # head i's Q1, Q2 at 2i, 2i + 1
        k = self.k_proj(x).view(b, s, 2 * hkv, d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, hkv, 2 * d).transpose(1, 2)
        if self.rope:
            cos, sin = rope_cos_sin(positions(offset, s, x.device), d, self.rope_base, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        cache = KVCache(k, v)
        o1 = self.attn(q[:, 0::2].contiguous(), k[:, 0::2].contiguous(), v, causal=causal, **inputs)
        o2 = self.attn(q[:, 1::2].contiguous(), k[:, 1::2].contiguous(), v, causal=causal, **inputs)
        o = o1 - self.lambda_full().to(o1.dtype) * o2  # (B, H, S, 2d)
        if self.norm_kind == "rmsnorm":
            o = self.norm(o).transpose(1, 2).reshape(b, s, h * 2 * d)
        else:
            o = self.norm(o.transpose(1, 2).reshape(b * s, h * 2 * d)).view(b, s, h * 2 * d)
        return self.o_proj(o * (1.0 - self.lambda_init)), cache
