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

from ...core.selection import Selection, SelectionVariant, attend_selected
from ...core.variant import Call
from . import blocksparse as bs

MIN_BLOCK = 16


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
    if sel.indices.shape[:3] != (s.batch, s.q_heads, s.sq) or sel.sk != s.sk:
        raise ValueError(f"selection {tuple(sel.indices.shape[:3])} over Sk={sel.sk} does not match the call "
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
        return selection_layout(self.sel, self.call, forward_block_m(self.sel), bs.BLOCK_N, "forward")

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


__all__ = ["attend", "forward_block_m", "run", "selection_layout", "serves", "why_not"]
