"""Recycled Attention: full attention every `stride` steps, the last full step's top-k keys in between.

The step structure, by absolute position p of a query (queries are the last Sq positions, as for
decoding and chunked prefill):
- p % stride == 0 is a full step: the query reads every key up to itself;
- any other p is a recycled step of anchor a = p - p % stride: it reads the `top_k` keys the anchor's
  full attention weighted most (summed over the query heads of a kv head: one recycled cache per kv
  head, as the paper's grouped-query models keep it) and every key after the anchor up to itself (the
  tokens generated since, which the paper appends to the recycled cache).

When a call's first query is a recycled step, its anchor's query is not in the call: give the anchor's
choice as the input `anchor_keys` (B, Hkv, top_k), which `attn.recycle(...)` returns for the next call
(the choice of the call's last full step). Decoding token by token with it equals one call over all
the queries. Causal only, as the paper's generation.

`selection()` holds the recycled steps' keys; a full step's row is -1 throughout and `full_steps`
names those rows; `dense_mask` shows both.
"""
from __future__ import annotations

import torch

from ...core.info import CAUSAL_PATTERNS, Input, Paper, positive_int
from ...core.reference import masked_softmax_attention
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, attend_selected

PAPER = Paper("Recycled Attention: Efficient inference for long-context language models", 2024, "2411.05787")
QUERY_TILE = 64


@register
class Recycled(SelectionVariant):
    name = "recycled"
    summary = ("Recycled Attention (decode / chunked prefill): a query at position p with p % stride == 0 attends "
               "to every key (a full step); others attend, with exact softmax, to the top_k keys their anchor "
               "p - p % stride weighted most (summed over the kv head's query heads) plus the keys after the "
               "anchor up to themselves. The input anchor_keys (B, Hkv, top_k) carries the anchor's choice into "
               "a call that starts between full steps (attn.recycle returns it). Causal only.")
    paper = PAPER
    patterns = CAUSAL_PATTERNS
    params = (
        positive_int("top_k", 64, "keys a recycled step reuses from its anchor's full attention"),
        positive_int("stride", 8, "a full step every `stride` positions (the paper's S)"),
    )
    inputs = (Input("anchor_keys", "(B, Hkv, top_k)", "the top_k keys of the last full step before this call "
                    "(attn.recycle of the previous call; -1 for unused slots); needed when the first query is "
                    "a recycled step", required=False, dtype="long"),)
    cost = "full steps: O(Sq / stride Sk D); recycled steps: O(Sq (top_k + stride) D)"
    budget_param = "top_k"

    def validate_call(self, call) -> None:
        first = call.shapes.offset
        if first % self.config["stride"] and "anchor_keys" not in call.inputs:
            raise ValueError(f"recycled: the first query sits at position {first}, a recycled step of the full step "
                             f"at {first - first % self.config['stride']}, which is not in this call: pass "
                             f"anchor_keys (B, Hkv, top_k), what attn.recycle(...) returned for the keys before")

    def full_steps(self, call) -> torch.Tensor:
        """bool (Sq,): which queries are full steps."""
        return call.shapes.query_positions(device=call.device) % self.config["stride"] == 0

    # ---- the anchors' choices --------------------------------------------------------------------------
    def anchor_choices(self, q, k, call) -> torch.Tensor:
        """(B, Hkv, F, top_k) keys each full step of the call keeps for the steps after it, by its softmax
        weights summed over the group's query heads (-1 for unused slots); F = number of full steps."""
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        rows = self.full_steps(call).nonzero().flatten()
        kk = k.to(acc).unsqueeze(2)                                                      # (B, Hkv, 1, Sk, D)
        parts = []
        for a in range(0, rows.numel(), QUERY_TILE):
            r = rows[a:a + QUERY_TILE]
            qg = q[:, :, r].to(acc).view(s.batch, s.kv_heads, s.group, r.numel(), s.d)
            scores = (qg @ kk.transpose(-1, -2)) * call.scale                           # (B, Hkv, G, T, Sk)
            pos = (r + s.offset).view(-1, 1)
            scores = scores.masked_fill(torch.arange(s.sk, device=q.device).view(1, -1) > pos, -torch.inf)
            votes = torch.softmax(scores, dim=-1).sum(2)                                 # (B, Hkv, T, Sk)
            votes = votes.masked_fill(torch.arange(s.sk, device=q.device).view(1, -1) > pos, -torch.inf)
            top = votes.topk(min(self.config["top_k"], s.sk), dim=-1)
            parts.append(torch.where(top.values > -torch.inf, top.indices, torch.full_like(top.indices, -1)))
        if not parts:
            return torch.empty(s.batch, s.kv_heads, 0, min(self.config["top_k"], s.sk), dtype=torch.long,
                               device=q.device)
        return torch.cat(parts, dim=2)

    def recycle(self, q, k, *, causal: bool = True, scale=None, **inputs) -> torch.Tensor:
        """anchor_keys for the next call: (B, Hkv, top_k) keys of this call's last full step, or the given
        anchor_keys when the call has no full step."""
        call = self.prepare(q, k, k, causal, scale, inputs)
        choices = self.anchor_choices(q, k, call)
        if choices.shape[2]:
            return self._pad(choices[:, :, -1])
        return call.inputs["anchor_keys"]

    def _pad(self, keys: torch.Tensor) -> torch.Tensor:
        """(..., n) keys -> (..., top_k), -1 padded (fewer keys than top_k exist)."""
        return torch.nn.functional.pad(keys, (0, self.config["top_k"] - keys.shape[-1]), value=-1)

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        stride = self.config["stride"]
        choices = self._pad(self.anchor_choices(q, k, call))                          # (B, Hkv, F, top_k)
        if "anchor_keys" in call.inputs:
            choices = torch.cat([call.inputs["anchor_keys"].unsqueeze(2), choices], dim=2)
        pos = s.query_positions(device=q.device)
        full = pos % stride == 0
        # index of each query's anchor among `choices`: full steps seen so far, minus one without anchor_keys
        which = torch.cumsum(full.long(), 0) - (0 if "anchor_keys" in call.inputs else 1)
        reused = choices[:, :, which.clamp_min(0)]                                      # (B, Hkv, Sq, top_k)
        since = pos.view(-1, 1) - torch.arange(stride - 1, 0, -1, device=q.device).view(1, -1)   # p-stride+1..p-1
        since = since.masked_fill(since <= (pos - pos % stride).view(-1, 1), -1)
        own = pos.view(-1, 1)
        rows = torch.cat([reused, since.expand(s.batch, s.kv_heads, -1, -1),
                          own.expand(s.batch, s.kv_heads, -1, 1)], dim=-1)
        rows = rows.masked_fill(full.view(1, 1, -1, 1), -1)                            # full rows: see full_steps
        return Selection(rows.repeat_interleave(s.group, dim=1), 1, s.sk)

    def _allowed(self, sel: Selection, call) -> torch.Tensor:
        return super()._allowed(sel, call) | (self.full_steps(call).view(-1, 1) & self._causal(call))

    @staticmethod
    def _causal(call) -> torch.Tensor:
        s = call.shapes
        return torch.arange(s.sk, device=call.device).view(1, -1) <= s.query_positions(device=call.device).view(-1, 1)

    def forward_torch(self, q, k, v, call):
        out = attend_selected(q, k, v, self.select(q, k, call), call)
        rows = self.full_steps(call).nonzero().flatten()
        if rows.numel():   # full steps: exact causal attention of those queries, a tile at a time
            s = call.shapes
            for a in range(0, rows.numel(), QUERY_TILE):
                r = rows[a:a + QUERY_TILE]
                mask = torch.arange(s.sk, device=q.device).view(1, -1) <= (r + s.offset).view(-1, 1)
                out[:, :, r] = masked_softmax_attention(q[:, :, r], k, v, call.scale, mask)
        return out
