"""A FlexAttention `BlockMask` built directly from a block-level `Selection`'s indices.

Per (batch row, query head, tile of `q_block` queries) the kv blocks are the union of the blocks the tile's
queries selected: a block every query of the tile selected and causality fully allows is a full block (no
mask_mod call), the rest are partial and checked per query by the mask_mod against a (B, Hq, Sq, n) table of
the selection (n = kv blocks; never Sq x Sk). Building costs O(B Hq Sq n); heads never share blocks.

FlexAttention compiles once per mask_mod object and shape: the mask_mod and its table are kept per
(shapes, block sizes, causal, device), and each call copies its selection into that table, so a compiled
flex_attention sees the same function on every call of a shape (no recompilation per call).
"""
from __future__ import annotations

import threading

import torch

from .selection import Selection
from .variant import Call

Q_BLOCK = 128
_lock = threading.Lock()
_tables: dict = {}


def _mask_mod_for(key, shape, device, causal: bool, offset: int, block: int):
    """(table, mask_mod) kept for `key`: the table is overwritten by each call of these shapes."""
    with _lock:
        if key not in _tables:
            table = torch.zeros(shape, dtype=torch.bool, device=device)

            def mask_mod(b, h, q_idx, kv_idx):
                keep = table[b, h, q_idx, kv_idx // block]
                return keep & (kv_idx <= q_idx + offset) if causal else keep

            _tables[key] = (table, mask_mod)
        return _tables[key]


def _as_lists(flags: torch.Tensor):
    """(count (..., ) int32, indices (..., n) int32): the True positions of each row first, in order."""
    order = torch.sort((~flags).to(torch.uint8), dim=-1, stable=True).indices
    return flags.sum(-1).to(torch.int32), order.to(torch.int32)


def block_mask(sel: Selection, call: Call, q_block: int = Q_BLOCK):
    """The BlockMask of `sel` (kv blocks of `sel.block` keys) and causality for this call, BLOCK_SIZE
    (q_block, sel.block). Token-level selections (block 1) have no useful block mask: ValueError."""
    from torch.nn.attention.flex_attention import BlockMask

    s = call.shapes
    if sel.block < 2:
        raise ValueError("block_mask: the selection picks single tokens (block=1); a Flex block mask needs kv blocks "
                         "of several keys (use attend_selected)")
    if sel.indices.shape[:3] != (s.batch, s.q_heads, s.sq) or sel.sk != s.sk:
        raise ValueError(f"block_mask: selection {tuple(sel.indices.shape[:3])} over Sk={sel.sk} does not match the "
                         f"call (B, Hq, Sq) = {(s.batch, s.q_heads, s.sq)}, Sk={s.sk}")
    dev, bs = sel.indices.device, sel.block
    nb, nq = -(-s.sk // bs), -(-s.sq // q_block)
    key = (s.batch, s.q_heads, s.sq, s.sk, bs, q_block, call.causal, str(dev))
    table, mask_mod = _mask_mod_for(key, (s.batch, s.q_heads, nq * q_block, nb), dev, call.causal, s.offset, bs)
    chosen = torch.zeros(s.batch, s.q_heads, nq * q_block, nb + 1, dtype=torch.bool, device=dev)
    idx = sel.indices
    chosen[:, :, : s.sq].scatter_(-1, torch.where(idx >= 0, idx, nb), True)
    table.copy_(chosen[..., :nb])
    tiles = table.view(s.batch, s.q_heads, nq, q_block, nb)
    real = (torch.arange(nq * q_block, device=dev) < s.sq).view(1, 1, nq, q_block, 1)
    touched = (tiles & real).any(3)
    everyone = (tiles | ~real).all(3)
    if call.causal:
        first = (torch.arange(nq, device=dev) * q_block + s.offset).view(-1, 1)
        last = (torch.minimum(torch.arange(1, nq + 1, device=dev) * q_block, torch.tensor(s.sq)) - 1 + s.offset).view(-1, 1)
        start = torch.arange(nb, device=dev).view(1, -1) * bs
        end = torch.minimum(start + bs, torch.tensor(s.sk)) - 1
        touched &= start <= last
        everyone &= end <= first
    full = touched & everyone & (torch.arange(nb, device=dev) * bs + bs <= s.sk).view(1, -1)   # partial last block: masked
    partial = touched & ~full
    kv_num, kv_idx = _as_lists(partial)
    full_num, full_idx = _as_lists(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(q_block, bs), mask_mod=mask_mod,
                                    seq_lengths=(s.sq, s.sk))


def flex_attend_selected(q, k, v, sel: Selection, call: Call, q_block: int = Q_BLOCK, flex_attention=None):
    """attend_selected through FlexAttention with `block_mask(sel, call)`: `flex_attention` defaults to torch's
    (eager: a reference path; pass a compiled one on GPU). Rows with nothing selected give zeros."""
    if flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention
    bm = block_mask(sel, call, q_block)
    out = flex_attention(q, k, v, block_mask=bm, scale=call.scale, enable_gqa=call.shapes.group > 1)
    return out
