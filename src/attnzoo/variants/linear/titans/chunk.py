"""Titans' memory over mini-batches: the paper's parallelised mini-batch gradient descent (section 3.2).

Inside a block of n tokens every gradient is taken at the block's anchor memory M_0, so with
e_j = 2 theta_j (k_j M_0 - v_j) (n x Dv) the gradients are k_j^T e_j and the momentum and memory are linear
recurrences with scalar factors:

    S_t = P_t S_0 - sum_{j<=t} W_tj k_j^T e_j,        P_t = prod_{u<=t} eta_u,  W_tj = prod_{j<u<=t} eta_u,
    M_t = B_t M_prev + sum_{i<=t} (B_t / B_i) S_i,     B_t = prod_{u<=t} (1 - alpha_u),

hence, with c = (B_t / B_i)_{ti} @ W and a_t = sum_{i<=t} (B_t / B_i) P_i (n x n and n tiles),

    o_t = scale * (B_t q_t M_prev + a_t q_t S_0 - sum_{j<=t} c_tj (q_t . k_j) e_j).

No per-token D x Dv matrix is formed: work O(n^2 D + n D Dv) per block, O(S (n D + D Dv)) in all. The
products are exponentials of differences of cumulative log factors, <= 0: nothing overflows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ....core.recurrent import group_queries, ungroup
from .._offsets import log_products, pieces, ratio_matrix
from .naive import join_state, split_state


def titans_chunk(q, k, v, theta, eta, alpha, scale: float, mini_batch: int, state: torch.Tensor, offset: int):
    """Same arguments and results as `naive.titans_recurrence`, for batch rows that have all seen `offset`
    tokens of their current mini-batch."""
    acc = state.dtype
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[-1]
    qg = group_queries(F.normalize(q.to(acc), dim=-1), hkv)         # (B, Hkv, G, S, D)
    k, v = F.normalize(k.to(acc), dim=-1), v.to(acc)
    theta, eta, alpha = theta.to(acc), eta.to(acc), alpha.to(acc)
    m, mom, anchor, seen = split_state(state, dv)
    outs = []
    for a, b in pieces(s, offset, mini_batch):
        if a > 0 or offset == 0:
            anchor = m                                               # this block starts a mini-batch
        kc, qc = k[:, :, a:b], qg[:, :, :, a:b]
        e = 2 * theta[:, :, a:b, None] * (kc @ anchor - v[:, :, a:b])   # (B, Hkv, n, Dv)
        log_eta, log_keep = log_products(eta[:, :, a:b]), log_products(1 - alpha[:, :, a:b])
        w, keep = ratio_matrix(log_eta), ratio_matrix(log_keep)     # W_tj, B_t / B_i
        c = keep @ w
        a_t = keep @ log_eta.exp().unsqueeze(-1)                   # (B, Hkv, n, 1)
        b_t = log_keep.exp().unsqueeze(-1)
        scores = (qc @ kc.unsqueeze(2).transpose(-1, -2)) * c.unsqueeze(2)
        o = (b_t.unsqueeze(2) * (qc @ m.unsqueeze(2)) + a_t.unsqueeze(2) * (qc @ mom.unsqueeze(2))
             - scores @ e.unsqueeze(2))
        outs.append(scale * o)
        m = b_t[:, :, -1:] * m + a_t[:, :, -1:] * mom - kc.transpose(-1, -2) @ (c[:, :, -1:].transpose(-1, -2) * e)
        mom = log_eta[:, :, -1:, None].exp() * mom - kc.transpose(-1, -2) @ (w[:, :, -1:].transpose(-1, -2) * e)
    if not outs:
        return ungroup(qg.new_zeros(*qg.shape[:-1], dv)), state
    return ungroup(torch.cat(outs, dim=3)), join_state(m, mom, anchor, seen + s)
