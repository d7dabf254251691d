"""Mega's attention core, written plainly: a multi-dimensional damped EMA on the queries and keys, then
single-head softmax attention inside chunks of C tokens (Mega-chunk, the paper's linear-time variant).

The EMA (the paper's eqs. 2-3) expands every channel x[d] into E dimensions with beta, damps each with
alpha and delta, and projects back with eta (all (Hkv, D, E); alpha, delta in [0, 1]):

    h_t[d, e] = alpha[d, e] beta[d, e] x_t[d] + (1 - alpha[d, e] delta[d, e]) h_{t-1}[d, e],
    y_t[d]    = sum_e eta[d, e] h_t[d, e],

i.e. the causal convolution y_t[d] = sum_{j<=t} K[d, t-j] x_j[d] with K[d, n] = sum_e eta alpha beta phi^n,
phi = 1 - alpha delta (plus phi^(t+1) h_init from a carried state). Mega applies it to the layer input
before the shared Q/K projection; as a functional variant it smooths the given q and k (the same EMA for
both; with GQA every query head of a group has its own EMA state, with its KV head's parameters), and the
attention is

    o_t = sum_{j in t's chunk, j <= t} softmax_j(scale * q~_t . k~_j) v_j.

State layout (B, Hkv, (G + 1) E + C + 1, D + Dv) with G = Hq / Hkv: rows g E .. (g + 1) E - 1 the EMA of
query head g of the group (h^T, first D columns), then E rows for the k EMA, then the C keys k~ and values of
the chunk in progress, then a row holding its token count (0 <= n < C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ....core.recurrent import group_queries, ungroup


def split_state(state: torch.Tensor, e: int, chunk: int, d: int):
    """-> q EMAs (B, Hkv, G, E, D), k EMA (B, Hkv, E, D), buffered keys (B, Hkv, C, D), values (B, Hkv, C, Dv),
    count (B, Hkv)."""
    g = (state.shape[2] - chunk - 1) // e - 1
    buf = state[..., (g + 1) * e:(g + 1) * e + chunk, :]
    hq = state[..., :g * e, :d].unflatten(2, (g, e))
    return hq, state[..., g * e:(g + 1) * e, :d], buf[..., :d], buf[..., d:], state[..., -1, 0]


def join_state(hq, hk, keys, values, count) -> torch.Tensor:
    d, dv = keys.shape[-1], values.shape[-1]
    ema = F.pad(torch.cat([hq.flatten(2, 3), hk], dim=-2), (0, dv))
    row = count[..., None, None].expand(*count.shape, 1, d + dv)
    return torch.cat([ema, torch.cat([keys, values], -1), row.to(keys.dtype)], dim=-2)


def ema_parallel(x, alpha, delta, beta, eta, h0):
    """x (B, Hkv, S, D), EMA parameters (Hkv, D, E), h0 (B, Hkv, E, D) -> (y (B, Hkv, S, D), final h (B, Hkv, E, D)),
    by the convolution with the kernel phi^(t-j) (S x S per channel: the definition, not the fast path)."""
    s = x.shape[2]
    if s == 0:
        return x, h0
    phi = 1 - alpha * delta                                                   # (Hkv, D, E)
    t = torch.arange(s, device=x.device)
    lag = t.view(-1, 1) - t.view(1, -1)
    power = phi[..., None, None].pow(lag.clamp_min(0)) * (lag >= 0)           # (Hkv, D, E, S, S): phi^(t-j)
    kernel = torch.einsum("hde,hdetj->hdtj", eta * alpha * beta, power)
    y = torch.einsum("hdtj,bhjd->bhtd", kernel, x)
    carry = phi[..., None].pow(t + 1)                                          # (Hkv, D, E, S): phi^(t+1)
    y = y + torch.einsum("hde,hdet,bhed->bhtd", eta, carry, h0)
    last = (alpha * beta)[..., None] * power[..., -1, :]                       # (Hkv, D, E, S): weights of x_j in h_{S-1}
    h = torch.einsum("hdej,bhjd->bhed", last, x) + carry[..., -1].transpose(-1, -2) * h0
    return y, h


def ema_queries(q, ema: tuple, hq):
    """The EMA of every query head: q (B, Hq, S, D), hq (B, Hkv, G, E, D) -> (smoothed (B, Hkv, G, S, D), new hq);
    the G heads of a group share their KV head's parameters."""
    b, hkv, g = hq.shape[:3]
    qg = group_queries(q, hkv).transpose(1, 2).flatten(0, 1)                 # (B G, Hkv, S, D)
    y, h = ema_parallel(qg, *ema, hq.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, g)).transpose(1, 2), h.unflatten(0, (b, g)).transpose(1, 2)


def chunk_attention(qg, k, v, keys, values, offset: int, chunk: int, scale: float):
    """qg (B, Hkv, G, S, D) and k (B, Hkv, S, D) already smoothed, v (B, Hkv, S, Dv), buffered keys/values
    (B, Hkv, C, .) of which the first `offset` are the chunk in progress -> o (B, Hq, S, Dv), by the
    S x (offset + S) masked softmax."""
    s = k.shape[2]
    ks = torch.cat([keys[:, :, :offset], k], 2)
    vs = torch.cat([values[:, :, :offset], v], 2)
    pos_q = torch.arange(s, device=k.device) + offset
    pos_k = torch.arange(offset + s, device=k.device)
    allowed = (pos_q.view(-1, 1) // chunk == pos_k.view(1, -1) // chunk) & (pos_k.view(1, -1) <= pos_q.view(-1, 1))
    scores = scale * (qg @ ks.unsqueeze(2).transpose(-1, -2))
    return ungroup(torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1) @ vs.unsqueeze(2))


def tail_buffer(k, v, offset: int, chunk: int, keys, values):
    """The buffer after the tokens k/v (B, Hkv, S, .) that continue `offset` buffered ones: the keys and values of
    the chunk left in progress, zero-padded to C rows, and its token count (B, Hkv)."""
    n = (offset + k.shape[2]) % chunk
    ks = torch.cat([keys[:, :, :offset], k], 2)
    vs = torch.cat([values[:, :, :offset], v], 2)
    ks, vs = ks[:, :, ks.shape[2] - n:], vs[:, :, vs.shape[2] - n:]
    pad = (0, 0, 0, chunk - n)
    return F.pad(ks, pad), F.pad(vs, pad), k.new_full(k.shape[:2], float(n))


def mega_parallel(q, k, v, ema: tuple, scale: float, chunk: int, state: torch.Tensor, offset: int):
    """q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), ema = (alpha, delta, beta, eta) (Hkv, D, E), state as
    above whose chunk in progress holds `offset` tokens -> (o (B, Hq, S, Dv), final state)."""
    acc = state.dtype
    e, d = ema[0].shape[-1], k.shape[-1]
    ema = tuple(x.to(acc) for x in ema)
    hq, hk, keys, values, _ = split_state(state, e, chunk, d)
    qs, hq = ema_queries(q.to(acc), ema, hq)
    ks, hk = ema_parallel(k.to(acc), *ema, hk)
    v = v.to(acc)
    o = chunk_attention(qs, ks, v, keys, values, offset, chunk, scale)
    return o, join_state(hq, hk, *tail_buffer(ks, v, offset, chunk, keys, values))


def mega_step(q_t, k_t, v_t, ema: tuple, state: torch.Tensor, scale: float, chunk: int):
    """One token: q_t (B, Hq, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv): the EMA step on q and k, the key and value
    appended to the chunk in progress, softmax over it; the buffer empties when the chunk is full."""
    acc = state.dtype
    e, d = ema[0].shape[-1], k_t.shape[-1]
    alpha, delta, beta, eta = (x.to(acc).transpose(-1, -2) for x in ema)     # (Hkv, E, D)
    hq, hk, keys, values, count = split_state(state, e, chunk, d)
    qg = group_queries(q_t.to(acc), k_t.shape[1]).unsqueeze(-2)              # (B, Hkv, G, 1, D)
    hq = (alpha * beta).unsqueeze(1) * qg + (1 - alpha * delta).unsqueeze(1) * hq
    hk = alpha * beta * k_t.to(acc).unsqueeze(-2) + (1 - alpha * delta) * hk
    qs, ks = (eta.unsqueeze(1) * hq).sum(-2), (eta * hk).sum(-2)             # (B, Hkv, G, D), (B, Hkv, D)
    slot = F.one_hot(count.long(), chunk).to(torch.bool).unsqueeze(-1)        # (B, Hkv, C, 1): where this token goes
    keys = torch.where(slot, ks.unsqueeze(-2), keys)
    values = torch.where(slot, v_t.to(acc).unsqueeze(-2), values)
    seen = torch.arange(chunk, device=k_t.device) <= count.unsqueeze(-1)       # (B, Hkv, C)
    scores = scale * (qs @ keys.transpose(-1, -2))                            # (B, Hkv, G, C)
    o = torch.softmax(scores.masked_fill(~seen.unsqueeze(2), -torch.inf), dim=-1) @ values
    count = count + 1
    full = (count == chunk)[..., None, None]
    keys, values = keys.masked_fill(full, 0), values.masked_fill(full, 0)
    return ungroup(o), join_state(hq, hk, keys, values, count % chunk)
