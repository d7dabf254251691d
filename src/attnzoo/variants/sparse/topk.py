"""The top-k oracle: each query reads its k highest-scoring keys (by the exact q.k scores).

Not a method anyone deploys (choosing needs every score), but the bound every content-sparse method is
measured against at the same budget: no selection of k keys keeps more attention mass."""
from __future__ import annotations

import torch

from ...core.info import Paper, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, topk_indices

QUERY_TILE = 128


@register
class TopK(SelectionVariant):
    name = "topk"
    summary = ("Oracle: each query attends (exact softmax) to its top_k keys by exact score q.k, after "
               "causality. Choosing costs O(Sq Sk D), in query tiles (no Sq x Sk tensor); the bench uses it "
               "as the upper bound for content-sparse methods at the same budget.")
    paper = Paper("Memory-efficient Transformers via Top-k Attention", 2021, "2106.06899")
    params = (positive_int("top_k", 64, "keys each query reads"),)
    cost = "select: O(Sq Sk D); attend: O(Sq top_k D)"
    budget_param = "top_k"

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        kk = k.to(acc).repeat_interleave(s.group, dim=1) if s.group > 1 else k.to(acc)
        parts = []
        for a in range(0, s.sq, QUERY_TILE):
            b = min(a + QUERY_TILE, s.sq)
            scores = q[:, :, a:b].to(acc) @ kk.transpose(-1, -2)
            if call.causal:
                q_pos = s.query_positions(a, b, q.device).view(-1, 1)
                scores = scores.masked_fill(torch.arange(s.sk, device=q.device).view(1, -1) > q_pos, -torch.inf)
            parts.append(topk_indices(scores, self.config["top_k"]))
        return Selection(torch.cat(parts, dim=2), 1, s.sk)
