"""SSE over chunks: each partition is a gated linear attention over the tokens routed to it, so the N
partitions run as N x Hkv heads of the shared decay engine (queries and keys weighed by the routing weight,
log gates zeroed where a token does not select the partition), and the partitions' outputs are summed.
Work O(N (S C D + S D Dv)), no S x S tensor. The step is the same on one token."""
from __future__ import annotations

import torch

from .._decay import decay_chunk, decay_step
from .naive import key_map, route


def expand(q, k, v, router, g, active: int, key_softmax: bool, acc):
    """(B, Hq|Hkv, [S,] ...) tensors -> the same over N x Hkv heads (partition-major inside each KV head)."""
    b, hkv = k.shape[:2]
    w, mask = route(router.to(acc), active)                  # (B, Hkv, [S,] N)
    n = w.shape[-1]
    w_, m_ = w.movedim(-1, 2), mask.movedim(-1, 2)          # (B, Hkv, N, [S])
    qg = q.to(acc).view(b, hkv, 1, q.shape[1] // hkv, *q.shape[2:])
    qn = (qg * w_.unsqueeze(3).unsqueeze(-1)).flatten(1, 3)                 # (B, Hkv N G, [S,] D)
    kn = (key_map(k.to(acc), key_softmax).unsqueeze(2) * w_.unsqueeze(-1)).flatten(1, 2)
    vn = v.to(acc).unsqueeze(2).expand(b, hkv, n, *v.shape[2:]).flatten(1, 2)
    gn = None if g is None else (m_.unsqueeze(-1) * g.to(acc).unsqueeze(2)).flatten(1, 2)
    return qn, kn, vn, gn, n


def collapse(o: torch.Tensor, hkv: int, n: int) -> torch.Tensor:
    """(B, Hkv N G, ...) partition outputs -> (B, Hq, ...), summed over the partitions."""
    return o.view(o.shape[0], hkv, n, -1, *o.shape[2:]).sum(2).flatten(1, 2)


def sse_chunk(q, k, v, router, g, scale: float, active: int, key_softmax: bool, state: torch.Tensor,
              chunk_size: int):
    """Same arguments and results as `naive.sse_parallel`."""
    b, hkv, _, d = k.shape
    qn, kn, vn, gn, n = expand(q, k, v, router, g, active, key_softmax, state.dtype)
    o, final = decay_chunk(qn, kn, vn, gn, scale, state.view(b, hkv * n, d, -1), chunk_size)
    return collapse(o, hkv, n), final.reshape(state.shape)


def sse_step(q_t, k_t, v_t, router_t, g_t, scale: float, active: int, key_softmax: bool, state: torch.Tensor):
    """One token: q_t (B, Hq, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv), router_t (B, Hkv, N), g_t None | (B, Hkv, D)."""
    b, hkv, d = k_t.shape
    qn, kn, vn, gn, n = expand(q_t, k_t, v_t, router_t, g_t, active, key_softmax, state.dtype)
    o, final = decay_step(qn, kn, vn, gn, state.view(b, hkv * n, d, -1), scale)
    return collapse(o, hkv, n), final.reshape(state.shape)
