"""A mixture of h-1 heads (MAE, mixture of attentive experts): h experts, expert i being multi-head
attention without head i, mixed by a learned gate."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.info import Paper
from .mha import MultiheadAttention

MAE_PAPER = Paper("A Mixture of h-1 Heads is Better than h Heads", 2020, "2005.06537")


class MixtureOfHeadsMinusOne(MultiheadAttention):
    """MAE (Peng et al., 2020): expert i is multi-head attention with head i dropped, rescaled by
    h / (h - 1) as the paper's dropped-head experts, f_i = h/(h-1) sum_{j != i} H_j W_O^j; the output
    is the gated mixture sum_i g_i f_i with g = softmax(W_g x_t). As sum_i g_i = 1 this is each head
    weighted per token by h/(h-1) (1 - g_j), computed that way (one pass over the heads, not h
    experts). The gate reads each token (causal-safe; the paper gates on the whole input). The paper
    trains gate and experts by block coordinate descent; here they are trained jointly like any
    module. Everything else is `MultiheadAttention` (GQA, RoPE, variants, cache); KV bytes as MHA."""

    paper: ClassVar[Paper] = MAE_PAPER

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 variant: str = "full", rope: bool = True, rope_base: float = 10000.0, bias: bool = False, **params):
        super().__init__(dim, heads, kv_heads, head_dim, variant, rope, rope_base, bias, **params)
        if self.heads < 2:
            raise ValueError(f"{type(self).__name__}: heads must be >= 2 (each expert drops one head), got {heads}")
        self.gate = nn.Linear(dim, self.heads, bias=False)

    def expert_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's responsibilities g (B, S, heads) of the h experts."""
        return F.softmax(self.gate(x), dim=-1)

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        h = self.heads
        return (h / (h - 1) * (1.0 - self.expert_weights(x))).transpose(1, 2)
