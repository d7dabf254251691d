"""Gated linear attention over chunks: the state is carried from chunk to chunk; inside a chunk of C
tokens the outputs come from a C x C decayed score tile. Work O(S C D + S D Dv), memory O(C^2 D) per
head: no S x S tensor. Every exponent is a difference of cumulative log gates within one chunk, so
it is <= 0 and nothing overflows in any dtype."""
from __future__ import annotations

import torch

from ....core.recurrent import group_queries, ungroup


def gla_chunk(q, k, v, g, scale: float, state: torch.Tensor, chunk_size: int):
    """Same arguments and results as `naive.gla_parallel`."""
    acc = state.dtype
    hkv, s = k.shape[1], k.shape[2]
    qg = group_queries(q, hkv)
    outs = []
    for a in range(0, s, chunk_size):
        b = min(a + chunk_size, s)
        n = b - a
        qc, kc, vc = qg[:, :, :, a:b].to(acc), k[:, :, a:b].to(acc), v[:, :, a:b].to(acc)
        cum = g[:, :, a:b].to(acc).cumsum(2)                # log decay from the chunk start
        # Earlier chunks, through the carried state.
        o = scale * (qc * cum.exp().unsqueeze(2)) @ state.unsqueeze(2)
        # This chunk, through its C x C tile.
        later = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1).view(1, 1, n, n, 1)
        decay = (cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(later, -torch.inf).exp()
        o = o + (torch.einsum("bhgid,bhjd,bhijd->bhgij", qc, kc, decay) * scale) @ vc.unsqueeze(2)
        outs.append(o)
        last = cum[:, :, -1:]
        state = last.transpose(-1, -2).exp() * state + (kc * (last - cum).exp()).transpose(-1, -2) @ vc
    return ungroup(torch.cat(outs, dim=3)), state
