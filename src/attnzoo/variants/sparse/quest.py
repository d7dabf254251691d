"""Quest: query-aware page selection. Keys sit in pages of `page` tokens; each page keeps its
per-channel minimum and maximum key, and a query bounds its score on the page from above by
sum_d max(q_d min_d, q_d max_d). It reads the `top_k` pages with the highest bound, the page holding
its own position always among them. `attnzoo.kv`'s quest press uses the same bounds while decoding."""
from __future__ import annotations

import torch

from ...core.info import Paper, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, block_gate_select

PAPER = Paper("Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", 2024, "2406.10774")


def page_bounds(keys: torch.Tensor, page: int, valid: torch.Tensor | None = None):
    """Per-page channel-wise (min, max) of `keys` (..., S, D) over pages of `page` tokens, and which
    pages hold any valid key; `valid` (..., S) bool marks real entries (default: all). Shapes (..., P, D)
    and (..., P). Empty pages get zero bounds."""
    s, d = keys.shape[-2:]
    n = -(-s // page)
    pad = n * page - s
    valid = torch.ones(keys.shape[:-1], dtype=torch.bool, device=keys.device) if valid is None else valid
    valid = torch.nn.functional.pad(valid, (0, pad)).view(*valid.shape[:-1], n, page, 1)
    kp = torch.nn.functional.pad(keys, (0, 0, 0, pad)).view(*keys.shape[:-2], n, page, d)
    live = valid.any(-2)                                           # (..., P, 1)
    kmin = kp.masked_fill(~valid, torch.inf).amin(-2).masked_fill(~live, 0)
    kmax = kp.masked_fill(~valid, -torch.inf).amax(-2).masked_fill(~live, 0)
    return kmin, kmax, live.squeeze(-1)


def upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's bound of q.k over each page, sum_d max(q_d min_d, q_d max_d): q (..., Sq, D), kmin/kmax
    (..., P, D) -> (..., Sq, P). Since max_d >= min_d, each term is q_d max_d where q_d >= 0 and q_d min_d
    where q_d < 0: two matrix products, no (Sq, P, D) tensor."""
    return q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)


@register
class Quest(SelectionVariant):
    name = "quest"
    summary = ("Each query reads the top_k pages of `page` keys with the highest upper bound of q.k from the "
               "page's per-channel min and max keys, its own page always among them (later pages excluded "
               "under causality), with exact softmax over their keys.")
    paper = PAPER
    params = (positive_int("page", 16, "keys per page"),
              positive_int("top_k", 8, "pages each query reads, its own page included"))
    cost = "bounds: O(Sq (Sk / page) D); attend: O(Sq top_k page D)"
    budget_param = "top_k"
    block_param = "page"

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        kmin, kmax, _ = page_bounds(k.to(acc), self.config["page"])
        if s.group > 1:
            kmin, kmax = kmin.repeat_interleave(s.group, dim=1), kmax.repeat_interleave(s.group, dim=1)
        gate = upper_bound(q.to(acc), kmin, kmax)
        return block_gate_select(gate, call, self.config["page"], self.config["top_k"])
