"""Block structure of a mask: which (query block, key block) tiles have any / all entries allowed.

Shared by every fast path: the `torch` backend skips empty tiles and skips mask work on full
tiles, and the `flex` backend turns the same structure into a FlexAttention BlockMask without
evaluating the mask function on every block pair. Variants whose rows are unions of key
intervals (windows, sinks, prefixes, documents, chunks) give those intervals, and the structure
costs O(Sq x key blocks) with no Sq x Sk tensor; other masks are evaluated one query block at a
time (memory O(block x Sk)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockStructure:
    q_block: int
    kv_block: int
    sq: int
    sk: int
    any: torch.Tensor  # bool (B', H', nq, nk): the tile holds at least one allowed entry
    full: torch.Tensor  # bool (B', H', nq, nk): every entry of the tile (inside Sq x Sk) is allowed

    @property
    def nq(self) -> int:
        return self.any.shape[-2]

    @property
    def nk(self) -> int:
        return self.any.shape[-1]

    def density(self) -> float:
        """Share of tiles that must be computed."""
        return float(self.any.float().mean())


def n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _reduce_rows(t: torch.Tensor, sq: int, q_block: int, how: str) -> torch.Tensor:
    """Reduce (..., Sq, nk) over the rows of each query block -> (..., nq, nk)."""
    nq = n_blocks(sq, q_block)
    pad = nq * q_block - sq
    if pad:
        fill = how == "all"  # padding rows must not change the reduction
        t = torch.cat([t, t.new_full((*t.shape[:-2], pad, t.shape[-1]), fill)], dim=-2)
    t = t.view(*t.shape[:-2], nq, q_block, t.shape[-1])
    return t.all(dim=-2) if how == "all" else t.any(dim=-2)


def from_intervals(
    intervals: list[tuple[torch.Tensor, torch.Tensor]], sq: int, sk: int, q_block: int, kv_block: int
) -> BlockStructure:
    """Rows allowed on a union of half-open key intervals [lo, hi), each of shape (B', H', Sq).

    `any` is exact. `full` holds when a single interval covers the tile (for a union of touching
    intervals a tile is then only marked partial, which costs mask work but never correctness).
    """
    nk = n_blocks(sk, kv_block)
    k0 = torch.arange(nk, device=intervals[0][0].device) * kv_block
    k1 = torch.clamp(k0 + kv_block, max=sk)
    any_rows = None
    full_rows = None
    for lo, hi in intervals:
        lo = lo.clamp(0, sk).unsqueeze(-1)
        hi = hi.clamp(0, sk).unsqueeze(-1)
        a = (lo < k1) & (hi > k0) & (hi > lo)
        f = (lo <= k0) & (hi >= k1)
        any_rows = a if any_rows is None else any_rows | a
        full_rows = f if full_rows is None else full_rows | f
    return BlockStructure(
        q_block, kv_block, sq, sk, _reduce_rows(any_rows, sq, q_block, "any"), _reduce_rows(full_rows, sq, q_block, "all")
    )


def from_mask_rows(mask_rows, sq: int, sk: int, q_block: int, kv_block: int) -> BlockStructure:
    """Evaluate `mask_rows(q0, q1) -> bool (B', H', q1 - q0, Sk)` one query block at a time."""
    nk = n_blocks(sk, kv_block)
    pad_k = nk * kv_block - sk
    any_blocks, full_blocks = [], []
    for q0 in range(0, sq, q_block):
        m = mask_rows(q0, min(q0 + q_block, sq))
        a = m.any(dim=-2)  # (B', H', Sk)
        f = m.all(dim=-2)
        if pad_k:
            a = torch.cat([a, a.new_zeros((*a.shape[:-1], pad_k))], dim=-1)
            f = torch.cat([f, f.new_ones((*f.shape[:-1], pad_k))], dim=-1)
        any_blocks.append(a.view(*a.shape[:-1], nk, kv_block).any(-1))
        full_blocks.append(f.view(*f.shape[:-1], nk, kv_block).all(-1))
    return BlockStructure(q_block, kv_block, sq, sk, torch.stack(any_blocks, -2), torch.stack(full_blocks, -2))


def from_lattice(lo: torch.Tensor, hi: torch.Tensor, residue: torch.Tensor, step: int, sq: int, sk: int,
                 q_block: int, kv_block: int, rows_at_once: int = 8192) -> BlockStructure:
    """Rows allowed on the keys k in [lo, hi) with k = residue (mod step), each (B', H', Sq) (dilated windows).

    Exact, in O(Sq x key blocks) whatever the number of lattice points (as intervals they would cost one pass each):
    a tile holds an allowed key when the first lattice key at or after the start of its overlap with [lo, hi)
    lies before the overlap's end; with step > 1 no tile is full. Rows are processed `rows_at_once` at a time.
    """
    nk = n_blocks(sk, kv_block)
    k0 = torch.arange(nk, device=lo.device) * kv_block
    k1 = torch.clamp(k0 + kv_block, max=sk)
    lo, hi, residue = torch.broadcast_tensors(lo, hi, residue)
    rows_at_once -= rows_at_once % q_block
    any_blocks, full_blocks = [], []
    for r0 in range(0, sq, rows_at_once):
        r1 = min(r0 + rows_at_once, sq)
        lo_, hi_ = (t[..., r0:r1].clamp(0, sk).unsqueeze(-1) for t in (lo, hi))
        start = torch.maximum(lo_, k0)
        first = start + (residue[..., r0:r1].unsqueeze(-1) - start) % step
        any_blocks.append(_reduce_rows(first < torch.minimum(hi_, k1), r1 - r0, q_block, "any"))
        full = (lo_ <= k0) & (hi_ >= k1) if step == 1 else torch.zeros_like(first, dtype=torch.bool)
        full_blocks.append(_reduce_rows(full, r1 - r0, q_block, "all"))
    return BlockStructure(q_block, kv_block, sq, sk, torch.cat(any_blocks, -2), torch.cat(full_blocks, -2))
