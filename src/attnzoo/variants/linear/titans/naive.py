"""Titans' neural long-term memory with a linear memory, written plainly: the per-token recurrence.

The memory M (D x Dv per KV head) learns at test time by gradient descent with momentum and weight decay on
the associative loss of each token (the paper's eqs. 12-14, rows as vectors: M maps a key k to k M):

    l(M; x_t) = || k_t M - v_t ||^2,            grad = 2 k_t^T (k_t M - v_t),
    S_t = eta_t S_{t-1} - theta_t grad(M_anchor; x_t)     (momentum: the "surprise"),
    M_t = (1 - alpha_t) M_{t-1} + S_t                     (alpha_t: forgetting, weight decay),
    o_t = scale * q_t M_t                                 (retrieval: a forward pass, no update).

The paper trains with mini-batch gradient descent (section 3.2): the gradient of every token of a block of
`mini_batch` tokens is taken at the memory of the block's start, M_anchor = M_{t'} with
t' = t - (t mod mini_batch); mini_batch = 1 is plain online descent (M_anchor = M_{t-1}). q and k are
L2-normalised (the paper normalises queries and keys).

State layout (B, Hkv, D + 1, 3 Dv): columns [M | S | M_anchor] in the first D rows; the last row holds the
number of tokens seen (in every entry), so a sequence fed in pieces keeps its mini-batch boundaries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ....core.recurrent import group_queries, ungroup


def split_state(state: torch.Tensor, dv: int):
    """-> M, S, M_anchor (B, Hkv, D, Dv) and the tokens seen (B, Hkv)."""
    mem = state[..., :-1, :]
    return mem[..., :dv], mem[..., dv:2 * dv], mem[..., 2 * dv:], state[..., -1, 0]


def join_state(m, s, anchor, seen) -> torch.Tensor:
    row = seen[..., None, None].expand(*m.shape[:-2], 1, 3 * m.shape[-1])
    return torch.cat([torch.cat([m, s, anchor], dim=-1), row], dim=-2)


def titans_step(q_t, k_t, v_t, theta, eta, alpha, state, scale: float, mini_batch: int):
    """One token: q_t (B, Hq, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv), theta/eta/alpha (B, Hkv)
    -> (o_t (B, Hq, Dv), new state)."""
    acc = state.dtype
    m, s, anchor, seen = split_state(state, v_t.shape[-1])
    q_t, k_t, v_t = F.normalize(q_t.to(acc), dim=-1), F.normalize(k_t.to(acc), dim=-1), v_t.to(acc)
    theta, eta, alpha = (x.to(acc)[..., None, None] for x in (theta, eta, alpha))
    anchor = torch.where((seen % mini_batch == 0)[..., None, None], m, anchor)  # a new mini-batch starts here
    grad = 2 * k_t.unsqueeze(-1) * (k_t.unsqueeze(-2) @ anchor - v_t.unsqueeze(-2))
    s = eta * s - theta * grad
    m = (1 - alpha) * m + s
    o = scale * group_queries(q_t, k_t.shape[1]).unsqueeze(-2) @ m.unsqueeze(2)   # (B, Hkv, G, 1, Dv)
    return ungroup(o.squeeze(-2)), join_state(m, s, anchor, seen + 1)


def titans_recurrence(q, k, v, theta, eta, alpha, scale: float, mini_batch: int, state: torch.Tensor):
    """The definition: q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), theta/eta/alpha (B, Hkv, S),
    state as above -> (o (B, Hq, S, Dv), final state), one token after the other."""
    outs = []
    for t in range(k.shape[2]):
        o_t, state = titans_step(q[:, :, t], k[:, :, t], v[:, :, t], theta[:, :, t], eta[:, :, t], alpha[:, :, t],
                                 state, scale, mini_batch)
        outs.append(o_t)
    if not outs:
        return q.new_zeros(*q.shape[:-1], v.shape[-1]).to(state.dtype), state
    return torch.stack(outs, dim=2), state
