"""Weighted grouped-query attention (WGQA): each grouped key/value head is a learned weighted sum of
the multi-head checkpoint's key/value heads, instead of GQA's mean."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.info import Paper
from .common import check_int
from .gqa import GroupedQueryAttention
from .mha import MultiheadAttention

WGQA_PAPER = Paper("Weighted Grouped Query Attention in Transformers", 2024, "2407.10855")


class WeightedMerge(nn.Module):
    """A projection to `kv_heads` heads that is a weighted sum of the projections of `heads` heads:
    W_g = sum over the heads h of group g (heads // kv_heads consecutive ones) of w_h W_h. The
    weights `w` (heads,) start at 1 / group (GQA's mean pooling) and are learned."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, bias: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.weight = nn.Parameter(torch.empty(heads * head_dim, dim))
        self.bias = nn.Parameter(torch.zeros(heads * head_dim)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.w = nn.Parameter(torch.full((heads,), kv_heads / heads))

    def merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (kv_heads * head_dim, dim), bias or None) of the equivalent plain projection."""
        group = self.heads // self.kv_heads
        scale = self.w.view(self.kv_heads, group, 1)

        def merge(t):
            return (t.view(self.kv_heads, group, self.head_dim, -1) * scale.unsqueeze(-1)).sum(1).flatten(0, 1)

        return merge(self.weight), None if self.bias is None else merge(self.bias.unsqueeze(-1)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.merged())


class WeightedGroupedQueryAttention(GroupedQueryAttention):
    """GQA whose key and value projections (`WeightedMerge`) keep the `heads` key/value heads of a
    multi-head checkpoint and learn one weight per original head for each of k and v: KV head g =
    sum over its group of w_h (W_K,h x) (the WGQA paper's per-head scalars). With weights 1 / group
    it is GQA's mean-pooled conversion; `merged()` folds the weights into a plain
    `GroupedQueryAttention` for inference (no overhead: same outputs, same cache). The cache and
    KV bytes are GQA's; the parameters are the multi-head projections plus 2 * heads weights."""

    paper: ClassVar[Paper] = WGQA_PAPER

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int | None = None, variant: str = "full",
                 rope: bool = True, rope_base: float = 10000.0, bias: bool = False, **params):
        super().__init__(dim, heads, kv_heads, head_dim, variant, rope, rope_base, bias, **params)
        if self.learned:
            raise ValueError(f"{type(self).__name__}: variant {variant!r} learns per-KV-head gates; use a variant "
                             "without learned inputs")
        self.k_proj = WeightedMerge(dim, heads, self.kv_heads, self.head_dim, bias)
        self.v_proj = WeightedMerge(dim, heads, self.kv_heads, self.head_dim, bias)

    @classmethod
    @torch.no_grad()
    def from_mha(cls, module: MultiheadAttention, kv_heads: int) -> WeightedGroupedQueryAttention:
        """The WGQA form of a multi-head module (kv_heads == heads): its projections copied, merge
        weights at 1 / group, so it starts as `gqa_from_mha(module, kv_heads)`."""
        if type(module) is not MultiheadAttention or module.kv_heads != module.heads:
            raise TypeError(f"{cls.__name__}.from_mha: module must be a multi-head attnzoo.nn.MultiheadAttention "
                            f"(kv_heads == heads), got {type(module).__name__}")
        kv_heads = check_int(cls.__name__, "kv_heads", kv_heads)
        config = {**module.config, "kv_heads": kv_heads}
        ref = next(module.parameters())
        new = cls(**config).to(device=ref.device, dtype=ref.dtype)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(new, name).weight.copy_(getattr(module, name).weight)
            if module.bias:
                getattr(new, name).bias.copy_(getattr(module, name).bias)
        for merge in (new.k_proj, new.v_proj):
            merge.w.fill_(kv_heads / module.heads)  # exactly the mean, in the module's dtype
        return new

    @torch.no_grad()
    def merged(self) -> GroupedQueryAttention:
        """The plain GQA module computing the same function (weights folded in)."""
        ref = self.q_proj.weight
        gqa = GroupedQueryAttention(**self.config).to(device=ref.device, dtype=ref.dtype)
        state = {n: t for n, t in self.state_dict().items() if not n.startswith(("k_proj.", "v_proj."))}
        for name in ("k_proj", "v_proj"):
            weight, bias = getattr(self, name).merged()
            state[f"{name}.weight"] = weight
            if bias is not None:
                state[f"{name}.bias"] = bias
        gqa.load_state_dict(state)
        return gqa
