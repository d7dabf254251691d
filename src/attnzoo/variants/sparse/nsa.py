"""NSA: Native Sparse Attention. Three branches per query, combined by gates:

- compressed: attention over one compressed key/value per block of `block_size` keys (the block's mean
  here; a learned MLP in the paper), a block visible once its last key is at or before the query;
- selected: exact softmax over the keys of `top_k` blocks chosen from the compressed branch's
  attention probabilities, summed over the query heads of a GQA group (one choice per kv head, as the
  paper shares it so that a group loads each block once); the query's own block, the block before it
  and the first block are always chosen (the paper's "1 initial and 2 local blocks"), in that priority
  when top_k < 3;
- sliding window: exact softmax over the query and the `window` keys before it.

o = g_cmp o_cmp + g_slc o_slc + g_win o_win with gates an input (B, Hq, Sq, 3). The selection contract
covers the selected branch: `selection()` / `dense_mask(q=, k=)` show its blocks.
"""
from __future__ import annotations

import torch

from ...core.info import CAUSAL_PATTERNS, Input, Paper, Param, positive_int
from ...core.reference import masked_softmax_attention
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, attend_selected, block_gate_select

PAPER = Paper("Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention", 2025, "2502.11089")


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of x (..., S, D) over consecutive blocks of `block` positions (the last may be partial): (..., n, D)."""
    s, d = x.shape[-2:]
    n = -(-s // block)
    pad = n * block - s
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(*x.shape[:-2], n, block, d)
    counts = torch.full((n, 1), float(block), dtype=x.dtype, device=x.device)
    counts[-1] = block - pad
    return xp.sum(-2) / counts


def complete_blocks(call, block: int, n: int, device) -> torch.Tensor:
    """bool (Sq, n): compressed block c is visible to query i once its last key (c + 1) * block - 1 is at or
    before the query's position (every block, under no causality)."""
    s = call.shapes
    pos = s.query_positions(device=device).view(-1, 1)
    last = (torch.arange(n, device=device) + 1).view(1, -1) * block - 1
    return last <= pos


def _softmax_rows(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax over allowed entries of the last axis; rows with nothing allowed give zeros."""
    scores = scores.masked_fill(~allowed, -torch.inf)
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    denom = p.sum(-1, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


@register
class NSA(SelectionVariant):
    name = "nsa"
    summary = ("Native Sparse Attention: gated sum of a compressed branch (attention over the mean key/value of "
               "each block of block_size keys, blocks complete before the query), a selected branch (exact "
               "softmax over top_k blocks ranked by the compressed branch's probabilities summed over the GQA "
               "group; own, previous and first block forced) and a sliding window (the query and `window` keys "
               "before it). Learned in the paper: the compression MLP phi with intra-block positions (mean "
               "pooling here, with compression block = stride = selection block, the paper's shared-blocking "
               "case where selection scores are the compressed probabilities, as in fla's naive NSA) and the "
               "gate MLP g = sigmoid(MLP(x)); here the gates are the input `gates` (B, H, Sq, 3) in the order "
               "compressed, selected, window. Causal only, as the paper's decoder.")
    paper = PAPER
    patterns = CAUSAL_PATTERNS
    params = (
        positive_int("block_size", 64, "keys per block, for compression and selection alike (l = d = l')"),
        positive_int("top_k", 16, "blocks the selected branch reads per query, the forced own, previous and "
                                  "first block included"),
        Param("window", 511, "keys before the query in the sliding-window branch, besides the query itself "
                             "(the paper's w = window + 1)", (int,), lambda v: v >= 0, "a non-negative int"),
    )
    inputs = (Input("gates", "(B, H, Sq, 3)", "gate of each branch per query and query head: compressed, "
                                              "selected, sliding window (the paper's sigmoid MLP outputs)"),)
    cost = ("compressed: O(Sq (Sk / block_size) D); selected: O(Sq top_k block_size D); window: "
            "O(Sq window D)")
    budget_param = "top_k"

    # ---- the choice (shared by the fast path and the reference) --------------------------------------
    def compressed_probs(self, q, k, call) -> torch.Tensor:
        """(B, Hq, Sq, n) float: each query's softmax over the compressed keys it sees (zeros before any)."""
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        k_cmp = block_means(k.to(acc), self.config["block_size"])                        # (B, Hkv, n, D)
        n = k_cmp.shape[2]
        qg = q.to(acc).view(s.batch, s.kv_heads, s.group, s.sq, s.d)
        scores = (qg @ k_cmp.unsqueeze(2).transpose(-1, -2)) * call.scale                 # (B, Hkv, G, Sq, n)
        seen = complete_blocks(call, self.config["block_size"], n, q.device)
        return _softmax_rows(scores, seen).view(s.batch, s.q_heads, s.sq, n)

    def select_from(self, probs: torch.Tensor, call) -> Selection:
        s = call.shapes
        bs = self.config["block_size"]
        votes = probs.view(s.batch, s.kv_heads, s.group, s.sq, -1).sum(2)                 # (B, Hkv, Sq, n)
        own = (s.query_positions(device=probs.device)) // bs
        blocks = torch.arange(votes.shape[-1], device=probs.device).view(1, -1)
        # Forced blocks outrank every vote (a vote is at most G): own (inf, in block_gate_select) > previous > first.
        votes = votes.masked_fill((blocks == 0) & (own.view(-1, 1) > 0), s.group + 1.0)
        votes = votes.masked_fill(blocks == own.view(-1, 1) - 1, s.group + 2.0)
        sel = block_gate_select(votes, call, bs, self.config["top_k"])
        return Selection(sel.indices.repeat_interleave(s.group, dim=1), bs, s.sk)

    def select(self, q, k, call) -> Selection:
        return self.select_from(self.compressed_probs(q, k, call), call)

    # Choosing needs no gates: selection() and dense_mask() accept calls without them.
    def selection(self, q, k, *, causal: bool = False, scale: float | None = None, **inputs) -> Selection:
        return super().selection(q, k, causal=causal, scale=scale, **self._gates_for_choosing(q, inputs))

    def dense_mask(self, sq: int, sk: int, *, causal: bool = False, q=None, k=None, scale=None, **inputs):
        return super().dense_mask(sq, sk, causal=causal, q=q, k=k, scale=scale,
                                  **(self._gates_for_choosing(q, inputs) if q is not None else inputs))

    @staticmethod
    def _gates_for_choosing(q, inputs):
        return inputs if "gates" in inputs else {**inputs, "gates": q.new_zeros(*q.shape[:3], 3)}

    # ---- outputs -----------------------------------------------------------------------------------
    def forward_torch(self, q, k, v, call):
        from ...core.api import get

        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        probs = self.compressed_probs(q, k, call)
        v_cmp = block_means(v.to(acc), self.config["block_size"])                          # (B, Hkv, n, Dv)
        o_cmp = (probs.view(s.batch, s.kv_heads, s.group, s.sq, -1) @ v_cmp.unsqueeze(2)).view(
            s.batch, s.q_heads, s.sq, s.dv)
        o_slc = attend_selected(q, k, v, self.select_from(probs, call), call).to(acc)
        window = get("sliding_window", window=self.config["window"], right=0)
        o_win = window(q, k, v, causal=True, scale=call.scale).to(acc)
        return self._combine(call, o_cmp, o_slc, o_win, q.dtype)

    def _reference(self, q, k, v, call):
        """Each branch written as dense masked softmax: compressed keys as an averaging matrix times k."""
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        bs = self.config["block_size"]
        n = -(-s.sk // bs)
        member = (torch.arange(s.sk, device=q.device).view(1, -1) // bs) == torch.arange(n, device=q.device).view(-1, 1)
        average = member.to(acc) / member.sum(-1, keepdim=True)                             # (n, Sk)
        k_cmp, v_cmp = average @ k.to(acc), average @ v.to(acc)
        o_cmp = masked_softmax_attention(q.to(acc), k_cmp, v_cmp, call.scale, complete_blocks(call, bs, n, q.device))
        o_slc = masked_softmax_attention(q.to(acc), k.to(acc), v.to(acc), call.scale,
                                         self._allowed(self.select(q, k, call), call))
        pos = s.query_positions(device=q.device).view(-1, 1)
        kv = torch.arange(s.sk, device=q.device).view(1, -1)
        band = (kv <= pos) & (kv >= pos - self.config["window"])
        o_win = masked_softmax_attention(q.to(acc), k.to(acc), v.to(acc), call.scale, band)
        return self._combine(call, o_cmp, o_slc, o_win, q.dtype)

    @staticmethod
    def _combine(call, o_cmp, o_slc, o_win, dtype):
        g = call.inputs["gates"].to(o_cmp.dtype)
        return (g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win).to(dtype)
