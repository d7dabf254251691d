"""Cottention (cosine attention), written plainly.

Queries and keys are L2-normalised (N(x) = x / ||x||, and 0 for a zero vector), so the scores are
cosine similarities; no softmax, no normaliser. To keep the output from growing with the number of
tokens summed, the paper divides by the sequence length raised to a learned power sigma(m) per
head; causally, as the authors' GPT implementation does (values scaled before the causal product,
also in its token-by-token inference), the value at position j (1-based) is divided by j^sigma(m):

    o_i = scale * ( N(q_i) S_0  +  sum_{j <= i} cos(q_i, k_j) v_j / (n_0 + j)^p ),    p = sigmoid(m),

with n_0 the tokens seen before this pass. Without a causal mask every value is divided by s^p: the
output over the length, the paper's bidirectional form. The RNN: S_t = S_{t-1} + N(k_t)^T v_t / t^p,
o_t = scale * N(q_t) S_t. `scale` defaults to 1 here (the paper has no temperature).

State layout (B, Hkv, D + 1, Dv): rows :D hold S, row D holds the number of tokens seen (the same in
every column), so pieces carried through the state scale each value by its absolute position.
"""
from __future__ import annotations

import torch

from ....core.recurrent import group_queries, ungroup
from .._decay import decay_step


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dimension; a zero vector stays zero (its cosine with anything is 0)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)


def split_state(state: torch.Tensor, name: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """(S (B, Hkv, D, Dv), tokens seen (B, Hkv, 1, 1)); ValueError if the count row is not one finite value >= 0."""
    count = state[:, :, -1:, :]
    if not torch.isfinite(count).all() or bool((count < 0).any()) or bool((count != count[..., :1]).any()):
        raise ValueError(f"{name}: the state's last row (B, Hkv, D + 1, Dv)[:, :, D] holds the number of tokens "
                         "seen, one finite value >= 0 repeated over Dv; got another row (zeros = a fresh state)")
    return state[:, :, :-1], count[..., :1]


def join_state(s: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, count.expand(-1, -1, 1, s.shape[-1]).to(s.dtype)], dim=2)


def position_scaled_values(v, count, powers, acc):
    """v_j / (n_0 + j)^p, j = 1..S; powers (Hkv,) = sigmoid(m)."""
    s = v.shape[2]
    pos = count + torch.arange(1, s + 1, dtype=acc, device=v.device).view(1, 1, s, 1)   # (B, Hkv, S, 1)
    return v.to(acc) / pos ** powers.to(acc).view(1, -1, 1, 1)


def cosine_parallel(q, k, v, powers: torch.Tensor, scale: float, state: torch.Tensor):
    """q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), powers (Hkv,), state (B, Hkv, D + 1, Dv)
    -> (o (B, Hq, S, Dv), final state)."""
    acc = state.dtype
    hkv, s = k.shape[1], k.shape[2]
    s0, n0 = split_state(state)
    qn = group_queries(l2_normalise(q.to(acc)), hkv)               # (B, Hkv, G, S, D)
    kn = l2_normalise(k.to(acc))
    vs = position_scaled_values(v, n0, powers, acc)
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    cos = (qn @ kn.unsqueeze(2).transpose(-1, -2)) * causal         # (B, Hkv, G, i, j): cos(q_i, k_j), j <= i
    o = scale * (cos @ vs.unsqueeze(2) + qn @ s0.unsqueeze(2))
    return ungroup(o), join_state(s0 + kn.transpose(-1, -2) @ vs, n0 + s)


def cosine_step(q_t, k_t, v_t, powers: torch.Tensor, scale: float, state: torch.Tensor):
    """One token: S += N(k_t)^T v_t / t^p (t = tokens seen, this one included), o_t = scale * N(q_t) S."""
    acc = state.dtype
    s0, n0 = split_state(state)
    t = n0 + 1                                                      # (B, Hkv, 1, 1)
    vs = v_t.to(acc) / t[..., 0] ** powers.to(acc).view(1, -1, 1)
    o, s1 = decay_step(l2_normalise(q_t.to(acc)), l2_normalise(k_t.to(acc)), vs, None, s0, scale)
    return o, join_state(s1, t)
