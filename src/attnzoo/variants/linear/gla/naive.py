"""Gated linear attention, written plainly.

With per-key-dimension log forget gates g_t <= 0 (decay a_t = exp(g_t) in (0, 1]) the state is

    S_t = diag(a_t) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t,

so, with G_t = g_1 + ... + g_t, the output is the quadratic form
    o_i = scale * (sum_{j <= i} sum_d q_id k_jd exp(G_id - G_jd) v_j  +  (q_i * exp(G_i)) S_0).
Exponents are differences G_i - G_j <= 0 (never exp(G_i) * exp(-G_j), which overflows).
"""
from __future__ import annotations

import torch

from ....core.recurrent import group_queries, ungroup
from .._decay import decay_step


def gla_parallel(q, k, v, g, scale: float, state: torch.Tensor):
    """q (B, Hq, S, D), k/g (B, Hkv, S, D), v (B, Hkv, S, Dv), state (B, Hkv, D, Dv) -> (o, final state)."""
    acc = state.dtype
    hkv, s = k.shape[1], k.shape[2]
    qg = group_queries(q.to(acc), hkv)                      # (B, Hkv, G, S, D)
    k, v = k.to(acc), v.to(acc)
    cum = g.to(acc).cumsum(2)                               # G_t
    diff = cum.unsqueeze(3) - cum.unsqueeze(2)              # (B, Hkv, i, j, D): G_i - G_j
    later = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1).view(1, 1, s, s, 1)
    decay = diff.masked_fill(later, -torch.inf).exp()       # 0 where j > i
    scores = torch.einsum("bhgid,bhjd,bhijd->bhgij", qg, k, decay) * scale
    o = scores @ v.unsqueeze(2) + scale * (qg * cum.exp().unsqueeze(2)) @ state.unsqueeze(2)
    last = cum[:, :, -1:]                                   # G_T
    final = last.transpose(-1, -2).exp() * state + (k * (last - cum).exp()).transpose(-1, -2) @ v
    return ungroup(o), final


def gla_step(q_t, k_t, v_t, g_t, state, scale: float):
    """One token: q_t (B, Hq, D), k_t/g_t (B, Hkv, D), v_t (B, Hkv, Dv), state (B, Hkv, D, Dv):
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t (the shared engine's step)."""
    return decay_step(q_t, k_t, v_t, g_t, state, scale)
