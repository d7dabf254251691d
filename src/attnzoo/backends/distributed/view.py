"""The variant's mask on one tile of the global problem.

A rank computes its queries (some segments of the global sequence) against some key segments. The
kernels work in local coordinates (positions from 0 in the tensors they are given); `GlobalView` is a
mask variant whose mask is the base variant's at global positions (local query i is global
`q_start + i`, local key j is global `k_start + j`, local head h is global `h_start + h`) with the
global call (global lengths, every rank's per-token inputs such as document ids), so any exact softmax
mask variant runs sharded with its own definition. Its block structure comes from the base variant's
key intervals over the global sequence, computed once per call and sliced per tile.
"""
from __future__ import annotations

import torch

from ...core import blocks as _blocks
from ...core.variant import Call, SoftmaxVariant


def global_intervals(base: SoftmaxVariant, gcall: Call):
    """The allowed key intervals [lo, hi) of every global query, each (B', H', S), causality applied;
    None when the mask is not a union of intervals."""
    s = gcall.shapes
    q_pos = s.query_positions(device=gcall.device)
    if not base.has_mask:
        ivs = [(torch.zeros(1, 1, s.sq, dtype=torch.long, device=gcall.device), torch.full((1, 1, s.sq), s.sk,
                                                                                           device=gcall.device))]
    else:
        ivs = base.kv_intervals(gcall, q_pos)
        if ivs is None:
            return None
    if gcall.causal:
        ivs = [(lo, torch.minimum(hi, (q_pos + 1).view(1, 1, -1))) for lo, hi in ivs]
    return ivs


def _rows(t: torch.Tensor, q0: int, n: int, h0: int, hn: int) -> torch.Tensor:
    t = t.narrow(-1, q0, n)
    return t.narrow(1, h0, hn) if t.shape[1] > 1 else t


class GlobalView(SoftmaxVariant):
    """`base`'s mask on the tile (queries [q_start, q_start + Sq), keys [k_start, k_start + Sk), heads
    from h_start) of the global call `gcall`; the local call it runs with is non-causal (causality is
    part of the global mask)."""

    has_mask = True

    def __init__(self, base: SoftmaxVariant, gcall: Call, intervals, q_start: int, k_start: int,
                 h_start: int = 0) -> None:
        self.base, self.gcall, self.intervals = base, gcall, intervals
        self.q_start, self.k_start, self.h_start = q_start, k_start, h_start
        self.name = base.name
        self.config = {}
        self.key = ("global_view", base.key, q_start, k_start, h_start)

    def full_mask(self, call: Call, b, h, q_pos, kv_pos):
        q_glob = q_pos - call.shapes.offset + self.q_start
        return self.base.full_mask(self.gcall, b, h + self.h_start, q_glob, kv_pos + self.k_start)

    def block_structure(self, call: Call, q_block: int, kv_block: int) -> _blocks.BlockStructure:
        s = call.shapes
        if self.intervals is not None:
            ivs = [(_rows(lo, self.q_start, s.sq, self.h_start, s.q_heads) - self.k_start,
                    _rows(hi, self.q_start, s.sq, self.h_start, s.q_heads) - self.k_start)
                   for lo, hi in self.intervals]
            return _blocks.from_intervals(ivs, s.sq, s.sk, q_block, kv_block)
        b, h = self._index_grids(call)
        kv_pos = torch.arange(s.sk, device=call.device).view(1, 1, 1, -1)

        def rows(q0, q1):
            q_pos = (torch.arange(q0, q1, device=call.device) + s.offset).view(1, 1, -1, 1)
            return self.full_mask(call, b, h, q_pos, kv_pos).expand(-1, -1, q1 - q0, s.sk)

        return _blocks.from_mask_rows(rows, s.sq, s.sk, q_block, kv_block)


def tile_needed(base: SoftmaxVariant, gcall: Call, intervals, q_seg: tuple[int, int], k_seg: tuple[int, int],
                heads: tuple[int, int] | None = None, rows_per_step: int = 1024) -> bool:
    """Whether any query of global segment q_seg (start, length) may attend any key of k_seg, for the
    heads [h0, h0 + n) (all heads by default). O(segment) with intervals; else the mask is evaluated
    rows_per_step query rows at a time over the key segment."""
    (qa, n), (ka, m) = q_seg, k_seg
    h0, hn = heads or (0, gcall.shapes.q_heads)
    if intervals is not None:
        for lo, hi in intervals:
            lo, hi = _rows(lo, qa, n, h0, hn), _rows(hi, qa, n, h0, hn)
            if bool(((lo < ka + m) & (hi > ka) & (hi > lo)).any()):
                return True
        return False
    b = torch.arange(gcall.shapes.batch, device=gcall.device).view(-1, 1, 1, 1)
    h = torch.arange(h0, h0 + hn, device=gcall.device).view(1, -1, 1, 1)
    kv_pos = torch.arange(ka, ka + m, device=gcall.device).view(1, 1, 1, -1)
    for q0 in range(qa, qa + n, rows_per_step):
        q_pos = torch.arange(q0, min(q0 + rows_per_step, qa + n), device=gcall.device).view(1, 1, -1, 1)
        mask = base.full_mask(gcall, b, h, q_pos, kv_pos)
        if mask is None or bool(mask.any()):
            return True
    return False


def key_hull(base: SoftmaxVariant, gcall: Call, intervals, q_segs, k_seg: tuple[int, int],
             heads: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The smallest key range [a, b) inside global segment k_seg (start, length) that holds every key some
    query of the segments q_segs may attend (None: none), for heads [h0, h0 + n). From the key intervals
    in O(queries); without intervals, the whole segment when any entry is allowed."""
    ka, m = k_seg
    h0, hn = heads or (0, gcall.shapes.q_heads)
    if intervals is None:
        needed = any(tile_needed(base, gcall, None, qs, k_seg, heads) for qs in q_segs)
        return (ka, ka + m) if needed else None
    a = b = None
    for qa, n in q_segs:
        for lo, hi in intervals:
            lo_, hi_ = _rows(lo, qa, n, h0, hn).clamp(ka, ka + m), _rows(hi, qa, n, h0, hn).clamp(ka, ka + m)
            ok = hi_ > lo_
            if bool(ok.any()):
                a_, b_ = int(torch.where(ok, lo_, ka + m).min()), int(torch.where(ok, hi_, ka).max())
                a, b = (a_, b_) if a is None else (min(a, a_), max(b, b_))
    return None if a is None else (a, b)


def global_call(base: SoftmaxVariant, q, k, v, causal: bool, scale: float, total: int, inputs: dict) -> Call:
    """The call of the whole problem (every rank's sequence, `total` positions) with global inputs; the
    q/k/v it is checked against are zero-stride stand-ins (no memory)."""
    def stand_in(t, heads):
        return t.new_empty(1).expand(t.shape[0], heads, total, t.shape[-1])

    return base.prepare(stand_in(q, q.shape[1]), stand_in(k, k.shape[1]), stand_in(v, v.shape[1]), causal, scale,
                        inputs)
