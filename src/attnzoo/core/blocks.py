"""Block structure of a mask: which (query block, key block) tiles have any / all entries allowed.

Shared by every fast path: the `torch` backend skips empty tiles and skips mask work on full
tiles, and the `flex` backend turns the same structure into a FlexAttention BlockMask without
evaluating the mask function on every block pair. Variants whose rows are unions of key
intervals (windows, sinks, prefixes, documents, chunks) give those intervals, and the structure
costs O(Sq x key blocks) with no Sq x Sk tensor; other masks are evaluated one query block at a
time (memory O(block x Sk)).
"""
from __future__ import annotations

import functools
import math
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


def _reduce_rows(t: torch.Tensor, sq: int, q_block: int, how: str, dims: tuple = ()) -> torch.Tensor:
    """Reduce (..., Sq, nk) over the rows of each query block (and over `dims`, counted from the left, with "any")
    -> (..., nq, nk)."""
    nq = n_blocks(sq, q_block)
    pad = nq * q_block - sq
    if pad:  # padding rows must not change the reduction
        t = torch.nn.functional.pad(t, (0, 0, 0, pad), value=how == "all")
    t = t.view(*t.shape[:-2], nq, q_block, t.shape[-1])
    return t.all(dim=-2) if how == "all" else t.any(dim=(*dims, -2))


_HELD_FOR_GRAPHS: dict[int, object] = {}  # made-once values a captured CUDA graph reads: never freed


def made_once(make):
    """`make` cached per arguments (device included), except while tracing (a traced value must not outlive its
    trace): for the few index vectors a build asks for on every call, each a kernel launch on a GPU. A value
    handed out while a CUDA graph is being captured is also held for the rest of the process, since the graph
    reads its memory at every replay and the cache may drop it. The tensors are shared: never modify them."""
    cached = functools.lru_cache(maxsize=256)(make)

    @functools.wraps(make)
    def get(*args):
        if torch.compiler.is_compiling():
            return make(*args)
        value = cached(*args)
        if _capturing():
            _HELD_FOR_GRAPHS[id(value)] = value
        return value
    get.cache_clear = cached.cache_clear
    return get


@functools.cache
def _cuda() -> bool:
    return torch.cuda.is_available()


def _capturing() -> bool:
    return _cuda() and torch.cuda.is_current_stream_capturing()


@made_once
def steps(start: int, stop: int, step: int, device: torch.device) -> torch.Tensor:
    """torch.arange(start, stop, step) on `device`, made once (shared: never modify it)."""
    return torch.arange(start, stop, step, device=device)


@made_once
def _key_blocks(nk: int, sk: int, kv_block: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
    """First key, end (exclusive, at most Sk) and width of every key block, made once (shared: never modify them)."""
    k0 = steps(0, nk * kv_block, kv_block, device)
    k1 = steps(kv_block, (nk + 1) * kv_block, kv_block, device)
    if sk % kv_block == 0:
        return k0, k1, kv_block
    k1 = k1.clamp(max=sk)
    return k0, k1, k1 - k0


class StackedIntervals(list):
    """Key intervals made stacked, lo and hi (n, B', H', Sq): the list of their (lo[i], hi[i]) pairs, as
    `kv_intervals` returns them, keeping the stacked tensors for `from_intervals` (no copy back into one) and
    `longest`, a bound on hi - lo known on the host (intervals shorter than every key block fill none)."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, longest: int | None = None):
        super().__init__(zip(lo.unbind(0), hi.unbind(0)))
        self.stacked, self.longest = (lo, hi), longest


def from_intervals(
    intervals: list[tuple[torch.Tensor, torch.Tensor]], sq: int, sk: int, q_block: int, kv_block: int,
    end: torch.Tensor | None = None, max_elements: int = 1 << 25,
) -> BlockStructure:
    """Rows allowed on a union of half-open key intervals [lo, hi), each of shape (B', H', Sq); `end` (broadcast
    to (B', H', Sq)), when given, cuts every interval at it (causality: the query's position + 1).

    `any` is exact. `full` holds when a single interval covers the tile (for a union of touching
    intervals a tile is then only marked partial, which costs mask work but never correctness).
    Up to `max_elements` (intervals x rows x key blocks) all intervals are compared at once, in a number of torch
    ops that does not grow with theirs (at 2k-8k tokens a build costs its launches: a few ops per interval made a
    neighborhood's build cost thousands); past it, one interval at a time in bool comparisons (long sequences,
    where the bytes moved cost more than the launches).
    """
    nk = n_blocks(sk, kv_block)
    k0, k1, width = _key_blocks(nk, sk, kv_block, intervals[0][0].device)
    rows = torch.broadcast_shapes(*(t.shape for iv in intervals for t in iv))
    if len(intervals) * math.prod(rows) * nk > max_elements:
        return _from_each_interval(intervals, sq, sk, q_block, kv_block, end, k0, k1)
    if len(intervals) == 1:
        lo, hi = intervals[0]
    elif isinstance(intervals, StackedIntervals):
        lo, hi = intervals.stacked
    else:
        lo = torch.stack(torch.broadcast_tensors(*(iv[0] for iv in intervals)))
        hi = torch.stack(torch.broadcast_tensors(*(iv[1] for iv in intervals)))
    if end is not None:
        hi = torch.minimum(hi, end)
    lo, hi = lo.unsqueeze(-1), hi.unsqueeze(-1)
    # the overlap of keys [k0, k1) with [lo, hi) (positions outside [0, Sk) need no clamp): touched when not
    # empty, covered when it is the whole block
    overlap = torch.minimum(hi, k1) - torch.maximum(lo, k0)
    dims = () if len(intervals) == 1 else (0,)
    touched = _reduce_rows(overlap > 0, sq, q_block, "any", dims)
    longest = getattr(intervals, "longest", None)
    if longest is not None and longest < min(kv_block, sk - (nk - 1) * kv_block):  # no interval fills a block
        return BlockStructure(q_block, kv_block, sq, sk, touched, torch.zeros_like(touched))
    covered = overlap >= width
    return BlockStructure(q_block, kv_block, sq, sk, touched,
                          _reduce_rows(covered.any(0) if dims else covered, sq, q_block, "all"))


def _from_each_interval(intervals, sq, sk, q_block, kv_block, end, k0, k1) -> BlockStructure:
    """`from_intervals` one interval at a time, in bool comparisons (the same tiles)."""
    touched = covered = None
    for lo, hi in intervals:
        if end is not None:
            hi = torch.minimum(hi, end)
        lo, hi = lo.unsqueeze(-1), hi.unsqueeze(-1)
        t = (lo < k1) & (hi > k0) & (hi > lo)
        c = (lo <= k0) & (hi >= k1)
        touched = t if touched is None else touched | t
        covered = c if covered is None else covered | c
    return BlockStructure(q_block, kv_block, sq, sk, _reduce_rows(touched, sq, q_block, "any"),
                          _reduce_rows(covered, sq, q_block, "all"))


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, -2)


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
    k0, k1, _ = _key_blocks(nk, sk, kv_block, lo.device)
    lo, hi, residue = torch.broadcast_tensors(lo, hi, residue)
    rows_at_once -= rows_at_once % q_block
    any_blocks, full_blocks = [], []
    for r0 in range(0, sq, rows_at_once):
        r1 = min(r0 + rows_at_once, sq)
        # positions outside [0, Sk) need no clamp: the first lattice key then lies past the overlap either way
        lo_, hi_, res_ = (t[..., r0:r1].unsqueeze(-1) if rows_at_once < sq else t.unsqueeze(-1)
                          for t in (lo, hi, residue))
        start = torch.maximum(lo_, k0)
        first = start + (res_ - start) % step
        any_blocks.append(_reduce_rows(first < torch.minimum(hi_, k1), r1 - r0, q_block, "any"))
        if step == 1:
            full_blocks.append(_reduce_rows((lo_ <= k0) & (hi_ >= k1), r1 - r0, q_block, "all"))
    full = _cat_rows(full_blocks) if full_blocks else torch.zeros(1, dtype=torch.bool, device=lo.device).expand(
        *lo.shape[:-1], n_blocks(sq, q_block), nk)
    return BlockStructure(q_block, kv_block, sq, sk, _cat_rows(any_blocks), full)
