"""Retention (RetNet), written plainly: the parallel form with the causal decay matrix D,

    Retention(X) = (Q K^T ⊙ D) V,    D_nm = gamma^(n - m) for n >= m, 0 otherwise,

with one scalar decay gamma per head (RetNet: gamma_h = 1 - 2^(-5 - h)) and `scale` on the scores;
equivalently the recurrence S_n = gamma S_{n-1} + k_n^T v_n, o_n = scale * q_n S_n. With an initial
state S_0 the output gains scale * gamma^(n+1) q_n S_0 (n from 0).

Only the retention operator: RetNet's normalisations of the layer (D's rows scaled by
1/sqrt(sum_m D_nm), the scores divided by max(|sum_m (QK^T ⊙ D)_nm|, 1), GroupNorm over the heads'
outputs) and its xPos rotation, swish gate and output projection are not part of it, as in fla's
retention op.
"""
from __future__ import annotations

import torch

from ....core.recurrent import group_queries, ungroup
from .._decay import decay_step


def retnet_decays(heads: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """RetNet's schedule over the heads: gamma_h = 1 - 2^(-5 - h), h = 0 .. heads - 1."""
    return 1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=dtype, device=device))


def retention_parallel(q, k, v, gammas: torch.Tensor, scale: float, state: torch.Tensor):
    """q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), gammas (Hkv,) in (0, 1], state (B, Hkv, D, Dv)."""
    acc = state.dtype
    hkv, s = k.shape[1], k.shape[2]
    qg = group_queries(q.to(acc), hkv)                            # (B, Hkv, G, S, D)
    k, v, gammas = k.to(acc), v.to(acc), gammas.to(acc).view(1, hkv, 1, 1)
    n = torch.arange(s, device=q.device)
    dist = n.view(s, 1) - n.view(1, s)                            # n - m
    d = torch.where(dist >= 0, gammas ** dist.clamp(min=0).to(acc), torch.zeros((), dtype=acc, device=q.device))
    o = ((qg @ k.unsqueeze(2).transpose(-1, -2)) * d.unsqueeze(2)) @ v.unsqueeze(2)
    o = o + (gammas ** (n + 1).to(acc).view(1, 1, s, 1)).unsqueeze(2) * (qg @ state.unsqueeze(2))
    final = gammas ** s * state + (k * gammas ** (s - 1 - n).to(acc).view(1, 1, s, 1)).transpose(-1, -2) @ v
    return ungroup(scale * o), final


def retention_step(q_t, k_t, v_t, gammas: torch.Tensor, scale: float, state: torch.Tensor):
    """One token: S = gamma S + k_t^T v_t, o_t = scale * q_t S."""
    return decay_step(q_t, k_t, v_t, gammas.to(state.dtype).log().view(1, -1), state, scale)
