"""HiP: hierarchically pruned attention. Keys sit in blocks of `block_size`; for each query the blocks it
may see are cut into `top_k` contiguous spans, then, until every span is one block, each span is halved
(the left half takes the odd block) and the `top_k` halves whose representative key (the key at the
centre of the half) scores highest against the query survive. The query reads the surviving blocks with
exact softmax over their keys. The span holding the query's own block always survives (the zoo's
convention, so that every query reads its own block; HiP's later versions keep a local window)."""
from __future__ import annotations

import torch

from ...core.info import Paper, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant

PAPER = Paper("HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning", 2024, "2406.09827")
QUERY_TILE = 256


def initial_spans(n_seen: torch.Tensor, top_k: int):
    """`top_k` contiguous spans [lo, hi) of blocks covering [0, n_seen) as evenly as integers allow
    (empty spans where n_seen < top_k): n_seen (...,) -> lo, hi (..., top_k)."""
    i = torch.arange(top_k, device=n_seen.device)
    n = n_seen.unsqueeze(-1)
    return i * n // top_k, (i + 1) * n // top_k


def halve(lo: torch.Tensor, hi: torch.Tensor):
    """Both halves of every span (the left takes the odd block; a one-block span keeps itself and an empty
    right half): (..., m) -> (..., 2m)."""
    mid = lo + (hi - lo + 1) // 2
    return torch.cat([lo, mid], -1), torch.cat([mid, hi], -1)


@register
class HiP(SelectionVariant):
    name = "hip"
    summary = ("Hierarchical top-k pruning: a query's visible key blocks start as top_k spans; each round halves "
               "every span and keeps the top_k halves by q . (the key at the half's centre), until spans are "
               "single blocks; the query then reads those blocks (exact softmax over their keys). The span "
               "holding the query's own block always survives; later blocks are excluded under causality. "
               "top_k >= number of blocks is full attention.")
    paper = PAPER
    params = (
        positive_int("block_size", 64, "keys per block (the paper's b_k): the finest span"),
        positive_int("top_k", 8, "blocks each query reads, its own block included (the paper's k / b_k)"),
    )
    cost = "select: O(Sq top_k log2(Sk / (block_size top_k)) D); attend: O(Sq top_k block_size D)"
    budget_param = "top_k"
    block_param = "block_size"

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        bs, top_k = self.config["block_size"], self.config["top_k"]
        n = -(-s.sk // bs)
        acc = torch.promote_types(q.dtype, torch.float32)
        batch = torch.arange(s.batch, device=q.device).view(-1, 1, 1, 1)
        kv_head = (torch.arange(s.q_heads, device=q.device) // s.group).view(1, -1, 1, 1)
        parts = []
        for a in range(0, s.sq, QUERY_TILE):
            b = min(a + QUERY_TILE, s.sq)
            own = (s.query_positions(a, b, q.device)) // bs                # (T,)
            n_seen = own + 1 if call.causal else torch.full_like(own, n)
            lo, hi = initial_spans(n_seen, top_k)
            shape = (s.batch, s.q_heads, b - a, top_k)
            lo, hi = lo.expand(shape), hi.expand(shape)
            own = own.view(1, 1, -1, 1)
            qt = q[:, :, a:b].to(acc)
            while bool((hi - lo > 1).any()):
                lo, hi = halve(lo, hi)
                centre = (lo * bs + torch.clamp(hi * bs, max=s.sk) - 1) // 2
                keys = k[batch, kv_head, centre.clamp(0, s.sk - 1)].to(acc)             # (B, Hq, T, 2m, D)
                score = torch.einsum("bhtd,bhtmd->bhtm", qt, keys)
                score = score.masked_fill((lo <= own) & (own < hi), torch.inf).masked_fill(hi <= lo, -torch.inf)
                keep = score.topk(top_k, dim=-1).indices
                lo, hi = lo.gather(-1, keep), hi.gather(-1, keep)
            parts.append(torch.where(hi > lo, lo, torch.full_like(lo, -1)))
        return Selection(torch.cat(parts, dim=2), bs, s.sk)
