"""HyperAttention: attention estimated in near-linear time from the large entries and a uniform sample.

Non-causal (Algorithm 1 of the paper, as its code does it):
- sorted LSH: queries and keys are hashed by the signs of `lsh_bits` random projections, the codes
  ranked along the reflected Gray code (neighbouring buckets differ in one projection), and queries and
  keys sorted by rank; sorted keys are cut into blocks of `block_size`, sorted queries into as many
  blocks, evenly; a query's heavy keys are those of its block, computed exactly;
- uniform sampling: `sample_size` key indices drawn uniformly with replacement per (batch, head),
  shared by the head's queries; a sample outside the query's heavy block enters with weight n / m.
The output is N / D with N = sum_heavy e^s v + (n/m) sum_samples e^s v and D likewise: each an unbiased
estimate of the exact numerator and row sum (the paper's ApproxD and sampled matrix product).

Causal (the paper's recursion): the diagonal halves recurse, the block below the diagonal (every key
earlier than every query) is non-causal HyperAttention, and pieces of at most `min_seq_len` keys are
exact causal attention; with Sq < Sk the keys before the first query form one more non-causal block.
Random draws come from a generator seeded with `seed`: one call's output is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...core.info import Paper, Param, nonneg_int, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant

PAPER = Paper("HyperAttention: Long-context Attention in Near-Linear Time", 2023, "2310.05869")
QUERY_TILE = 256


@dataclass(frozen=True)
class Piece:
    """One block of the attention matrix: query rows [q0, q1) against keys [k0, k1).

    kind "exact": causal softmax terms of every visible key; "hyper": heavy (q_block == k_block) terms
    plus the sampled keys (indices in [0, k1 - k0)) outside the heavy block, weighted (k1 - k0) / m."""

    kind: str
    q0: int
    q1: int
    k0: int
    k1: int
    q_block: torch.Tensor | None = None    # (B, Hq, q1 - q0)
    k_block: torch.Tensor | None = None    # (B, Hkv, k1 - k0)
    samples: torch.Tensor | None = None    # (B, Hq, m)


@dataclass(frozen=True)
class Plan:
    pieces: tuple[Piece, ...]
    projections: torch.Tensor              # (D, lsh_bits) float64, shared by every head and piece


def gray_rank(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Position of each `bits`-bit code in the reflected Gray sequence (the inverse Gray code)."""
    rank = code.clone()
    shift = 1
    while shift < bits:
        rank ^= rank >> shift
        shift <<= 1
    return rank


def lsh_rank(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Sorted-LSH bucket rank of every row of x (..., n, D): the signs of x . projections as a code, ranked
    along the Gray code."""
    bits = projections.shape[1]
    signs = (x @ projections.to(x.dtype)) > 0
    code = (signs.long() << torch.arange(bits, device=x.device)).sum(-1)
    return gray_rank(code, bits)


def sorted_blocks(rank: torch.Tensor, n_blocks: int, block: int | None = None) -> torch.Tensor:
    """Block of every row once rows are sorted (stably) by rank: rows of sorted position p fall in block
    p // block, or, without `block`, are spread evenly over n_blocks (p * n_blocks // n)."""
    n = rank.shape[-1]
    position = torch.argsort(torch.argsort(rank, dim=-1, stable=True), dim=-1)
    return position // block if block is not None else position * n_blocks // n


def causal_ranges(sq: int, sk: int, min_seq_len: int):
    """The paper's causal recursion as (kind, q0, q1, k0, k1) pieces; queries are the last sq of sk keys."""
    out = []

    def rec(q0, q1, k0, k1):
        nq, nk = q1 - q0, k1 - k0
        if nk <= min_seq_len:
            out.append(("exact", q0, q1, k0, k1))
        elif nq < nk:                            # keys before the first query: every query sees them all
            out.append(("hyper", q0, q1, k0, k1 - nq))
            rec(q0, q1, k1 - nq, k1)
        else:
            h = nq // 2
            rec(q0, q0 + h, k0, k0 + h)
            out.append(("hyper", q0 + h, q1, k0, k0 + h))
            rec(q0 + h, q1, k0 + h, k1)

    rec(0, sq, 0, sk)
    return out


def _merge(o1, l1, o2, l2):
    """Two partial softmax results (outputs, log row sums) of the same rows as one."""
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.where(torch.isfinite(l1), torch.exp(l1 - safe), torch.zeros_like(l1))
    w2 = torch.where(torch.isfinite(l2), torch.exp(l2 - safe), torch.zeros_like(l2))
    return o1 * w1.unsqueeze(-1) + o2 * w2.unsqueeze(-1), lse


def _attend(scores, values):
    """(output, log row sum) of softmax over the last axis of scores (-inf = absent); empty rows give 0, -inf."""
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(scores - safe.unsqueeze(-1)) @ values, lse


@register
class HyperAttention(SelectionVariant):
    name = "hyper"
    family = "approx"
    summary = ("HyperAttention: N / D with both estimated from the exact entries of each query's sorted-LSH block "
               "(lsh_bits random projections, Gray-code ranked buckets, blocks of block_size sorted keys) plus "
               "sample_size keys drawn uniformly per head, weighted n / m outside the block: unbiased estimates "
               "of the exact numerator and row sum. Causal: the paper's recursion (diagonal halves recurse, "
               "below-diagonal blocks are non-causal HyperAttention, pieces of <= min_seq_len keys exact). "
               "Draws from `seed`. block_size >= Sk (and, causal, min_seq_len >= Sk) is exact attention.")
    paper = PAPER
    params = (
        positive_int("block_size", 256, "sorted keys per LSH block: the exact (heavy) entries of each query"),
        nonneg_int("sample_size", 256, "keys sampled uniformly per (batch, head), weighted n / m"),
        Param("lsh_bits", 7, "random projections of the sorted LSH (2^lsh_bits buckets)", (int,),
              lambda v: 1 <= v <= 30, "an int in [1, 30]"),
        positive_int("min_seq_len", 4096, "causal pieces of at most this many keys are exact"),
        nonneg_int("seed", 0, "seed of the projections and the samples"),
    )
    cost = ("non-causal: O((Sq + Sk) lsh_bits D + Sq (block_size + sample_size) D); causal: that times "
            "log2(Sk / min_seq_len), plus O(Sk min_seq_len D) exact")
    budget_param = "sample_size"
    state_size = "KV cache: Sk x (D + Dv) per kv head (every key is kept; each query reads its block and the samples)"

    # ---- the plan: every random draw and every heavy block, shared by the fast path and the reference ----
    def plan(self, q, k, call) -> Plan:
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        gen = torch.Generator().manual_seed(self.config["seed"])
        proj = torch.randn(s.d, self.config["lsh_bits"], generator=gen, dtype=torch.float64)
        bs, m = self.config["block_size"], self.config["sample_size"]
        if call.causal:
            ranges = causal_ranges(s.sq, s.sk, self.config["min_seq_len"])
        else:
            ranges = [("hyper", 0, s.sq, 0, s.sk)]
        pieces = []
        for kind, q0, q1, k0, k1 in ranges:
            if kind == "exact":
                pieces.append(Piece(kind, q0, q1, k0, k1))
                continue
            nk = k1 - k0
            n_blocks = -(-nk // bs)
            proj_dev = proj.to(device=q.device)
            k_block = sorted_blocks(lsh_rank(k[:, :, k0:k1].to(acc), proj_dev), n_blocks, bs)
            q_block = sorted_blocks(lsh_rank(q[:, :, q0:q1].to(acc), proj_dev), n_blocks)
            samples = torch.randint(nk, (s.batch, s.q_heads, m), generator=gen).to(q.device) if m else None
            pieces.append(Piece(kind, q0, q1, k0, k1, q_block, k_block, samples))
        return Plan(tuple(pieces), proj)

    def _kv_rows(self, t, call):
        """(B, Hkv, ...) -> (B, Hq, ...): each query head's kv head."""
        return t.repeat_interleave(call.shapes.group, dim=1) if call.shapes.group > 1 else t

    # ---- the selection: the keys each query reads (inspection; dense) ----------------------------------
    def coefficients(self, plan: Plan, call, dtype=torch.float64) -> torch.Tensor:
        """(B, Hq, Sq, Sk): the weight of each e^{s_ij} in the estimates: 1 for exact and heavy entries,
        (count in the samples) x n / m for sampled keys outside the heavy block, 0 elsewhere."""
        s = call.shapes
        dev = call.device
        c = torch.zeros(s.batch, s.q_heads, s.sq, s.sk, dtype=dtype, device=dev)
        for p in plan.pieces:
            if p.kind == "exact":
                pos = s.query_positions(p.q0, p.q1, dev).view(-1, 1)
                c[:, :, p.q0:p.q1, p.k0:p.k1] += (torch.arange(p.k0, p.k1, device=dev).view(1, -1) <= pos).to(dtype)
                continue
            nk = p.k1 - p.k0
            heavy = p.q_block.unsqueeze(-1) == self._kv_rows(p.k_block, call).unsqueeze(-2)
            block = heavy.to(dtype)
            if p.samples is not None:
                counts = torch.zeros(s.batch, s.q_heads, nk, dtype=dtype, device=dev)
                counts.scatter_add_(-1, p.samples, torch.ones_like(p.samples, dtype=dtype))
                block = block + (~heavy) * counts.unsqueeze(-2) * (nk / p.samples.shape[-1])
            c[:, :, p.q0:p.q1, p.k0:p.k1] += block
        return c

    def select(self, q, k, call) -> Selection:
        read = self.coefficients(self.plan(q, k, call), call) > 0
        n = int(read.sum(-1).max())
        idx = torch.where(read, torch.arange(call.shapes.sk, device=q.device), call.shapes.sk).sort(-1).values[..., :n]
        return Selection(torch.where(idx < call.shapes.sk, idx, -1), 1, call.shapes.sk)

    # ---- outputs ----------------------------------------------------------------------------------------
    def _reference(self, q, k, v, call):
        """N / D written densely: the coefficient matrix times e^{scale q k^T}."""
        acc = torch.promote_types(q.dtype, torch.float32)
        c = self.coefficients(self.plan(q, k, call), call, acc)
        scores = (q.to(acc) @ self._kv_rows(k.to(acc), call).transpose(-1, -2)) * call.scale
        scores = scores.masked_fill(c == 0, -torch.inf)
        w = c * torch.exp(scores - scores.amax(-1, keepdim=True))
        return ((w @ self._kv_rows(v.to(acc), call)) / w.sum(-1, keepdim=True)).to(q.dtype)

    def forward_torch(self, q, k, v, call):
        return self.estimate_from(self.plan(q, k, call), q, k, v, call)[0].to(q.dtype)

    def estimate(self, q, k, v, *, causal: bool = False, scale: float | None = None):
        """(output, log of the estimated row sum D), float32 or wider: the paper's estimates; the estimated
        numerator is output * exp(log row sum)."""
        call = self.prepare(q, k, v, causal, scale, {})
        return self.estimate_from(self.plan(q, k, call), q, k, v, call)

    def estimate_from(self, plan: Plan, q, k, v, call):
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros(s.batch, s.q_heads, s.sq, s.dv, dtype=acc, device=q.device)
        lse = torch.full((s.batch, s.q_heads, s.sq), -torch.inf, dtype=acc, device=q.device)
        for p in plan.pieces:
            o, l = self._exact(q, k, v, call, p) if p.kind == "exact" else self._hyper(q, k, v, call, p)
            out_p, lse_p = _merge(out[:, :, p.q0:p.q1], lse[:, :, p.q0:p.q1], o, l)
            out = torch.cat([out[:, :, :p.q0], out_p, out[:, :, p.q1:]], 2)
            lse = torch.cat([lse[:, :, :p.q0], lse_p, lse[:, :, p.q1:]], 2)
        return out, lse

    def _exact(self, q, k, v, call, p: Piece):
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        kk = self._kv_rows(k[:, :, p.k0:p.k1].to(acc), call)
        vv = self._kv_rows(v[:, :, p.k0:p.k1].to(acc), call)
        outs, lses = [], []
        for a in range(p.q0, p.q1, QUERY_TILE):
            b = min(a + QUERY_TILE, p.q1)
            scores = (q[:, :, a:b].to(acc) @ kk.transpose(-1, -2)) * call.scale
            pos = s.query_positions(a, b, q.device).view(-1, 1)
            scores = scores.masked_fill(torch.arange(p.k0, p.k1, device=q.device).view(1, -1) > pos, -torch.inf)
            o, l = _attend(scores, vv)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs, 2), torch.cat(lses, 2)

    def _hyper(self, q, k, v, call, p: Piece):
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        bs = self.config["block_size"]
        nq, nk = p.q1 - p.q0, p.k1 - p.k0
        n_blocks = -(-nk // bs)
        qp = q[:, :, p.q0:p.q1].to(acc)
        kp, vp = k[:, :, p.k0:p.k1].to(acc), v[:, :, p.k0:p.k1].to(acc)
        # Heavy: block-diagonal in sorted order. Keys of block j sit at sorted slots [j bs, (j + 1) bs).
        k_order = torch.argsort(p.k_block, dim=-1, stable=True)
        slots = torch.arange(n_blocks * bs, device=q.device)
        k_slot = k_order.gather(-1, slots.clamp(max=nk - 1).expand(*k_order.shape[:2], -1))
        k_valid = (slots < nk).view(n_blocks, bs)
        kb = kp.gather(2, k_slot.unsqueeze(-1).expand(-1, -1, -1, s.d)).view(s.batch, s.kv_heads, n_blocks, bs, s.d)
        vb = vp.gather(2, k_slot.unsqueeze(-1).expand(-1, -1, -1, s.dv)).view(s.batch, s.kv_heads, n_blocks, bs, s.dv)
        # Queries of block j: sorted slots [ceil(j nq / nb), ceil((j + 1) nq / nb)), at most ceil(nq / nb).
        width = -(-nq // n_blocks)
        q_order = torch.argsort(p.q_block, dim=-1, stable=True)
        start = -(-torch.arange(n_blocks + 1, device=q.device) * nq // n_blocks)
        q_slot = start[:-1].view(-1, 1) + torch.arange(width, device=q.device).view(1, -1)     # (nb, width)
        q_idx = q_order.gather(-1, q_slot.clamp(max=nq - 1).flatten().expand(*q_order.shape[:2], -1))
        qb = qp.gather(2, q_idx.unsqueeze(-1).expand(-1, -1, -1, s.d)).view(
            s.batch, s.kv_heads, s.group, n_blocks, width, s.d)
        scores = (qb @ kb.unsqueeze(2).transpose(-1, -2)) * call.scale               # (B, Hkv, G, nb, width, bs)
        scores = scores.masked_fill(~k_valid.view(1, 1, 1, n_blocks, 1, bs), -torch.inf)
        o_blk, l_blk = _attend(scores, vb.unsqueeze(2))
        o_blk = o_blk.reshape(s.batch, s.q_heads, n_blocks * width, s.dv)
        l_blk = l_blk.reshape(s.batch, s.q_heads, n_blocks * width)
        # Back to query order: query i sits in block q_block[i] at slot (its sorted slot - start of block).
        rank = torch.argsort(q_order, dim=-1)
        where = p.q_block * width + rank - start[p.q_block]
        o = o_blk.gather(2, where.unsqueeze(-1).expand(-1, -1, -1, s.dv))
        l = l_blk.gather(2, where)
        if p.samples is None:
            return o, l
        # Uniform samples outside the query's heavy block, each weighted nk / m.
        m = p.samples.shape[-1]
        kv = (torch.arange(s.q_heads, device=q.device) // s.group).view(1, -1, 1)
        batch = torch.arange(s.batch, device=q.device).view(-1, 1, 1)
        ks, vs = kp[batch, kv, p.samples], vp[batch, kv, p.samples]                    # (B, Hq, m, D)
        heavy = p.q_block.unsqueeze(-1) == p.k_block[batch, kv, p.samples].unsqueeze(-2)   # (B, Hq, nq, m)
        scores = (qp @ ks.transpose(-1, -2)) * call.scale + math.log(nk / m)
        o_s, l_s = _attend(scores.masked_fill(heavy, -torch.inf), vs)
        return _merge(o, l, o_s, l_s)
