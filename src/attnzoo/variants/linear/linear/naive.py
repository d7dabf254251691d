"""Linear attention (Katharopoulos et al., 2020), written plainly.

With a feature map phi (elu(x) + 1, relu or the identity) the causal output is the paper's eq. (5),
normalised by the sum of the kernel values,

    o_i = phi(q_i) (S_0 + sum_{j <= i} phi(k_j)^T v_j)  /  phi(q_i) (z_0 + sum_{j <= i} phi(k_j)^T),

i.e. the RNN with state (S_t, z_t): S_t = S_{t-1} + phi(k_t)^T v_t, z_t = z_{t-1} + phi(k_t).
`scale` multiplies phi(q) as in fla (it cancels when normalised). Rows whose denominator is 0 give
zeros. Unnormalised (fla's `normalize=False`): o_i = scale * phi(q_i) S_i.

State layout: (B, Hkv, D, Dv + 1) normalised (S in the first Dv columns, z the last), (B, Hkv, D, Dv)
unnormalised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ....core.recurrent import group_queries, ungroup
from .._decay import decay_step, normalise, safe_divide, with_ones

FEATURE_MAPS = {
    "elu1": lambda x: F.elu(x) + 1,      # the paper's choice, positive
    "relu": F.relu,
    "identity": lambda x: x,
}


def linear_parallel(q, k, v, feature_map: str, normalize: bool, scale: float, state: torch.Tensor):
    """q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), state as above -> (o (B, Hq, S, Dv), final state)."""
    acc = state.dtype
    phi = FEATURE_MAPS[feature_map]
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[-1]
    fq = group_queries(phi(q.to(acc)), hkv)                       # (B, Hkv, G, S, D)
    fk, v = phi(k.to(acc)), v.to(acc)
    s0 = state[..., :dv]
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    a = scale * (fq @ fk.unsqueeze(2).transpose(-1, -2)) * causal   # (B, Hkv, G, i, j): phi(q_i) . phi(k_j)
    num = a @ v.unsqueeze(2) + scale * fq @ s0.unsqueeze(2)
    final_s = s0 + fk.transpose(-1, -2) @ v
    if not normalize:
        return ungroup(num), final_s
    z0 = state[..., dv:]                                             # (B, Hkv, D, 1)
    den = a.sum(-1, keepdim=True) + scale * fq @ z0.unsqueeze(2)
    final_z = z0 + fk.sum(2).unsqueeze(-1)
    return ungroup(safe_divide(num, den)), torch.cat([final_s, final_z], dim=-1)


def linear_step(q_t, k_t, v_t, feature_map: str, normalize: bool, scale: float, state: torch.Tensor):
    """One token: S += phi(k_t)^T v_t, z += phi(k_t); o_t = phi(q_t) S / phi(q_t) z (or scale * phi(q_t) S)."""
    phi = FEATURE_MAPS[feature_map]
    fq, fk = phi(q_t.to(state.dtype)), phi(k_t.to(state.dtype))
    if not normalize:
        return decay_step(fq, fk, v_t, None, state, scale)
    o, state = decay_step(fq, fk, with_ones(v_t.to(state.dtype)), None, state, scale)
    return normalise(o), state
