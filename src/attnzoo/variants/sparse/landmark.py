"""Landmark Attention: the sequence is cut into blocks of `block_size` tokens each followed by a landmark
token (a block spans block_size + 1 positions, the landmark last; the caller's sequence holds the landmark
tokens, as the paper inserts them into the input). A query attends with a grouped softmax:

- its local group: the tokens of its own block up to itself (its own block's landmark ignored) and the
  landmarks of the other blocks it reads, in one softmax;
- every other block it reads: a softmax over that block's tokens, scaled by the local-group weight of
  the block's landmark (the landmark carries no value of its own).

The weights sum to one. Which other blocks it reads is the paper's retrieval at inference: the
`top_k - 1` blocks with the highest landmark score q . k_landmark, besides its own. `top_k` >= the
number of blocks is the training-time grouped softmax over every earlier block. Not softmax over the
selected keys: the reference writes the grouped weights densely, the fast path gathers only the
selected blocks."""
from __future__ import annotations

import torch

from ...core.info import CAUSAL_PATTERNS, Paper, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, block_gate_select

PAPER = Paper("Landmark Attention: Random-Access Infinite Context Length for Transformers", 2023, "2305.16300")
QUERY_TILE = 64


def _softmax(scores: torch.Tensor, allowed: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax over the allowed entries along `dim`; groups with nothing allowed give zeros."""
    scores = scores.masked_fill(~allowed, -torch.inf)
    m = scores.amax(dim, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    denom = p.sum(dim, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


@register
class Landmark(SelectionVariant):
    name = "landmark"
    summary = ("Landmark Attention: blocks of block_size tokens, each followed by a landmark token (period "
               "block_size + 1, landmark last). Grouped softmax: the query's own block (up to itself) and the "
               "landmarks of the other blocks it reads share one softmax; another block's tokens get their "
               "in-block softmax times the weight of its landmark. The other blocks read are the top_k - 1 "
               "earlier blocks by landmark score (the paper's retrieval at inference; top_k >= number of "
               "blocks is its training-time form). Causal only (a block is gated by its landmark once "
               "complete). With block_size >= Sk there is no landmark and it is full causal attention.")
    paper = PAPER
    patterns = CAUSAL_PATTERNS
    params = (
        positive_int("block_size", 50, "tokens per block before its landmark (the paper's l_block); blocks span "
                                       "block_size + 1 positions"),
        positive_int("top_k", 5, "blocks each query reads, its own block included (the paper's k retrieved "
                                 "blocks + 1)"),
    )
    cost = "landmark scores: O(Sq Sk / (block_size + 1) D); attend: O(Sq top_k (block_size + 1) D)"
    budget_param = "top_k"

    @property
    def period(self) -> int:
        return self.config["block_size"] + 1

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        period = self.period
        n = -(-s.sk // period)
        landmarks = torch.arange(n, device=q.device) * period + period - 1
        complete = landmarks < s.sk
        k_lm = k[:, :, landmarks.clamp(max=s.sk - 1)].to(acc)                                # (B, Hkv, n, D)
        qg = q.to(acc).view(s.batch, s.kv_heads, s.group, s.sq, s.d)
        gate = (qg @ k_lm.unsqueeze(2).transpose(-1, -2)).view(s.batch, s.q_heads, s.sq, n)
        gate = gate.masked_fill(~complete, -torch.inf)
        return block_gate_select(gate, call, period, self.config["top_k"])

    def _allowed(self, sel: Selection, call) -> torch.Tensor:
        """The keys whose scores the query uses: its selection under causality, less its own landmark key
        (a landmark query reads its block like the block's other tokens)."""
        m = super()._allowed(sel, call)
        s = call.shapes
        pos = s.query_positions(device=m.device)
        own_landmark = (pos % self.period == self.period - 1).view(-1, 1) & (
            torch.arange(s.sk, device=m.device).view(1, -1) == pos.view(-1, 1))
        return m & ~own_landmark

    def _reference(self, q, k, v, call):
        """The grouped-softmax weights written densely (Sq x Sk), blocks laid out as (n, period)."""
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        period = self.period
        n = -(-s.sk // period)
        pad = n * period - s.sk
        g = s.group
        kk = k.to(acc).repeat_interleave(g, dim=1)
        vv = v.to(acc).repeat_interleave(g, dim=1)
        scores = (q.to(acc) @ kk.transpose(-1, -2)) * call.scale                              # (B, H, Sq, Sk)
        allowed = self._allowed(self.select(q, k, call), call)
        key = torch.arange(s.sk, device=q.device)
        is_landmark = key % period == period - 1
        own = ((s.query_positions(device=q.device)) // period).view(-1, 1)
        in_own = (key // period).view(1, -1) == own                                            # (Sq, Sk)
        local = allowed & ((in_own & ~is_landmark) | (~in_own & is_landmark))
        p_local = _softmax(scores, local)
        # In-block softmax of the other blocks: keys laid out (n, period), padding never allowed.
        blocked = torch.nn.functional.pad(scores, (0, pad)).unflatten(-1, (n, period))
        others = torch.nn.functional.pad(allowed & ~in_own & ~is_landmark, (0, pad)).unflatten(-1, (n, period))
        p_block = _softmax(blocked, others)
        gate = torch.nn.functional.pad(p_local, (0, pad)).unflatten(-1, (n, period))[..., -1:]  # landmark weight
        weights = torch.where(in_own & ~is_landmark, p_local,
                              (p_block * gate).flatten(-2)[..., : s.sk])
        return (weights @ vv).to(q.dtype)

    def forward_torch(self, q, k, v, call):
        """Per tile of queries, only the selected blocks: (B, Hq, T, blocks, period) gathered keys."""
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        period = self.period
        sel = self.select(q, k, call)
        kv_head = (torch.arange(s.q_heads, device=q.device) // s.group).view(1, -1, 1, 1)
        batch = torch.arange(s.batch, device=q.device).view(-1, 1, 1, 1)
        outs = []
        for a in range(0, s.sq, QUERY_TILE):
            b = min(a + QUERY_TILE, s.sq)
            tok = sel.token_indices(slice(a, b))                                               # (B, Hq, T, m*period)
            pos = (s.query_positions(a, b, q.device)).view(1, 1, -1, 1)
            allowed = (tok >= 0) & (tok <= pos) & ~((tok == pos) & (pos % period == period - 1))
            safe = tok.clamp(min=0)
            keys = k[batch, kv_head, safe].to(acc)
            vals = v[batch, kv_head, safe].to(acc)
            scores = torch.einsum("bhtd,bhtnd->bhtn", q[:, :, a:b].to(acc), keys) * call.scale
            shape = (*tok.shape[:3], -1, period)
            scores, allowed, vals = scores.view(shape), allowed.view(shape), vals.view(*shape, vals.shape[-1])
            in_own = (sel.indices[:, :, a:b] == pos // period).unsqueeze(-1)                   # (B, Hq, T, m, 1)
            is_landmark = torch.arange(period, device=q.device) == period - 1
            p_local = _softmax(scores.flatten(-2), (allowed & (in_own != is_landmark)).flatten(-2)).view(shape)
            p_block = _softmax(scores, allowed & ~in_own & ~is_landmark)
            o_block = torch.einsum("bhtmp,bhtmpd->bhtmd", p_block, vals)
            o_own = torch.einsum("bhtmp,bhtmpd->bhtd", p_local * (in_own & ~is_landmark), vals)
            o_other = torch.einsum("bhtm,bhtmd->bhtd", p_local[..., -1] * ~in_own[..., 0], o_block)
            outs.append((o_own + o_other).to(q.dtype))
        return torch.cat(outs, dim=2)
