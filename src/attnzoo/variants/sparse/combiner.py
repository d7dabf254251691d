"""Combiner (its "Fixed" factorization): full attention at sub-quadratic cost. Attention is read as a
conditional expectation E_{p(j|i)}[v_j] and p(j|i) is factorized over segments of `block_size` positions:

- direct: the keys of the query's own segment (up to itself under causality), each with its own score;
- through a summary: every other segment r (every earlier one under causality) as one entry with key
  k_r = pool(k over r) and value v_r = sum_{j in r} q(j|r) v_j, where q(j|r) = softmax_j(scale q_r . k_j)
  with q_r = pool(q over r) (max pooling by default, the paper's "identity-max"): the segment's own
  distribution over its keys, the same for every query that reads it.

One softmax over [scale q_i . k_j for direct j] and [scale q_i . k_r for summarised r] gives p(j|i) = p_j
for direct keys and p(r|i) q(j|r) for the others: every visible key has weight (full support) and the
weights sum to one. `block_size = 1` and `block_size >= S` are exact full attention. The selection shows
the keys attended directly (the own segment); the other segments are read through their summaries. Self
attention only: a segment's summary query pools the queries at its positions."""
from __future__ import annotations

import torch

from ...core.info import CAUSAL_SELF, NONCAUSAL_SELF, Paper, Param, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant

PAPER = Paper("Combiner: Full Attention Transformer with Sparse Computation Cost", 2021, "2107.05768")


def segments(x: torch.Tensor, block: int):
    """x (..., S, D) padded and cut into (..., n, block, D), and bool (n, block): which entries are real."""
    s = x.shape[-2]
    n = -(-s // block)
    real = (torch.arange(n * block, device=x.device) < s).view(n, block)
    return torch.nn.functional.pad(x, (0, 0, 0, n * block - s)).unflatten(-2, (n, block)), real


def pool(x: torch.Tensor, real: torch.Tensor, how: str) -> torch.Tensor:
    """Max or mean of segmented x (..., n, block, D) over each segment's real entries: (..., n, D)."""
    mask = real.unsqueeze(-1)
    if how == "max":
        return x.masked_fill(~mask, -torch.inf).amax(-2)
    return (x * mask).sum(-2) / mask.sum(-2).to(x.dtype)


@register
class Combiner(SelectionVariant):
    name = "combiner"
    summary = ("Combiner-Fixed: each query attends directly to its own segment of block_size keys and to every "
               "other segment (earlier ones under causality) through one summary entry: key = pooled keys, value = "
               "the segment's own softmax(pooled query . keys) average of its values; one softmax over both. Every "
               "visible key keeps weight; block_size = 1 or >= S is full attention. Self-attention.")
    paper = PAPER
    patterns = (CAUSAL_SELF, NONCAUSAL_SELF)
    params = (
        positive_int("block_size", 64, "positions per segment (the paper's sqrt(L) for O(L sqrt(L)) cost)"),
        Param("pooling", "max", "how a segment's queries and keys are summarised: 'max' (the paper's identity-max) "
                                "or 'mean'", (str,), lambda v: v in ("max", "mean"), "'max' or 'mean'"),
    )
    cost = "O(S (block_size + S / block_size) D)"
    budget_param = "block_size"

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        own = (s.query_positions(device=q.device) // self.config["block_size"]).view(1, 1, -1, 1)
        return Selection(own.expand(s.batch, s.q_heads, s.sq, 1), self.config["block_size"], s.sk)

    def summaries(self, q, k, v, call):
        """Per segment: its key k_r (B, Hkv, n, D) and per query head its value v_r (B, Hq, n, Dv)."""
        s = call.shapes
        bs, how = self.config["block_size"], self.config["pooling"]
        qs, real = segments(q, bs)                                                          # (B, Hq, n, bs, D)
        ks, _ = segments(k, bs)
        vs, _ = segments(v, bs)
        k_r = pool(ks, real, how)
        q_r = pool(qs, real, how).view(s.batch, s.kv_heads, s.group, -1, 1, s.d)
        inner = (q_r @ ks.unsqueeze(2).transpose(-1, -2)) * call.scale                      # (B, Hkv, G, n, 1, bs)
        w = torch.softmax(inner.masked_fill(~real.unsqueeze(-2), -torch.inf), dim=-1)
        v_r = (w @ vs.unsqueeze(2)).squeeze(-2).reshape(s.batch, s.q_heads, -1, s.dv)
        return k_r, v_r

    def weights(self, q, k, call) -> torch.Tensor:
        """p(j|i) written densely, (B, Hq, Sq, Sk): the definition the reference uses."""
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        q, k = q.to(acc), k.to(acc)
        bs, how = self.config["block_size"], self.config["pooling"]
        kk = k.repeat_interleave(s.group, dim=1)
        direct = self._allowed(self.select(q, k, call), call)
        scores = ((q @ kk.transpose(-1, -2)) * call.scale).masked_fill(~direct, -torch.inf)
        ks, real = segments(k, bs)
        qs, _ = segments(q, bs)
        k_r = pool(ks, real, how).repeat_interleave(s.group, dim=1)
        own = s.query_positions(device=q.device) // bs
        read = self._segment_mask(k_r.shape[-2], q.device, call.causal)[own].squeeze(1)        # (Sq, n)
        summary = ((q @ k_r.transpose(-1, -2)) * call.scale).masked_fill(~read, -torch.inf)
        joint = torch.softmax(torch.cat([scores, summary], dim=-1), dim=-1)
        p_direct, p_summary = joint[..., : s.sk], joint[..., s.sk:]                         # (.., Sk), (.., n)
        q_r = pool(qs, real, how)                                                           # (B, Hq, n, D)
        inner = (q_r.unsqueeze(-2) @ ks.repeat_interleave(s.group, dim=1).transpose(-1, -2)) * call.scale
        within = torch.softmax(inner.masked_fill(~real.unsqueeze(-2), -torch.inf), dim=-1)  # (B, Hq, n, 1, bs) q(j|r)
        spread = (p_summary.unsqueeze(-1) * within.squeeze(-2).unsqueeze(2)).flatten(-2)[..., : s.sk]
        return p_direct + spread

    def _reference(self, q, k, v, call):
        acc = torch.promote_types(q.dtype, torch.float32)
        vv = v.to(acc).repeat_interleave(call.shapes.group, dim=1)
        return (self.weights(q, k, call) @ vv).to(q.dtype)

    def forward_torch(self, q, k, v, call):
        """Segment by segment: each segment's queries against its own keys (bs x bs) and every summary (n)."""
        s = call.shapes
        dtype, acc = q.dtype, torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        bs = self.config["block_size"]
        k_r, v_r = self.summaries(q, k, v, call)
        qs, real = segments(q, bs)
        n = real.shape[0]
        qg = qs.view(s.batch, s.kv_heads, s.group, n, bs, s.d)
        ks, _ = segments(k, bs)
        vs, _ = segments(v, bs)
        local = (qg @ ks.unsqueeze(2).transpose(-1, -2)) * call.scale                        # (B, Hkv, G, n, bs, bs)
        allowed = real.view(n, 1, bs).expand(n, bs, bs)
        if call.causal:
            allowed = allowed & torch.ones(bs, bs, dtype=torch.bool, device=q.device).tril()
        local = local.masked_fill(~allowed, -torch.inf)
        summary = (qg @ k_r.unsqueeze(2).unsqueeze(3).transpose(-1, -2)) * call.scale        # (B, Hkv, G, n, bs, n)
        summary = summary.masked_fill(~self._segment_mask(n, q.device, call.causal), -torch.inf)
        p = torch.softmax(torch.cat([local, summary], dim=-1), dim=-1)
        out = p[..., :bs] @ vs.unsqueeze(2) + p[..., bs:] @ v_r.view(s.batch, s.kv_heads, s.group, 1, n, s.dv)
        return out.reshape(s.batch, s.q_heads, n * bs, s.dv)[:, :, : s.sq].to(dtype)

    @staticmethod
    def _segment_mask(n: int, device, causal: bool) -> torch.Tensor:
        """bool (n, 1, n): the segments a query of segment i reads through their summaries (not its own;
        earlier ones under causality)."""
        i = torch.arange(n, device=device).view(-1, 1, 1)
        r = torch.arange(n, device=device).view(1, 1, -1)
        return (r < i) if causal else (r != i)
