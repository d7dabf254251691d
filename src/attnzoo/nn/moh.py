"""Mixture-of-Head attention (MoH): attention heads as experts, each token weighting a few routed heads
besides the shared ones."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.info import Paper
from .common import check_int
from .mha import MultiheadAttention

MOH_PAPER = Paper("MoH: Multi-Head Attention as Mixture-of-Head Attention", 2024, "2410.11842")
GATES = ("paper", "release")


class MoHAttention(MultiheadAttention):
    """Multi-head attention in the summation form y = sum_i g_i H^i W_O^i, each head weighted per token
    by its routing score g_i (the paper's Eq. 5):

        g_i = a_1 Softmax(W_s x_t)_i                      for the shared heads i < shared_heads
        g_i = a_2 Softmax(W_r x_t)_i  if (W_r x_t)_i is among the top_k of the routed heads' logits, else 0
        [a_1, a_2] = Softmax(W_h x_t)

    Heads 0 .. shared_heads - 1 are shared (always active), the other heads routed; each token
    activates shared_heads + top_k heads. `gates="paper"` is Eq. 5 as written; `gates="release"` is
    the authors' released code: routed scores renormalised over the selected heads, then shared
    scores times shared_heads, routed times top_k and [a_1, a_2] times 2, so a uniform router weighs
    every active head 1 (an untrained MoH is multi-head attention over its active heads). A router
    matrix that could only produce a constant (one shared head, one routed head) is left out, as the
    release does. `aux_loss` holds the last forward's load-balance loss over the routed heads, as
    released: E sum_i P_i f_i with P_i the mean routing probability of head i, f_i the share of
    tokens that select it and E the number of routed heads (add it, weighted, to the training loss).

    Everything else is `MultiheadAttention` (projections, RoPE, GQA via kv_heads, any variant, the
    cache). Every head keeps its keys and values in the cache, since later tokens may route to any
    head: the KV bytes per token are multi-head attention's; the saving is in the heads computed.
    This module computes every head and weights the unselected ones by 0 (exact, not the fast path).
    """

    paper: ClassVar[Paper] = MOH_PAPER

    def __init__(self, dim: int, heads: int, shared_heads: int, top_k: int, kv_heads: int | None = None,
                 head_dim: int | None = None, variant: str = "full", rope: bool = True, rope_base: float = 10000.0,
                 bias: bool = False, gates: str = "paper", **params):
        super().__init__(dim, heads, kv_heads, head_dim, variant, rope, rope_base, bias, **params)
        owner = type(self).__name__
        self.shared_heads = check_int(owner, "shared_heads", shared_heads, minimum=0)
        self.top_k = check_int(owner, "top_k", top_k, minimum=0)
        if shared_heads > heads:
            raise ValueError(f"{owner}: shared_heads must be <= heads={heads}, got shared_heads={shared_heads}")
        routed = heads - shared_heads
        if routed and not 1 <= top_k <= routed:
            raise ValueError(f"{owner}: top_k must be in [1, heads - shared_heads = {routed}] (routed heads each token "
                             f"activates), got top_k={top_k}")
        if not routed and top_k:
            raise ValueError(f"{owner}: every head is shared (shared_heads == heads), so top_k must be 0; got {top_k}")
        if gates not in GATES:
            raise ValueError(f"{owner}: gates must be one of {list(GATES)}, got {gates!r}")
        self.gates = gates
        self.routed_heads = routed
        self.w_shared = nn.Linear(dim, shared_heads, bias=False) if shared_heads > 1 else None
        self.w_routed = nn.Linear(dim, routed, bias=False) if routed > 1 else None
        self.w_type = nn.Linear(dim, 2, bias=False) if shared_heads and routed else None
        self.aux_loss: torch.Tensor | None = None

    @property
    def active_heads(self) -> int:
        return self.shared_heads + self.top_k

    @property
    def config(self) -> dict:
        c = super().config
        c.update(shared_heads=self.shared_heads, top_k=self.top_k, gates=self.gates)
        return c

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shared_heads={self.shared_heads}, top_k={self.top_k}, gates={self.gates!r}"

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """The routing scores g (B, S, heads) of Eq. 5 (or the release's), zero for unselected heads;
        sets `aux_loss`."""
        b, s, _ = x.shape
        release = self.gates == "release"
        parts = []
        if self.shared_heads:
            shared = (F.softmax(self.w_shared(x), dim=-1) if self.w_shared is not None
                      else x.new_ones(b, s, 1))
            parts.append(shared * self.shared_heads if release else shared)
        if self.routed_heads:
            p = (F.softmax(self.w_routed(x), dim=-1) if self.w_routed is not None else x.new_ones(b, s, 1))
            chosen = torch.zeros_like(p).scatter_(-1, p.topk(self.top_k, dim=-1).indices, 1.0)
            routed = p * chosen
            if release:
                routed = routed / routed.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).eps) * self.top_k
            parts.append(routed)
            e = self.routed_heads
            self.aux_loss = e * (p.reshape(-1, e).mean(0) * chosen.reshape(-1, e).mean(0)).sum()
        else:
            self.aux_loss = None
        if self.w_type is not None:
            a = F.softmax(self.w_type(x), dim=-1) * (2.0 if release else 1.0)
            parts = [parts[0] * a[..., :1], parts[1] * a[..., 1:]]
        return torch.cat(parts, dim=-1)

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        return self.routing(x).transpose(1, 2)
