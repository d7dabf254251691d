"""TokenSelect: token-level selection by per-head soft votes. Each query head's softmax of q.k over the
keys it sees is one vote per key; the votes of a group of heads are summed, and every head of the group
reads the `top_k` keys with the most votes (its own position always among them) with exact softmax over
them. Normalising per head first keeps one head with large logits from outvoting the others.
`attnzoo.kv`'s token_select press votes with the same `soft_votes` while decoding."""
from __future__ import annotations

import torch

from ...core.info import Paper, Param, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, topk_indices

PAPER = Paper("TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic "
              "Token-Level KV Cache Selection", 2024, "2411.02886")
QUERY_TILE = 128


def soft_votes(probs: torch.Tensor, heads: int) -> torch.Tensor:
    """TokenSelect's per-head soft vote: attention probabilities (B, Hq, Sq, S), each head's softmax over the
    keys, summed over every run of `heads` consecutive query heads: (B, Hq // heads, Sq, S)."""
    b, hq, sq, s = probs.shape
    if heads < 1 or hq % heads:
        raise ValueError(f"soft_votes: heads={heads} must divide the {hq} query heads")
    return probs.view(b, hq // heads, heads, sq, s).sum(2)


@register
class TokenSelect(SelectionVariant):
    name = "tokenselect"
    summary = ("Per-head soft vote: each query head's softmax over the keys it sees, summed over the heads that "
               "vote together (vote='group': the query heads of one kv head; 'all': every head, as the paper's "
               "layer-wide vote and attnzoo.kv's token_select press); each query reads the top_k keys by votes, "
               "its own position always among them, with exact softmax over them. Choosing costs O(Sq Sk D), in "
               "query tiles (no Sq x Sk tensor). The paper's Selection Cache (reusing a choice across similar "
               "consecutive queries) is a decoding-time saving, not part of the definition.")
    paper = PAPER
    params = (
        positive_int("top_k", 64, "keys each query reads, its own position included"),
        Param("vote", "group", "heads whose votes are summed: 'group' (query heads sharing a kv head) or 'all' "
                               "(every query head)", (str,), lambda v: v in ("group", "all"), "'group' or 'all'"),
    )
    cost = "select: O(Sq Sk D); attend: O(Sq top_k D)"
    budget_param = "top_k"

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        heads = s.group if self.config["vote"] == "group" else s.q_heads
        kk = k.to(acc).unsqueeze(2)                                                       # (B, Hkv, 1, Sk, D)
        parts = []
        for a in range(0, s.sq, QUERY_TILE):
            b = min(a + QUERY_TILE, s.sq)
            qt = q[:, :, a:b].to(acc).view(s.batch, s.kv_heads, s.group, b - a, s.d)
            scores = (qt @ kk.transpose(-1, -2)) * call.scale                             # (B, Hkv, G, T, Sk)
            pos = s.query_positions(a, b, q.device).view(-1, 1)
            keys = torch.arange(s.sk, device=q.device).view(1, -1)
            if call.causal:
                scores = scores.masked_fill(keys > pos, -torch.inf)
            probs = torch.softmax(scores, dim=-1).view(s.batch, s.q_heads, b - a, s.sk)
            votes = soft_votes(probs, heads)
            votes = votes.masked_fill(keys == pos, torch.inf)
            if call.causal:
                votes = votes.masked_fill(keys > pos, -torch.inf)
            idx = topk_indices(votes, self.config["top_k"])                              # (B, Hq / heads, T, n)
            parts.append(idx.repeat_interleave(heads, dim=1))
        return Selection(torch.cat(parts, dim=2), 1, s.sk)
