"""Collinear constrained attention (CoCA): each key is a non-negative rescaling of the query it meets,
pair by pair of RoPE channels, so RoPE's rotation alone decides how scores change with distance."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core.info import Paper
from .common import (KVCache, apply_rope, check_cache, check_input, check_inputs, positions, require_softmax,
                     rope_cos_sin)
from .mha import MultiheadAttention

COCA_PAPER = Paper("Cure the headache of Transformers via Collinear Constrained Attention", 2023, "2309.08646")


class CollinearConstrainedAttention(MultiheadAttention):
    """CoCA, as the authors' released Llama attention: the key projection becomes a projection T of
    non-negative magnitudes, t = relu((T_1 x + T_2 x) / 2) over the two RoPE halves, repeated to
    both halves; the score of query m and key n is

        s(m, n) = sum_d q_m,d RoPE_m(q_m)_d RoPE_n(t_n)_d / sqrt(head_dim)

    i.e. the key is collinear with the query in each RoPE plane, scaled by t. This is ordinary
    attention between q' = q * RoPE(q) and k' = RoPE(t), so any softmax-family variant runs it and
    no S x S tensor is built. The cache (`KVCache`) holds RoPE(t) and v: multi-head attention's KV
    bytes (t could be kept at half that, unrotated). RoPE is part of the definition (rope=True)."""

    paper: ClassVar[Paper] = COCA_PAPER

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 variant: str = "full", rope_base: float = 10000.0, bias: bool = False, **params):
        if params.pop("rope", True) is not True:
            raise ValueError(f"{type(self).__name__}: RoPE is part of CoCA's definition; rope must be True")
        super().__init__(dim, heads, kv_heads, head_dim, variant, True, rope_base, bias, **params)
        require_softmax(type(self).__name__, self.attn)

    @property
    def config(self) -> dict:
        c = super().config
        del c["rope"]
        return c

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, causal: bool = True, **inputs):
        owner = type(self).__name__
        x = check_input(owner, x, self.dim)
        check_inputs(owner, inputs)
        b, s, _ = x.shape
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        if cache is not None:
            check_cache(owner, cache, KVCache, b, x.device)
            if cache.k.shape[1::2] != (hkv, d) or cache.v.shape[1::2] != (hkv, d):
                raise ValueError(f"{owner}: cache holds keys {tuple(cache.k.shape)}, this module makes "
                                 f"(B, {hkv}, S, {d})")
        offset = 0 if cache is None else cache.length
        q = self.q_proj(x).view(b, s, h, d).transpose(1, 2)
        t = self.k_proj(x).view(b, s, hkv, 2, d // 2).mean(dim=3)
        t = F.relu(t).repeat(1, 1, 1, 2).transpose(1, 2)  # (B, Hkv, S, d): one magnitude per RoPE pair
        v = self.v_proj(x).view(b, s, hkv, d).transpose(1, 2)
        cos, sin = rope_cos_sin(positions(offset, s, x.device), d, self.rope_base, q.dtype)
        q_pair, k = q * apply_rope(q, cos, sin), apply_rope(t, cos, sin)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        o = self.attn(q_pair, k, v, causal=causal, scale=d ** -0.5, **inputs)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, h * d)), KVCache(k, v)
