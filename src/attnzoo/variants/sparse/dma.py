"""DMA: trainable Dynamic Mask Attention.

A content-aware dynamic mask made from the value states: per kv head and key, dt_j = exp(A softplus(v_j W))
(W, A learned in `attnzoo.nn.DynamicMask`; `az.nn.MultiheadAttention(variant="dma")` learns and feeds one).
Each query keeps the `top_k` keys it may see (causality first) with the largest dt, and attends to them
with dt as an additive bias: softmax(scale q.k_j + dt_j) over exactly the kept keys (as the release's
`prepare_dynamic_mask` in Doge, where the kept keys also carry dt as the attention mask's values). The
keys are chosen per kv head: a GQA group reads one set.
"""
from __future__ import annotations

import torch

from ...core.info import Input, Paper, positive_int
from ...core.reference import masked_softmax_attention, repeat_kv
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, attend_selected, topk_indices

PAPER = Paper("Trainable Dynamic Mask Sparse Attention", 2025, "2508.02124")
QUERY_TILE = 128


@register
class DMA(SelectionVariant):
    name = "dma"
    summary = ("Trainable dynamic mask attention: a per-key, per-kv-head score dt (B, Hkv, Sk) made from the value "
               "states (dt = exp(A softplus(v W)), learned in attnzoo.nn.DynamicMask) picks each query's top_k "
               "visible keys and biases them: softmax(scale q.k + dt) over exactly those keys. top_k >= the keys "
               "a query sees is dense attention with the dt bias.")
    paper = PAPER
    params = (positive_int("top_k", 2048, "keys each query keeps by dt among those it may see (the release's "
                                          "keep_window_size)"),)
    inputs = (Input("dt", "(B, Hkv, Sk)", "the dynamic mask: per-key scores from the value states "
                                          "(attnzoo.nn.DynamicMask), added to the kept keys' scores"),)
    cost = "select: O(Sq Sk) comparisons, no products (top_k of a per-key score); attend: O(Sq top_k D)"
    budget_param = "top_k"

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        dt = call.inputs["dt"]
        top_k = min(self.config["top_k"], s.sk)
        if not call.causal:   # every query sees every key: one choice per (batch row, kv head)
            keys = topk_indices(dt, top_k).unsqueeze(2).expand(-1, -1, s.sq, -1)
        else:                 # the top_k of each visible prefix, a tile of queries at a time
            later = torch.arange(s.sk, device=q.device).view(1, -1)
            parts = []
            for a in range(0, s.sq, QUERY_TILE):
                pos = s.query_positions(a, min(a + QUERY_TILE, s.sq), q.device).view(-1, 1)
                parts.append(topk_indices(dt.unsqueeze(2).masked_fill(later > pos, -torch.inf), top_k))
            keys = torch.cat(parts, dim=2)                                               # (B, Hkv, Sq, top_k)
        return Selection(keys.repeat_interleave(s.group, dim=1), 1, s.sk)

    def forward_torch(self, q, k, v, call):
        return attend_selected(q, k, v, self.select(q, k, call), call, key_bias=call.inputs["dt"])

    def _reference(self, q, k, v, call):
        """softmax(scale q k^T + dt) under the kept keys and causality, dense."""
        dt = repeat_kv(call.inputs["dt"].unsqueeze(-1), call.shapes.q_heads).squeeze(-1)    # (B, Hq, Sk)
        acc = torch.promote_types(q.dtype, torch.float32)
        return masked_softmax_attention(q, k, v, call.scale, self._allowed(self.select(q, k, call), call),
                                        lambda s: s + dt.to(acc).unsqueeze(2))
