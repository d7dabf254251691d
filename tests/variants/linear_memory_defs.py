"""Independent definitions of mega, titans, sse and rat for the tests: each paper's recurrence, one batch row,
head and token at a time, in float64, written from the papers without the library's code.

Each returns (o (B, Hq, S, Dv), final state in the library's layout) for q (B, Hq, S, D), k (B, Hkv, S, D),
v (B, Hkv, S, Dv) aligned (Sq == Sk), starting from zeros.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _unit(x):
    n = x.norm()
    return x / n if n > 0 else x


def titans_loop(q, k, v, theta, eta, alpha, mini_batch, scale=1.0):
    b, hq, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    out = torch.zeros(b, hq, s, dv, dtype=F64)
    finals = torch.zeros(b, hkv, d + 1, 3 * dv, dtype=F64)
    for bi in range(b):
        for h in range(hkv):
            M, S, A = (torch.zeros(d, dv, dtype=F64) for _ in range(3))
            for t in range(s):
                if t % mini_batch == 0:
                    A = M.clone()          # gradients of this mini-batch are taken at its first memory
                kk = _unit(k[bi, h, t])
                grad = 2 * torch.outer(kk, kk @ A - v[bi, h, t])
                S = eta[bi, h, t] * S - theta[bi, h, t] * grad
                M = (1 - alpha[bi, h, t]) * M + S
                for j in range(g):
                    out[bi, h * g + j, t] = scale * _unit(q[bi, h * g + j, t]) @ M
            finals[bi, h, :d] = torch.cat([M, S, A], 1)
            finals[bi, h, d] = s
    return out, finals


def sse_loop(q, k, v, router, top_k, g=None, key_softmax=True, scale=None):
    b, hq, s, d = q.shape
    hkv, dv, n = k.shape[1], v.shape[-1], router.shape[-1]
    grp = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, s, dv, dtype=F64)
    finals = torch.zeros(b, hkv, n * d, dv, dtype=F64)
    for bi in range(b):
        for h in range(hkv):
            states = [torch.zeros(d, dv, dtype=F64) for _ in range(n)]
            for t in range(s):
                p = torch.softmax(router[bi, h, t], 0)
                chosen = sorted(range(n), key=lambda i: -float(p[i]))[:top_k]
                key = torch.softmax(k[bi, h, t], 0) if key_softmax else k[bi, h, t]
                for i in chosen:
                    decay = torch.ones(d, dtype=F64) if g is None else g[bi, h, t].exp()
                    states[i] = decay[:, None] * states[i] + p[i] * torch.outer(key, v[bi, h, t])
                for j in range(grp):
                    out[bi, h * grp + j, t] = sum(p[i] * scale * q[bi, h * grp + j, t] @ states[i] for i in chosen)
            finals[bi, h] = torch.cat(states, 0)
    return out, finals


def rat_loop(q, k, v, fk, fv, chunk, scale=None):
    """Also returns the state as a list of rows per (batch, head) [k~, v~, count]."""
    b, hq, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    grp = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, s, dv, dtype=F64)
    rows = math.ceil(s / chunk)
    finals = torch.zeros(b, hkv, rows, d + dv + 1, dtype=F64)
    for bi in range(b):
        for h in range(hkv):
            summaries = []
            for t in range(s):
                if t % chunk == 0:
                    ck, cv = torch.zeros(d, dtype=F64), torch.zeros(dv, dtype=F64)
                ck = fk[bi, h, t] * ck + (1 - fk[bi, h, t]) * k[bi, h, t]
                cv = fv[bi, h, t] * cv + (1 - fv[bi, h, t]) * v[bi, h, t]
                keys = torch.stack([x for x, _ in summaries] + [ck])
                vals = torch.stack([y for _, y in summaries] + [cv])
                for j in range(grp):
                    out[bi, h * grp + j, t] = torch.softmax(scale * keys @ q[bi, h * grp + j, t], 0) @ vals
                finals[bi, h, t // chunk] = torch.cat([ck, cv, torch.tensor([t % chunk + 1.0], dtype=F64)])
                if t % chunk == chunk - 1:
                    summaries.append((ck, cv))
    return out, finals


def mega_loop(q, k, v, alpha, delta, beta, eta, chunk, scale=None):
    """q (B, Hq, S, D), k (B, Hkv, S, D), EMA parameters (Hkv, D, E). Each query head and each KV head has an
    EMA state h (D, E); query heads use their KV head's parameters."""
    b, hq_, s, d = q.shape
    hkv, dv, e = k.shape[1], v.shape[-1], alpha.shape[-1]
    g = hq_ // hkv
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq_, s, dv, dtype=F64)
    finals = torch.zeros(b, hkv, (g + 1) * e + chunk + 1, d + dv, dtype=F64)
    for bi in range(b):
        for h in range(hkv):
            a, dl, be, et = alpha[h], delta[h], beta[h], eta[h]
            hqs = [torch.zeros(d, e, dtype=F64) for _ in range(g)]
            hk = torch.zeros(d, e, dtype=F64)
            keys, vals = [], []
            for t in range(s):
                hk = a * be * k[bi, h, t][:, None] + (1 - a * dl) * hk
                ks = (et * hk).sum(1)
                if t % chunk == 0:
                    keys, vals = [], []
                keys.append(ks)
                vals.append(v[bi, h, t])
                for j in range(g):
                    hqs[j] = a * be * q[bi, h * g + j, t][:, None] + (1 - a * dl) * hqs[j]
                    w = torch.softmax(scale * torch.stack(keys) @ (et * hqs[j]).sum(1), 0)
                    out[bi, h * g + j, t] = w @ torch.stack(vals)
            n = s % chunk
            for j in range(g):
                finals[bi, h, j * e:(j + 1) * e, :d] = hqs[j].T
            finals[bi, h, g * e:(g + 1) * e, :d] = hk.T
            for i in range(n):
                finals[bi, h, (g + 1) * e + i] = torch.cat([keys[len(keys) - n + i], vals[len(vals) - n + i]])
            finals[bi, h, -1] = n
    return out, finals
