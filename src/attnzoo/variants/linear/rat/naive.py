"""RAT, written plainly: a linear recurrence inside chunks of L tokens, softmax attention across chunks.

Inside each chunk the keys and values are smoothed by a gated recurrence that restarts at every chunk
(forget gates f in [0, 1], per channel; RAT's pscan):

    k~_t = f^k_t * k~_{t-1} + (1 - f^k_t) * k_t,     v~_t = f^v_t * v~_{t-1} + (1 - f^v_t) * v_t,

i.e. k~_t = sum_{j <= t in t's chunk} (1 - f_j) prod_{j < u <= t} f_u k_j. A query attends with softmax to the
last k~ / v~ of every earlier chunk (the chunk summaries) and to its own position's k~_t / v~_t:

    o_t = sum_{s in {ends of chunks before t's} + {t}} softmax_s(scale * q_t . k~_s) v~_s.

State: one row per chunk seen, (B, Hkv, R, D + Dv + 1) = [k~ | v~ | tokens the chunk holds]; rows holding L
tokens are summaries, at most one row holds 0 < n < L (the chunk in progress, continued by the next token),
rows holding 0 are padding (packed sequences of different lengths). The state grows by one row every L
tokens: decoding reads S / L summaries per token (RAT's L-fold saving), not O(1).
"""
from __future__ import annotations

import torch

from ....core.recurrent import group_queries, ungroup


def rows_of(state: torch.Tensor, d: int, dv: int):
    """-> summaries' keys (B, Hkv, R, D), values (B, Hkv, R, Dv), token counts (B, Hkv, R)."""
    return state[..., :d], state[..., d:d + dv], state[..., -1]


def partial_row(state: torch.Tensor, d: int, dv: int, chunk: int):
    """The chunk in progress: its k~ (B, Hkv, D), v~ (B, Hkv, Dv) (zeros where none) and a row mask (B, Hkv, R)."""
    k_rows, v_rows, count = rows_of(state, d, dv)
    mask = (count > 0) & (count < chunk)
    return (mask.unsqueeze(-1) * k_rows).sum(2), (mask.unsqueeze(-1) * v_rows).sum(2), mask


def final_state(state, k_t, v_t, offset: int, chunk: int):
    """The state after the tokens whose smoothed keys / values are k_t (B, Hkv, S, D) / v_t (B, Hkv, S, Dv), the
    first of which sits `offset` tokens into its chunk: the chunk in progress updated in place, new rows after."""
    b, hkv, s, d = k_t.shape
    dv = v_t.shape[-1]
    ends = [t for t in range(s) if (t + offset) % chunk == chunk - 1 or t == s - 1]
    rows = [torch.cat([k_t[:, :, t], v_t[:, :, t], k_t.new_full((b, hkv, 1), float((t + offset) % chunk + 1))], -1)
            for t in ends]
    state = state.to(k_t.dtype)
    if offset and rows:                                   # the first end finishes (or continues) the chunk in progress
        mask = partial_row(state, d, dv, chunk)[2].unsqueeze(-1)
        state = torch.where(mask, rows.pop(0).unsqueeze(2), state)
    return torch.cat([state, *(r.unsqueeze(2) for r in rows)], dim=2)


def rat_parallel(q, k, v, fk, fv, scale: float, chunk: int, state: torch.Tensor, offset: int):
    """q (B, Hq, S, D), k/fk (B, Hkv, S, D), v/fv (B, Hkv, S, Dv), state as above whose chunk in progress holds
    `offset` tokens (0: none) -> (o (B, Hq, S, Dv), final state)."""
    acc = state.dtype
    hkv, s, d = k.shape[1:]
    dv = v.shape[-1]
    pos = torch.arange(s, device=q.device) + offset
    cid = pos // chunk                                     # chunk 0 continues the state's chunk in progress
    same = (cid.unsqueeze(1) == cid.unsqueeze(0)) & (pos.unsqueeze(1) >= pos.unsqueeze(0))   # (t, j)
    k_prev, v_prev, _ = partial_row(state, d, dv, chunk)

    def smooth(x, f, x_prev):
        x, f = x.to(acc), f.to(acc)
        cum = f.clamp_min(torch.finfo(acc).tiny).log().cumsum(2)                     # log prod_{u<=t} f_u
        carry = (cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(~same.view(1, 1, s, s, 1), -torch.inf).exp()
        first = (cid == 0).view(1, 1, s, 1) * cum.exp() * x_prev.unsqueeze(2)       # the state's chunk, carried on
        return torch.einsum("bhtjd,bhjd->bhtd", carry, (1 - f) * x) + first

    k_s, v_s = smooth(k, fk, k_prev), smooth(v, fv, v_prev)
    k_rows, v_rows, count = rows_of(state, d, dv)
    qg = group_queries(q.to(acc), hkv)                                                 # (B, Hkv, G, S, D)
    end = (pos % chunk == chunk - 1)
    sees = (end.unsqueeze(0) & (cid.unsqueeze(0) < cid.unsqueeze(1))) | torch.eye(s, dtype=torch.bool,
                                                                                   device=q.device)  # (t, j)
    new = (qg @ k_s.unsqueeze(2).transpose(-1, -2)).masked_fill(~sees, -torch.inf)
    old = (qg @ k_rows.unsqueeze(2).transpose(-1, -2)).masked_fill(~(count == chunk)[:, :, None, None], -torch.inf)
    p = torch.softmax(scale * torch.cat([old, new], dim=-1), dim=-1)
    o = p[..., :old.shape[-1]] @ v_rows.unsqueeze(2) + p[..., old.shape[-1]:] @ v_s.unsqueeze(2)
    return ungroup(o), final_state(state, k_s, v_s, offset, chunk)


def rat_step(q_t, k_t, v_t, fk, fv, state, scale: float, chunk: int):
    """One token: continue the chunk in progress (or open a row), attend to the summaries and the own row."""
    acc = state.dtype
    d, dv = k_t.shape[-1], v_t.shape[-1]
    count = state[..., -1]
    if not bool((((count > 0) & (count < chunk)) | (count == 0)).any(-1).all()):
        state = torch.cat([state, state.new_zeros(*state.shape[:2], 1, state.shape[-1])], dim=2)   # a new row
        count = state[..., -1]
    k_prev, v_prev, partial = partial_row(state, d, dv, chunk)
    has = partial.any(-1, keepdim=True)
    free = (count == 0) & ~has & ((count == 0).cumsum(-1) == 1)                 # the first free row
    row = partial | free                                                        # (B, Hkv, R): the row of this token
    k_new = fk.to(acc) * k_prev + (1 - fk.to(acc)) * k_t.to(acc)
    v_new = fv.to(acc) * v_prev + (1 - fv.to(acc)) * v_t.to(acc)
    n_new = (row * count).sum(-1, keepdim=True) + 1
    state = torch.where(row.unsqueeze(-1), torch.cat([k_new, v_new, n_new], -1).unsqueeze(2), state)
    k_rows, v_rows, count = state[..., :d], state[..., d:d + dv], state[..., -1]
    qg = group_queries(q_t.to(acc), k_t.shape[1])                               # (B, Hkv, G, D)
    scores = (qg @ k_rows.transpose(-1, -2)).masked_fill(~((count == chunk) | row).unsqueeze(2), -torch.inf)
    o = torch.softmax(scale * scores, dim=-1) @ v_rows
    return ungroup(o), state
