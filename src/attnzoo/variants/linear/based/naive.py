"""Based's linear attention, written plainly: the 2nd-order Taylor approximation of exp(q . k),

    K(q_i, k_j) = 1 + s_ij + s_ij^2 / 2,    s_ij = scale * q_i . k_j       (scale = d^-1/2: q . k / sqrt(d)),

    o_i = sum_{j <= i} K(q_i, k_j) v_j / sum_{j <= i} K(q_i, k_j)          (K > 0 always: 1 + s + s^2/2 >= 1/2),

on q/k already projected to a small feature dimension d (16 in the paper). As an RNN it is linear
attention with the feature map phi(x) = [1, x', x' ⊗ x' / sqrt(2)], x' = x * scale^(1/2)
(= x / d^(1/4), the paper's and fla's TaylorExp), of size 1 + d + d^2, since
phi(q) . phi(k) = 1 + x'_q . x'_k + (x'_q . x'_k)^2 / 2 = K(q, k). An initial state (S_0, z_0) adds
phi(q_i) S_0 and phi(q_i) z_0. `normalize=False` drops the denominator (fla's use_norm=False).

State layout: (B, Hkv, 1 + D + D^2, Dv + 1) normalised (S, then z as the last column),
(B, Hkv, 1 + D + D^2, Dv) unnormalised.
"""
from __future__ import annotations

import torch

from ....core.recurrent import group_queries, ungroup
from .._decay import decay_step, normalise, safe_divide, with_ones


def feature_dim(d: int) -> int:
    return 1 + d + d * d


def taylor_features(x: torch.Tensor, scale: float) -> torch.Tensor:
    """phi(x) = [1, x', vec(x' ⊗ x') / sqrt(2)], x' = x * sqrt(scale): (..., D) -> (..., 1 + D + D^2)."""
    x = x * scale ** 0.5
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / 2 ** 0.5
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


def based_parallel(q, k, v, scale: float, normalize: bool, state: torch.Tensor):
    """q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), state as above -> (o (B, Hq, S, Dv), final state)."""
    acc = state.dtype
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[-1]
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    qg = group_queries(q, hkv)                                      # (B, Hkv, G, S, D)
    scores = scale * (qg @ k.unsqueeze(2).transpose(-1, -2))       # s_ij
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    kern = (1 + scores + scores ** 2 / 2) * causal                 # K(q_i, k_j), j <= i
    fq, fk = taylor_features(qg, scale), taylor_features(k, scale)  # only for the initial and final states
    num = kern @ v.unsqueeze(2) + fq @ state[..., :dv].unsqueeze(2)
    final_s = state[..., :dv] + fk.transpose(-1, -2) @ v
    if not normalize:
        return ungroup(num), final_s
    den = kern.sum(-1, keepdim=True) + fq @ state[..., dv:].unsqueeze(2)
    final_z = state[..., dv:] + fk.sum(2).unsqueeze(-1)
    return ungroup(safe_divide(num, den)), torch.cat([final_s, final_z], dim=-1)


def based_step(q_t, k_t, v_t, scale: float, normalize: bool, state: torch.Tensor):
    """One token: S += phi(k_t)^T v_t, z += phi(k_t); o_t = phi(q_t) S / phi(q_t) z."""
    fq, fk = taylor_features(q_t.to(state.dtype), scale), taylor_features(k_t.to(state.dtype), scale)
    if not normalize:
        return decay_step(fq, fk, v_t, None, state, 1.0)
    o, state = decay_step(fq, fk, with_ones(v_t.to(state.dtype)), None, state, 1.0)
    return normalise(o), state
