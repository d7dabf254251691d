"""Decoupled head dimension: the head size chosen apart from dim // heads, against the low-rank
bottleneck of attention heads."""
from __future__ import annotations

from typing import ClassVar

from ..core.info import Paper
from .common import check_int
from .mha import MultiheadAttention

BOTTLENECK_PAPER = Paper("Low-Rank Bottleneck in Multi-head Attention Models", 2020, "2002.07028")


class DecoupledHeadAttention(MultiheadAttention):
    """Multi-head attention whose head size is a free parameter (Bhojanapalli et al., 2020): with the
    usual head_dim = dim // heads, each head's S x S score matrix has rank <= dim // heads, a
    bottleneck that more heads make worse; the paper sets head_dim to the sequence length
    (independent of heads) so each head can express any attention pattern. `head_dim` is required;
    the projections are dim -> heads * head_dim (parameters and KV bytes grow with it:
    `num_parameters()`, `kv_bytes_per_token()`). `score_rank_bound` is min(head_dim, S)."""

    paper: ClassVar[Paper] = BOTTLENECK_PAPER

    def __init__(self, dim: int, heads: int, head_dim: int, kv_heads: int | None = None, variant: str = "full",
                 rope: bool = True, rope_base: float = 10000.0, bias: bool = False, **params):
        check_int(type(self).__name__, "head_dim", head_dim)
        super().__init__(dim, heads, kv_heads, head_dim, variant, rope, rope_base, bias, **params)

    def score_rank_bound(self, length: int) -> int:
        """The largest rank a head's score matrix over `length` tokens can have."""
        return min(self.head_dim, check_int(type(self).__name__, "length", length))
