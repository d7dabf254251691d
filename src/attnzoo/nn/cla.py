"""Cross-Layer Attention (CLA): a layer that makes no keys or values of its own and attends over those
of an earlier layer, so only the layers that make them add to the KV cache."""
from __future__ import annotations

from typing import ClassVar

import torch

from ..core.info import Paper
from .common import KVCache, apply_rope, check_bool, check_input, check_inputs, positions, require_softmax, rope_cos_sin
from .mha import MultiheadAttention

CLA_PAPER = Paper("Reducing Transformer Key-Value Cache Size with Cross-Layer Attention", 2024, "2405.12981")


class CrossLayerAttention(MultiheadAttention):
    """Multi-head (GQA/MQA) attention in a stack where KV projections are shared across layers
    (Brandon et al., 2024; CLA2 = every second layer makes KV).

    `owns_kv=True`: an ordinary `MultiheadAttention` layer whose `KVCache` (post-RoPE keys and
    values of every token so far) the following layers read. `owns_kv=False`: no k/v projections;
    `forward(x, kv=..., causal=True)` takes that `KVCache` (already holding this step's tokens: call
    the owning layer first) and attends over it with this layer's own queries, positioned as the
    last x.shape[1] tokens; it returns (y, kv) and keeps no cache of its own (0 KV bytes per token).
    Softmax-family variants only (masks, scores, sparse).
    """

    paper: ClassVar[Paper] = CLA_PAPER

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 owns_kv: bool = True, variant: str = "full", rope: bool = True, rope_base: float = 10000.0,
                 bias: bool = False, **params):
        super().__init__(dim, heads, kv_heads, head_dim, variant, rope, rope_base, bias, **params)
        self.owns_kv = check_bool(type(self).__name__, "owns_kv", owns_kv)
        require_softmax(type(self).__name__, self.attn)
        if not owns_kv:
            self.k_proj = self.v_proj = None

    @property
    def config(self) -> dict:
        return {**super().config, "owns_kv": self.owns_kv}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", owns_kv={self.owns_kv}"

    def kv_elements_per_token(self) -> int:
        return super().kv_elements_per_token() if self.owns_kv else 0

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, causal: bool = True,
                kv: KVCache | None = None, **inputs):
        owner = type(self).__name__
        if self.owns_kv:
            if kv is not None:
                raise ValueError(f"{owner}: this layer makes its own keys and values (owns_kv=True); kv must be None")
            return super().forward(x, cache, causal, **inputs)
        if cache is not None:
            raise ValueError(f"{owner}: a layer with owns_kv=False keeps no cache; pass the owning layer's cache "
                             "as kv=")
        if not isinstance(kv, KVCache):
            raise TypeError(f"{owner}: kv must be the KVCache returned by the layer that owns the keys and values "
                            f"(owns_kv=True), got {type(kv).__name__}")
        x = check_input(owner, x, self.dim)
        check_inputs(owner, inputs)
        b, s, _ = x.shape
        if kv.k.shape[0] != b or kv.k.shape[1] != self.kv_heads or kv.k.shape[3] != self.head_dim or kv.length < s:
            raise ValueError(f"{owner}: kv holds keys {tuple(kv.k.shape)}; expected (B={b}, {self.kv_heads}, S >= {s}, "
                             f"{self.head_dim}) including this step's tokens")
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = rope_cos_sin(positions(kv.length - s, s, x.device), self.head_dim, self.rope_base, q.dtype)
            q = apply_rope(q, cos, sin)
        o = self.attn(q, kv.k, kv.v, causal=causal, **inputs)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)), kv
