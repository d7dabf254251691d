"""The kernel tables of the block-sparse Triton kernels (`blocksparse.py`): a variant's block structure
(`core/blocks.py`) as per-row lists of full and partial tiles, the partial tiles' masks as bits, and the same lists
transposed for dK/dV; built on the call's device, cached per configuration and rebuilt only when the call's inputs
change (`reuse.InputsKey`)."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ...core.blocks import made_once, steps
from ...core.variant import Call, SoftmaxVariant
from ..reuse import InputsKey

MASK_ELEMENTS = 1 << 26  # mask entries of the partial tiles evaluated at once (64 Mi bools, 256 MiB as int32 words)


# ---- layout: the block structure as kernel tables ------------------------------------------------------------------


@dataclass
class Layout:
    """Tile lists of one call's mask for block_m x block_n tiles; index rows by (batch', head', block).

    `b_step` / `h_step` are the row strides of batch and query head (0 where the mask is the same for all)."""

    block_m: int
    block_n: int
    full_num: torch.Tensor   # int32 (R,): full tiles of each query-block row
    full_idx: torch.Tensor   # int32 (R, nk): their key blocks, ascending
    part_num: torch.Tensor
    part_idx: torch.Tensor   # int32 (R, nk): key blocks of partial tiles
    part_tile: torch.Tensor  # int32 (R, nk): their tile ids (rows of `bits`)
    bits: torch.Tensor       # int32 (tiles, block_m, block_n / 32): bit c of word w = key 32 w + c allowed
    t_full_num: torch.Tensor  # the same, transposed: rows are (batch', head', key block), entries query blocks
    t_full_idx: torch.Tensor
    t_part_num: torch.Tensor
    t_part_idx: torch.Tensor
    t_part_tile: torch.Tensor
    b_step: int
    h_step: int
    t_b_step: int
    t_h_step: int

    def dense(self, sq: int, sk: int, batch: int, heads: int) -> torch.Tensor:
        """The mask the tables encode, bool (batch, heads, Sq, Sk): for tests (the layout is the kernel's input)."""
        nq, nk = -(-sq // self.block_m), -(-sk // self.block_n)
        out = torch.zeros(batch, heads, nq * self.block_m, nk * self.block_n, dtype=torch.bool)
        bits = (self.bits.cpu().unsqueeze(-1) >> torch.arange(32)) & 1  # (tiles, block_m, words, 32)
        bits = bits.bool().reshape(self.bits.shape[0], self.block_m, self.block_n)
        for b in range(batch):
            for h in range(heads):
                for i in range(nq):
                    r = b * self.b_step + h * self.h_step + i
                    rows = slice(i * self.block_m, (i + 1) * self.block_m)
                    for j in self.full_idx[r, : int(self.full_num[r])].tolist():
                        out[b, h, rows, j * self.block_n:(j + 1) * self.block_n] = True
                    for j, t in zip(self.part_idx[r, : int(self.part_num[r])].tolist(),
                                    self.part_tile[r, : int(self.part_num[r])].tolist()):
                        out[b, h, rows, j * self.block_n:(j + 1) * self.block_n] = bits[t]
        return out[:, :, :sq, :sk]


def _lists(flags: torch.Tensor, tile_id: torch.Tensor) -> tuple:
    """Stacked flags bool (2, ..., n) of full and partial tiles, and the tiles' ids (..., n) -> (full_num, full_idx,
    part_num, part_idx, part_tile), rows (...) flattened: counts int32 (rows,), then the indices of the set flags,
    ascending, int32 (rows, n), entries past the count 0, and the partial tiles' ids there (past the count: the id
    at index 0). One prefix sum and one scatter for both kinds, linear in the flags (a sort took milliseconds at
    128k tokens)."""
    n = flags.shape[-1]
    rank = flags.cumsum(-1)                                       # 1-based rank of a set flag in its row
    num = flags.sum(-1, dtype=torch.int32)
    idx = torch.zeros(*flags.shape[:-1], n + 1, dtype=torch.long, device=flags.device)
    # a set flag goes to column rank (the lists start at column 1), an unset one to column 0, a dump
    idx.scatter_(-1, rank * flags, steps(0, n, 1, flags.device).expand(flags.shape))
    idx = idx[..., 1:]
    part_tile = torch.gather(tile_id, -1, idx[1])
    idx = idx.to(torch.int32)
    if flags.dim() > 3:  # rows over several dimensions: flattened
        num, idx, part_tile = num.view(2, -1), idx.view(2, -1, n), part_tile.view(-1, n)
    full_num, part_num = num.unbind(0)
    full_idx, part_idx = idx.unbind(0)
    return full_num, full_idx, part_num, part_idx, part_tile


def tile_lists(full: torch.Tensor, part: torch.Tensor, forward: bool = True, transposed: bool = True) -> tuple:
    """Full and partial tiles, bool (B', H', nq, nk) -> the Layout's lists, forward (rows: query blocks) then
    transposed (rows: key blocks); partial tiles are numbered in row-major order (the order of `part.nonzero()`).
    Lists not asked for are empty tensors (the forward reads only the first five, dK/dV only the last five)."""
    flags = torch.stack([full, part])
    return _tile_lists(flags, flags[1], forward, transposed)


def _tile_lists(flags: torch.Tensor, part: torch.Tensor, forward: bool = True, transposed: bool = True) -> tuple:
    """`tile_lists` of the full and partial tiles stacked, bool (2, B', H', nq, nk); `part` is flags[1]."""
    nk = flags.shape[-1]
    tile_id = part.view(-1).cumsum(0, dtype=torch.int32) - 1
    fwd = _lists(flags.view(2, -1, nk), tile_id.view(-1, nk)) if forward else None
    t = _lists(flags.transpose(-1, -2), tile_id.view(part.shape).transpose(-1, -2)) if transposed else None
    none = (torch.empty(0, 1, dtype=torch.int32, device=part.device),) * 5 if fwd is None or t is None else None
    return (fwd or none) + (t or none)


def build_layout(variant: SoftmaxVariant, call: Call, block_m: int, block_n: int, lists: str = "both") -> Layout:
    """The call's tables for block_m x block_n tiles, from the variant's block structure and its mask on the partial
    tiles: a fixed number of torch ops (40-70, each a launch on a GPU) and one device sync, whatever the variant.
    `lists`: "forward" (per query block: what the forward and dQ kernels read), "transposed" (per key block: dK/dV)
    or "both"; lists not asked for are empty tensors (each direction is 7 ops and 9 views of a build)."""
    s = call.shapes
    struct = variant.block_structure(call, block_m, block_n)
    flags = torch.stack(torch.broadcast_tensors(struct.full, struct.any))  # a full tile also has `any` set
    bp, hp, nq, nk = flags.shape[1:]
    full, part = flags.unbind(0)
    if s.sk % block_n:  # the kernel loads whole key tiles: a ragged last tile is masked by its bits
        full[..., -1] = False
    part ^= full  # partial: any entry, not full
    lists = _tile_lists(flags, part, forward=lists != "transposed", transposed=lists != "forward")
    return Layout(block_m, block_n, *lists[:5], _tile_bits(variant, call, part, block_m, block_n), *lists[5:],
                  hp * nq if bp > 1 else 0, nq if hp > 1 else 0, hp * nk if bp > 1 else 0, nk if hp > 1 else 0)


@made_once
def _bit_weights(device) -> torch.Tensor:
    """int32 (32,): 2^c for bit c, 2^31 as -2^31, made once per device (shared: never modify it)."""
    return torch.tensor([1 << c for c in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device)


def _pack_bits(m: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """bool (..., n) with n a multiple of 32 -> int32 (..., n / 32), bit c of word w = element 32 w + c (into `out`
    when given). One multiply and one sum: the int32 weights never overflow a word's sum."""
    return torch.sum(m.reshape(*m.shape[:-1], m.shape[-1] // 32, 32) * _bit_weights(m.device), -1, dtype=torch.int32,
                     out=out)


@made_once
def _tile_positions(offset: int, block_m: int, block_n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of a tile's rows (queries, from `offset`) and columns (keys) from its first, (1, block_m, 1) and
    (1, 1, block_n), made once (shared: never modify them)."""
    return (torch.arange(offset, offset + block_m, device=device).view(1, -1, 1),
            torch.arange(block_n, device=device).view(1, 1, -1))


def _tile_bits(variant, call: Call, part: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """The variant's mask (with causality and the sequence ends) on every partial tile, packed to bits."""
    s = call.shapes
    dev = part.device
    coords = part.nonzero()  # (tiles, 4): b', h', i, j in tile-id order (the one device sync of a build)
    tiles = coords.shape[0]
    chunk = max(1, MASK_ELEMENTS // (block_m * block_n))
    out = torch.empty(tiles, block_m, block_n // 32, dtype=torch.int32, device=dev) if tiles > chunk else None
    rows, cols = _tile_positions(s.offset, block_m, block_n, dev)
    for c0 in range(0, max(tiles, 1), chunk):
        b, h, i, j = (coords[c0:c0 + chunk] if out is not None else coords).view(-1, 4, 1, 1).unbind(1)
        q_pos, kv_pos = torch.add(rows, i, alpha=block_m), torch.add(cols, j, alpha=block_n)
        # past the ends: clamped, so variants that index per-call inputs by position stay inside them, then masked
        inside = None
        if s.sq % block_m:
            inside = q_pos < s.sk
            q_pos = q_pos.clamp(max=s.sk - 1)
        if s.sk % block_n:
            inside = kv_pos < s.sk if inside is None else inside & (kv_pos < s.sk)
            kv_pos = kv_pos.clamp(max=s.sk - 1)
        m = variant.full_mask(call, b, h, q_pos, kv_pos)
        m = inside if m is None else m if inside is None else m & inside
        if m is None:
            m = torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
        shape = (i.shape[0], block_m, block_n)
        bits = _pack_bits(m if m.shape == shape else m.expand(shape), None if out is None else out[c0:c0 + chunk])
        if out is None:
            return bits
    return out


_lock = threading.Lock()
_layouts: dict = {}
stats = {"layouts_built": 0}


def layout_for(variant: SoftmaxVariant, call: Call, block_m: int, block_n: int, lists: str = "both") -> Layout:
    """The call's layout for block_m x block_n tiles (`lists` as `build_layout`), rebuilt only when the
    configuration, shapes or inputs changed."""
    s = call.shapes
    key = (variant.key, s, call.causal, call.device, block_m, block_n, lists)
    given = InputsKey(variant, call.inputs)
    with _lock:
        hit = _layouts.get(key)
        if hit is not None and hit[0] == given:
            return hit[1]
    layout = build_layout(variant, call, block_m, block_n, lists)
    with _lock:
        _layouts[key] = (given, layout)
        stats["layouts_built"] += 1
    return layout


__all__ = ["Layout", "build_layout", "layout_for", "stats", "tile_lists"]
