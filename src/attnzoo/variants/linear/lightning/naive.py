"""Lightning attention (TransNormerLLM's linear attention with decay, computed by Lightning
Attention-2; MiniMax-01's lightning attention), written plainly:

    o_t = scale * sum_{s <= t} lambda^(t - s) (q_t . k_s) v_s        (+ scale * lambda^(t+1) q_t S_0),

one decay lambda per head; TransNormerLLM's schedule as fla's lightning_attn:
lambda_h = exp(-(8 h / H) (1 - l / L)), h = 0 .. H - 1 (head 0 does not decay), l the layer index
and L the number of layers. The recurrence: S_t = lambda S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.
"""
from __future__ import annotations

import torch

from ....core.recurrent import group_queries, ungroup
from .._decay import decay_step


def lightning_decays(heads: int, layer_idx: int, num_layers: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """lambda_h = exp(-(8 / H) (1 - layer_idx / num_layers) h), h = 0 .. heads - 1 (fla's lightning_attn)."""
    slope = 8.0 / heads * (1.0 - layer_idx / num_layers)
    return torch.exp(-slope * torch.arange(heads, dtype=dtype, device=device))


def lightning_parallel(q, k, v, lambdas: torch.Tensor, scale: float, state: torch.Tensor):
    """q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), lambdas (Hkv,) in (0, 1], state (B, Hkv, D, Dv)."""
    acc = state.dtype
    hkv, s = k.shape[1], k.shape[2]
    qg = group_queries(q.to(acc), hkv)
    k, v, lam = k.to(acc), v.to(acc), lambdas.to(acc).view(1, hkv, 1, 1)
    t = torch.arange(s, device=q.device)
    gap = (t.view(s, 1) - t.view(1, s)).to(acc)                  # t - s
    m = torch.where(gap >= 0, lam ** gap.clamp(min=0), torch.zeros((), dtype=acc, device=q.device))
    o = ((qg @ k.unsqueeze(2).transpose(-1, -2)) * m.unsqueeze(2)) @ v.unsqueeze(2)
    o = o + (lam ** (t + 1).to(acc).view(1, 1, s, 1)).unsqueeze(2) * (qg @ state.unsqueeze(2))
    final = lam ** s * state + (k * lam ** (s - 1 - t).to(acc).view(1, 1, s, 1)).transpose(-1, -2) @ v
    return ungroup(scale * o), final


def lightning_step(q_t, k_t, v_t, lambdas: torch.Tensor, scale: float, state: torch.Tensor):
    """One token: S = lambda S + k_t^T v_t, o_t = scale * q_t S."""
    return decay_step(q_t, k_t, v_t, lambdas.to(state.dtype).log().view(1, -1), state, scale)
