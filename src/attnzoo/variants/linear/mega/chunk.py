"""Mega over chunks: one Mega chunk at a time, the EMA's convolution restricted to the chunk (C x C kernel
tiles per channel) with its state carried from the previous chunk, and the softmax over the chunk's keys.
Work O(S C D E + S C (D + Dv)), no S x S tensor."""
from __future__ import annotations

import torch

from .._offsets import pieces
from .naive import (
    chunk_attention,
    ema_parallel,
    ema_queries,
    join_state,
    split_state,
    tail_buffer,
)


def mega_chunk(q, k, v, ema: tuple, scale: float, chunk: int, state: torch.Tensor, offset: int):
    """Same arguments and results as `naive.mega_parallel`."""
    acc = state.dtype
    e, d = ema[0].shape[-1], k.shape[-1]
    ema = tuple(x.to(acc) for x in ema)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    hq, hk, keys, values, count = split_state(state, e, chunk, d)
    outs = []
    for a, b in pieces(k.shape[2], offset, chunk):
        qs, hq = ema_queries(q[:, :, a:b], ema, hq)
        ks, hk = ema_parallel(k[:, :, a:b], *ema, hk)
        held = offset if a == 0 else 0                  # only the first piece continues the state's chunk
        outs.append(chunk_attention(qs, ks, v[:, :, a:b], keys, values, held, chunk, scale))
        keys, values, count = tail_buffer(ks, v[:, :, a:b], held, chunk, keys, values)
    if not outs:
        return q.new_zeros(*q.shape[:-1], v.shape[-1]), state
    return torch.cat(outs, dim=2), join_state(hq, hk, keys, values, count)
