"""Sparse State Expansion (SSE), written plainly.

N states (partitions) S^1..S^N per KV head, each D x Dv. Every token is classified into partitions: router
logits r_t (N) give p_t = softmax(r_t), the top-k partitions are selected (mask m_t), and w_t = p_t * m_t
weighs both the write and the read (fla's emulk / emulq). The key is a classification over the state's rows,
phi(k) = softmax(k) (the row-sparse update; `key_softmax=False` keeps k). With optional GLA log decays g_t
(<= 0, per key dimension), applied only to the partitions a token selects:

    S^n_t = diag(exp(m_t[n] g_t)) S^n_{t-1} + w_t[n] phi(k_t)^T v_t,        o_t = scale * sum_n w_t[n] q_t S^n_t.

Unselected partitions are neither written, read nor decayed. As a quadratic form, with
G^n_t = sum_{u<=t} m_u[n] g_u:

    o_i = scale * sum_{j<=i} sum_n w_i[n] w_j[n] sum_d q_id phi(k_j)_d exp(G^n_id - G^n_jd) v_j
          + scale * sum_n w_i[n] (q_i * exp(G^n_i)) S^n_0.

State layout (B, Hkv, N * D, Dv): partition n in rows n*D .. (n+1)*D - 1.
"""
from __future__ import annotations

import torch

from ....core.recurrent import group_queries, ungroup


def route(router: torch.Tensor, active: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router logits (..., N) -> (w = softmax * top-k mask, the mask), both (..., N)."""
    p = torch.softmax(router, dim=-1)
    mask = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(active, dim=-1).indices, True)
    return p * mask, mask


def key_map(k: torch.Tensor, key_softmax: bool) -> torch.Tensor:
    return torch.softmax(k, dim=-1) if key_softmax else k


def sse_parallel(q, k, v, router, g, scale: float, active: int, key_softmax: bool, state: torch.Tensor):
    """q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), router (B, Hkv, S, N), g None | (B, Hkv, S, D),
    state (B, Hkv, N D, Dv) -> (o (B, Hq, S, Dv), final state)."""
    acc = state.dtype
    b, hkv, s, d = k.shape
    n = router.shape[-1]
    w, mask = route(router.to(acc), active)
    fk, v = key_map(k.to(acc), key_softmax), v.to(acc)
    qg = group_queries(q.to(acc), hkv)                                   # (B, Hkv, G, S, D)
    s0 = state.view(b, hkv, n, d, -1)
    gate = k.new_zeros(b, hkv, s, d, dtype=acc) if g is None else g.to(acc)
    cum = (mask.unsqueeze(-1) * gate.unsqueeze(-2)).cumsum(2)            # (B, Hkv, S, N, D): G^n_t
    later = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1).view(1, 1, s, s, 1, 1)
    decay = (cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(later, -torch.inf).exp()   # (B, Hkv, i, j, N, D)
    scores = scale * torch.einsum("bhgid,bhjd,bhijnd,bhin,bhjn->bhgij", qg, fk, decay, w, w)
    o = scores @ v.unsqueeze(2) + scale * torch.einsum("bhgid,bhind,bhin,bhnde->bhgie", qg, cum.exp(), w, s0)
    last = cum[:, :, -1:]
    final = (last.squeeze(2).exp().unsqueeze(-1) * s0
             + torch.einsum("bhjn,bhjnd,bhjd,bhje->bhnde", w, (last - cum).exp(), fk, v))
    return ungroup(o), final.reshape(state.shape)
