"""Content-sparse variants (the selection contract, `core/selection.py`) on the block-sparse Triton kernels.

The variant chooses its keys (`select`, on the GPU, its own code); the choice becomes a block-sparse `Layout` for
the kernels of `blocksparse.py` without any Sq x Sk tensor, built on the device per call (a selection depends on
q and k, so there is nothing to cache):

- per (batch, query head, tile of BLOCK_M queries) and key tile of BLOCK_N keys: a tile is *full* when every
  query of the tile chose the key block holding it and causality and the sequence end allow all of it (no mask
  work in the kernel); *partial* when some query chose it; otherwise skipped. So the kernel's work is the union
  of the tile's selections: equal to the selection when the variant selects per query block (SeerAttention),
  larger when nearby queries disagree (MoBA, Quest select per query);
- a partial tile's bits are built word by word: per query row, all ones where the row chose the tile's block, and
  causality and the sequence end as a prefix of allowed keys (never a per-key tensor);
- the forward's tables hold the query-block lists only, the backward's (its own tiles) the key-block lists only.

Served: selection variants whose output is exact softmax over the selection (`forward_torch` not overridden), with
key blocks that tile the kernels' 64- and 128-key tiles (16, 32, 64 or a multiple of 128 keys). Forward and
backward (the backward's tiles come from the same selection). Rows with nothing selected give zeros. A kernel that
fails to compile or launch falls back to the torch path (`attend_selected`) with a one-time warning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.blocks import made_once, steps
from ...core.selection import Selection, SelectionVariant, attend_selected
from ...core.variant import Call
from . import blocksparse as bs
from .linear import _interpreting
from .tables import _pack_bits

MIN_BLOCK = 16
_UNLISTED = 1 << 40  # sorts after every key tile


def serves(cls) -> bool:
    return issubclass(cls, SelectionVariant) and cls.forward_torch is SelectionVariant.forward_torch


def _block_fits(block: int, block_n: int) -> bool:
    return block >= MIN_BLOCK and (block % block_n == 0 or block_n % block == 0)


def _row_group(sel: Selection, call: Call, block_m: int) -> int:
    """Queries per row of the choice table: 1, or a whole number of them per tile when the selection is shared by
    aligned query blocks (`query_block`) that line up with the tiles (the call's first query starts a block)."""
    qb = sel.query_block
    if not qb or call.shapes.offset % qb or (qb % block_m and block_m % qb):
        return 1
    return min(qb, block_m)


def _chosen(sel: Selection, rows: int, group: int) -> torch.Tensor:
    """bool (B, Hq, rows, nb): row r (queries r * group ...) chose key block j. Rows past the queries repeat the
    last one's choice, so that a tile's any/all over its rows are those of its real queries (the kernels never
    store those rows)."""
    idx = sel.indices[:, :, ::group]
    if rows > idx.shape[2]:
        idx = torch.cat([idx, idx[:, :, -1:].expand(-1, -1, rows - idx.shape[2], -1)], dim=2)
    nb = -(-sel.sk // sel.block)
    out = torch.zeros(*idx.shape[:3], nb + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(-1, torch.where(idx >= 0, idx, nb), True)
    return out[..., :nb]


def _per_tile(x: torch.Tensor, block: int, block_n: int, nk: int, reduce) -> torch.Tensor:
    """(..., nb) per key block -> (..., nk) per key tile of block_n keys (`reduce`: any/all over a tile's blocks)."""
    if block >= block_n:
        return x.repeat_interleave(block // block_n, dim=-1)[..., :nk]
    per = block_n // block
    pad = nk * per - x.shape[-1]
    fill = reduce is torch.all  # blocks past the end: neutral for the reduction (the bits mask those keys)
    x = torch.nn.functional.pad(x, (0, pad), value=fill) if pad > 0 else x[..., : nk * per]
    return reduce(x.view(*x.shape[:-1], nk, per), dim=-1)


def selection_layout(sel: Selection, call: Call, block_m: int, block_n: int, lists: str = "both") -> bs.Layout:
    """The kernels' tables for `sel` under the call's causality (bottom-right) and lengths; `lists`: "forward"
    (per query block: the forward and dQ kernels), "transposed" (per key block: dK/dV) or "both"."""
    s = call.shapes
    if sel.shape[:3] != (s.batch, s.q_heads, s.sq) or sel.sk != s.sk:
        raise ValueError(f"selection {sel.shape[:3]} over Sk={sel.sk} does not match the call "
                         f"(B, Hq, Sq) = {(s.batch, s.q_heads, s.sq)}, Sk={s.sk}")
    if not _block_fits(sel.block, block_n):
        raise ValueError(f"selection blocks of {sel.block} keys do not tile key tiles of {block_n}")
    dev = sel.indices.device
    nq, nk = -(-s.sq // block_m), -(-s.sk // block_n)
    group = _row_group(sel, call, block_m)
    chosen = _chosen(sel, nq * block_m // group, group)                   # (B, Hq, nq * BM / group, nb)
    tiles = chosen.view(s.batch, s.q_heads, nq, block_m // group, -1)
    touched = _per_tile(tiles.any(3), sel.block, block_n, nk, torch.any)  # (B, Hq, nq, nk)
    everyone = _per_tile(tiles.all(3), sel.block, block_n, nk, torch.all)
    q_first = torch.arange(nq, device=dev).view(-1, 1) * block_m + s.offset
    q_last = (torch.arange(1, nq + 1, device=dev).view(-1, 1) * block_m).clamp(max=s.sq) - 1 + s.offset
    k_first = torch.arange(nk, device=dev).view(1, -1) * block_n
    k_last = (k_first + block_n).clamp(max=s.sk) - 1
    clean = (k_first + block_n <= s.sk).expand(nq, nk)          # no key of the tile past Sk
    if call.causal:
        touched = touched & (k_first <= q_last)
        clean = clean & (k_last <= q_first)                     # every query of the tile sees every key of it
    full = touched & everyone & clean
    part = touched & ~full
    lists = bs.tile_lists(full, part, forward=lists != "transposed", transposed=lists != "forward")
    bits = _bits(chosen, group, sel.block, call, part, clean, block_m, block_n)
    return bs.Layout(block_m, block_n, *lists[:5], bits, *lists[5:], s.q_heads * nq, nq, s.q_heads * nk, nk)


def shared_rows_layout(sel: Selection, call: Call, block_m: int, block_n: int) -> bs.Layout | None:
    """The forward's tables of a selection made per aligned query block (SeerAttention), without a device sync;
    None where they do not apply. Each tile of queries reads one row of block indices; every tile a chosen block
    covers is full, except the tiles crossing the causal diagonal or the end of Sk, which are partial with one of a
    few bit patterns shared by all rows (the query and key tiles line up, so the diagonal's pattern depends only on
    where the key tile starts in the query tile). No `nonzero`, no per-tile bits and no (B, Hq, Sq / BM, Sk / BN)
    flags; the lists hold at most the row's chosen tiles. One kernel launch on CUDA (`_shared_rows_kernel`), else
    the same lists by torch ops (`shared_rows_lists`, the definition). Applies when the query blocks hold whole
    query tiles (query_block a multiple of block_m), the call's first query starts a block, key blocks hold whole
    key tiles, and the key tiles line up with the query tiles under causality."""
    s = call.shapes
    qb = sel.query_block
    if (not qb or qb % block_m or s.offset % qb or sel.block % block_n or s.offset % block_n
            or block_m % block_n or sel.shape[:3] != (s.batch, s.q_heads, s.sq) or sel.sk != s.sk):
        return None
    rows = _tile_rows(sel, block_m)                                                 # (B, Hq, nq, n)
    args = (rows, sel.block // block_n, block_m, block_n, s.offset, s.sk, call.causal)
    lists = (_shared_rows_kernel_lists if _kernel_builds(rows) else shared_rows_lists)(*args)
    nq = rows.shape[2]
    empty = torch.empty(0, 1, dtype=torch.int32, device=rows.device)
    return bs.Layout(block_m, block_n, *lists, _shared_bits(block_m, block_n, call.causal, s.sk % block_n, rows.device),
                     empty, empty, empty, empty, empty, s.q_heads * nq, nq, 0, 0)


def _tile_rows(sel: Selection, block_m: int) -> torch.Tensor:
    """(B, Hq, nq, n): the row of block indices of each tile of block_m queries (the tiles start query blocks or lie
    inside them), without expanding the selection to one row per query."""
    if sel.rows is None:
        return sel.indices[:, :, ::block_m]
    if block_m == sel.query_block:   # the first query starts a block: tile i reads row i
        return sel.choices
    return sel.choices[:, :, sel.rows[::block_m]]


def shared_rows_lists(rows, per: int, block_m: int, block_n: int, offset: int, sk: int, causal: bool) -> tuple:
    """(full_num, full_idx, part_num, part_idx, part_tile) of `shared_rows_layout` from the rows of block indices
    (B, Hq, nq, n), by torch ops: each chosen block's `per` key tiles, full or partial by the tile's first query
    (`offset` + i BM) and last (capped at Sk), listed ascending, entries past a row's count 0."""
    dev = rows.device
    nq = rows.shape[2]
    tile = (rows.unsqueeze(-1) * per + steps(0, per, 1, dev)).flatten(-2)           # (B, Hq, nq, n * per)
    k_first = tile * block_n
    q_first = (steps(0, nq, 1, dev) * block_m + offset).view(-1, 1)
    q_last = (q_first + block_m).clamp(max=sk) - 1
    chosen = (rows >= 0).repeat_interleave(per, dim=-1) & (k_first < sk)
    full = chosen & (k_first + block_n <= sk)
    if causal:
        chosen = chosen & (k_first <= q_last)
        full = full & (k_first + block_n - 1 <= q_first)
    part = chosen & ~full
    width = tile.shape[-1]
    # sorted with the entries not listed last: a row's list is its first `num` entries, ascending
    full_idx = torch.where(full, tile, _UNLISTED).sort(-1).values
    part_idx = torch.where(part, tile, _UNLISTED).sort(-1).values
    full_idx = torch.where(full_idx < _UNLISTED, full_idx, 0)
    part_idx = torch.where(part_idx < _UNLISTED, part_idx, 0)
    if causal:   # pattern p: the key tile starts p tiles into the query tile
        part_tile = ((part_idx * block_n - q_first) // block_n).clamp(0, block_m // block_n - 1)
    else:        # the only partial tile is the last one, cut at Sk
        part_tile = torch.zeros_like(part_idx)
    return (full.sum(-1, dtype=torch.int32).view(-1), full_idx.to(torch.int32).view(-1, width),
            part.sum(-1, dtype=torch.int32).view(-1), part_idx.to(torch.int32).view(-1, width),
            part_tile.to(torch.int32).view(-1, width))


def _kernel_builds(rows: torch.Tensor) -> bool:
    return bs.TRITON_ERROR is None and (rows.is_cuda or _interpreting())


if bs.triton is not None:
    tl = bs.tl

    @bs.triton.jit(do_not_specialize=["nq", "heads", "width", "s_b", "s_h", "s_i", "s_n", "offset", "sk"])
    def _shared_rows_kernel(ROWS, FN, FI, PN, PI, PT, nq, heads, width, s_b, s_h, s_i, s_n, offset, sk,
                            PER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
                            NP: tl.constexpr):
        """One table row (batch, head, query tile) of `shared_rows_lists`: the same lists, sorted in registers."""
        r = tl.program_id(0)
        i = r % nq
        h = (r // nq) % heads
        b = r // nq // heads
        e = tl.arange(0, NP)
        inside = e < width
        blk = tl.load(ROWS + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + i.to(tl.int64) * s_i
                       + (e // PER) * s_n, mask=inside, other=-1).to(tl.int32)
        tile = blk * PER + e % PER
        k_first = tile * BN
        q_first = i * BM + offset
        q_last = tl.minimum(q_first + BM, sk) - 1
        chosen = inside & (blk >= 0) & (k_first < sk)
        full = chosen & (k_first + BN <= sk)
        if CAUSAL:
            chosen = chosen & (k_first <= q_last)
            full = full & (k_first + BN - 1 <= q_first)
        part = chosen & (full == 0)
        unlisted = 2147483647
        full_idx = tl.sort(tl.where(full, tile, unlisted))
        part_idx = tl.sort(tl.where(part, tile, unlisted))
        full_idx = tl.where(full_idx < unlisted, full_idx, 0)
        part_idx = tl.where(part_idx < unlisted, part_idx, 0)
        if CAUSAL:
            pattern = tl.minimum(tl.maximum(part_idx * BN - q_first, 0) // BN, BM // BN - 1)
        else:
            pattern = part_idx * 0
        at = r.to(tl.int64) * width + e
        tl.store(FN + r, tl.sum(full.to(tl.int32), 0))
        tl.store(PN + r, tl.sum(part.to(tl.int32), 0))
        tl.store(FI + at, full_idx, mask=inside)
        tl.store(PI + at, part_idx, mask=inside)
        tl.store(PT + at, pattern, mask=inside)


def _shared_rows_kernel_lists(rows, per: int, block_m: int, block_n: int, offset: int, sk: int, causal: bool
                              ) -> tuple:
    """`shared_rows_lists` in one kernel launch."""
    b, h, nq, n = rows.shape
    width = n * per
    count = b * h * nq
    dev = rows.device
    full_num, part_num = torch.empty(2, count, dtype=torch.int32, device=dev)
    full_idx, part_idx, part_tile = torch.empty(3, count, width, dtype=torch.int32, device=dev)
    _shared_rows_kernel[(count,)](rows, full_num, full_idx, part_num, part_idx, part_tile, nq, h, width,
                                  *rows.stride(), offset, sk, PER=per, BM=block_m, BN=block_n, CAUSAL=causal,
                                  NP=max(2, bs.triton.next_power_of_2(width)))
    return full_num, full_idx, part_num, part_idx, part_tile


@made_once
def _shared_bits(block_m: int, block_n: int, causal: bool, tail: int, device) -> torch.Tensor:
    """int32 (patterns, BM, BN / 32) of `shared_rows_layout`: under causality, pattern p allows row r the keys
    c <= r - p * BN of a key tile starting p tiles into the query tile; else one pattern allowing the first `tail`
    keys (the last key tile, cut at Sk)."""
    r = torch.arange(block_m, device=device).view(1, -1, 1)
    c = torch.arange(block_n, device=device).view(1, 1, -1)
    if causal:
        allowed = c <= r - torch.arange(block_m // block_n, device=device).view(-1, 1, 1) * block_n
    else:
        allowed = (c < (tail or block_n)).expand(1, block_m, block_n)
    return _pack_bits(allowed)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _bits(chosen, group: int, block: int, call: Call, part, clean, block_m: int, block_n: int) -> torch.Tensor:
    """int32 (tiles, BM, BN / 32) in tile-id order, built word by word (never per key): each query's choice of the
    tile's key block(s) (row query // group of `chosen`), and on the tiles that `clean` leaves out causality and
    the sequence end, which in a tile row allow a prefix of its keys."""
    s = call.shapes
    dev = chosen.device
    coords = part.nonzero()                               # (tiles, 4): b, h, i, j (a device sync)
    b, h, i, j = (x.view(-1, 1) for x in coords.unbind(1))
    rows = i * block_m + torch.arange(block_m, device=dev).view(1, -1)                    # (T, BM)
    words = block_n // 32
    table_rows = rows // group
    if block >= block_n:
        row_in = chosen[b, h, table_rows, (j * block_n) // block]                         # (T, BM)
        out = torch.where(row_in, -1, 0).to(torch.int32).unsqueeze(-1).expand(-1, -1, words)
    else:
        per = block_n // block
        blk = (j * per + torch.arange(per, device=dev).view(1, -1)).clamp(max=chosen.shape[-1] - 1)   # (T, per)
        row_in = chosen[b.unsqueeze(-1), h.unsqueeze(-1), table_rows.unsqueeze(-1), blk.unsqueeze(1)]  # (T, BM, per)
        if block >= 32:                                   # a block spans whole words
            out = torch.where(row_in.repeat_interleave(block // 32, dim=-1), -1, 0).to(torch.int32)
        else:                                             # a word holds 32 / block blocks
            m = 32 // block
            shifts = torch.arange(m, device=dev) * block
            parts = row_in.view(*row_in.shape[:2], words, m).to(torch.int64) * (((1 << block) - 1) << shifts)
            out = _as_int32(parts.sum(-1))
    out = out.contiguous()
    e = (~clean[i.view(-1), j.view(-1)]).nonzero().view(-1)   # tiles crossing the causal diagonal or Sk
    if e.numel():
        allowed = (s.sk - j[e] * block_n).expand(-1, block_m)                             # keys before Sk
        if call.causal:
            allowed = torch.minimum(allowed, rows[e] + s.offset + 1 - j[e] * block_n)
        n = (allowed.unsqueeze(-1) - 32 * torch.arange(words, device=dev)).clamp(0, 32)   # (E, BM, words)
        out[e] &= _as_int32((1 << n) - 1)
    return out


def why_not(variant, call: Call, q) -> str | None:
    if not serves(type(variant)):
        return (f"{variant.name}: the triton kernels serve selection variants whose output is exact softmax over "
                "their selection")
    if bs.TRITON_ERROR is not None:
        return bs.TRITON_ERROR
    if q.device.type != "cuda":
        return f"triton kernels run on CUDA tensors; q is on {q.device}"
    if q.dtype not in bs.DTYPES:
        return f"the triton kernels take float16/bfloat16/float32, got {q.dtype}"
    if max(call.shapes.d, call.shapes.dv) > 256:
        return f"head dims up to 256, got D={call.shapes.d}, Dv={call.shapes.dv}"
    block = variant.selection_block
    if block is None:
        return (f"{variant.name} selects single keys (or blocks sized only when it selects); the kernels need key "
                "blocks known up front")
    if not all(_block_fits(block, n) for n in (bs.BLOCK_N, bs.BWD_BLOCK_N)):
        return (f"{variant.name} selects blocks of {block} keys; the kernels need blocks that tile {bs.BLOCK_N}- and "
                f"{bs.BWD_BLOCK_N}-key tiles: 16, 32, 64 or a multiple of 128 keys")
    return None


def forward_block_m(sel: Selection) -> int:
    """Query tile of the forward: 64 below 128-key blocks (a query block of SeerAttention's default 64 is then
    exactly one tile, and per-query selections union over fewer queries), else 128."""
    return 128 if sel.block >= 128 else 64


@dataclass
class _SelectionTables:
    """What the block-sparse kernels' backward needs for a selection (blocksparse.BlockSparse)."""

    sel: Selection
    call: Call

    def forward_layout(self) -> bs.Layout:
        block_m = forward_block_m(self.sel)
        return (shared_rows_layout(self.sel, self.call, block_m, bs.BLOCK_N)
                or selection_layout(self.sel, self.call, block_m, bs.BLOCK_N, "forward"))

    def backward_layout(self) -> bs.Layout:
        return selection_layout(self.sel, self.call, bs.BWD_BLOCK_M, bs.BWD_BLOCK_N, "transposed")

    def fallback(self, q, k, v):
        return attend_selected(q, k, v, self.sel, self.call)


def attend(q, k, v, sel: Selection, call: Call):
    """Exact softmax over `sel` (and causality) through the kernels, differentiable in q, k, v."""
    tables = _SelectionTables(sel, call)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return bs.BlockSparse.apply(q, k, v, tables.forward_layout(), call.scale, tables)
    return bs.forward(q, k, v, tables.forward_layout(), call.scale)[0]


def run(variant, q, k, v, call: Call):
    sel = variant.select(q.detach(), k.detach(), call)
    if not _block_fits(sel.block, bs.BLOCK_N) or not _block_fits(sel.block, bs.BWD_BLOCK_N):
        raise ValueError(f"{variant.name} selected blocks of {sel.block} keys: the triton kernels need blocks of "
                         f">= {MIN_BLOCK} keys tiling {bs.BLOCK_N}- and {bs.BWD_BLOCK_N}-key tiles")
    try:
        return attend(q, k, v, sel, call)
    except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or launch falls back
        bs._warn_once("forward", err)
        return attend_selected(q, k, v, sel, call)


__all__ = ["attend", "forward_block_m", "run", "selection_layout", "serves", "shared_rows_layout", "why_not"]
