"""Independent definitions of routing, recycled, dma, minference and seer, written plainly: one query at a
time, Python loops and lists, no code shared with attnzoo. Each returns (mask, out) as sparse_defs does; a
key chosen twice (a cluster member that is also the query, a column on a chosen diagonal) is read once."""
from __future__ import annotations

import math

import torch
from sparse_defs import _loop, exact_over_blocks, softmax_over


def _unit(x):
    return x / x.norm()


def _argmax(values):
    return max(range(len(values)), key=lambda i: values[i])


def _top(scores: dict, n):
    """The n keys of `scores` with the largest values."""
    return sorted(scores, key=lambda j: -scores[j])[:n]


# ---- routing --------------------------------------------------------------------------------------------


def routing(q, k, v, causal, params, scale, centroids=None):
    c, top_k, steps = params["clusters"], params["top_k"], params["kmeans_steps"]
    b, hq, sq, _ = q.shape
    sk, g = k.shape[2], hq // k.shape[1]
    members, nearest = {}, {}
    for bi in range(b):
        for h in range(hq):
            uq = [_unit(q[bi, h, i]) for i in range(sq)]
            uk = [_unit(k[bi, h // g, j]) for j in range(sk)]
            if centroids is not None:
                mu = [_unit(centroids[h, i]) for i in range(c)]
            else:   # spherical k-means over the unit queries and keys, from evenly spaced keys
                mu = [uk[round(i * (sk - 1) / (c - 1))] if c > 1 else uk[0] for i in range(c)]
                points = uq + uk
                for _ in range(steps):
                    groups = [[] for _ in range(c)]
                    for p in points:
                        groups[_argmax([float(p @ m) for m in mu])].append(p)
                    mu = [_unit(sum(grp)) if grp else mu[i] for i, grp in enumerate(groups)]
            members[bi, h] = [_top({j: float(uk[j] @ m) for j in range(sk)}, top_k) for m in mu]
            nearest[bi, h] = [_argmax([float(uq[i] @ m) for m in mu]) for i in range(sq)]
    return exact_over_blocks(q, k, v, causal, scale,
                             lambda bi, h, kvh, i, pos: set(members[bi, h][nearest[bi, h][i]] + [pos]))


# ---- recycled -------------------------------------------------------------------------------------------


def recycled(q, k, v, causal, params, scale, anchor_keys=None):
    assert causal
    top_k, stride = params["top_k"], params["stride"]
    hq, sq = q.shape[1], q.shape[2]
    sk, g = k.shape[2], hq // k.shape[1]

    def choose(bi, h, kvh, i, pos):
        if pos % stride == 0:
            return list(range(pos + 1))
        a = pos - pos % stride
        ia = a - (sk - sq)
        if ia < 0:
            kept = [j for j in anchor_keys[bi, kvh].tolist() if j >= 0]
        else:
            votes = {j: 0.0 for j in range(a + 1)}
            for h2 in range(kvh * g, (kvh + 1) * g):
                w = torch.softmax(scale * (k[bi, kvh, : a + 1] @ q[bi, h2, ia]), 0)
                for j, p in enumerate(w.tolist()):
                    votes[j] += p
            kept = _top(votes, top_k)
        return set(kept + list(range(a + 1, pos + 1)))

    return exact_over_blocks(q, k, v, causal, scale, choose)


# ---- dma ------------------------------------------------------------------------------------------------


def dma(q, k, v, causal, params, scale, dt):
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    mask = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)
    for bi, h, kvh, i, pos in _loop(q, k):
        seen = range(pos + 1) if causal else range(sk)
        keys = sorted(_top({j: float(dt[bi, kvh, j]) for j in seen}, params["top_k"]))
        mask[bi, h, i, keys] = True
        w = torch.softmax(scale * (k[bi, kvh, keys] @ q[bi, h, i]) + dt[bi, kvh, keys], 0)
        out[bi, h, i] = w @ v[bi, kvh, keys]
    return mask, out


# ---- minference -----------------------------------------------------------------------------------------


def minference(q, k, v, causal, params, scale):
    assert causal
    budget, block, last_q = params["budget"], params["block_size"], params["last_q"]
    hq, sq = q.shape[1], q.shape[2]
    sk, g = k.shape[2], hq // k.shape[1]
    spec = params["heads"]
    specs = [tuple(spec)] * hq if isinstance(spec[0], str) else [tuple(s) for s in spec]
    chosen = {}

    def parts(share):
        second = max(1, budget - round(share * budget))
        return budget - second, second

    def vertical_slash(bi, h, vertical, slash):
        columns, diagonals = [0.0] * sk, [0.0] * sk
        for i in range(sq - min(last_q, sq), sq):
            pos = i + sk - sq
            w = torch.softmax(scale * (k[bi, h // g, : pos + 1] @ q[bi, h, i]), 0).tolist()
            for j, p in enumerate(w):
                columns[j] += p
                diagonals[pos - j] += p
        columns[0] = diagonals[0] = math.inf
        cols = _top(dict(enumerate(columns)), vertical)
        offs = _top(dict(enumerate(diagonals)), slash)
        return lambda pos: set(cols + [pos - o for o in offs if pos - o >= 0])

    def block_sparse(bi, h):
        n = math.ceil(sk / block)
        k_mean = [k[bi, h // g, c * block:(c + 1) * block].mean(0) for c in range(n)]
        rows = {}
        for i in range(sq):
            rows.setdefault((i + sk - sq) // block, []).append(i)
        picks = {}
        for own, members in rows.items():
            qm = q[bi, h, members].mean(0)
            others = {c: float(qm @ k_mean[c]) for c in range(n) if c != own and c <= own}
            picks[own] = [own] + _top(others, max(1, budget // block) - 1)
        return lambda pos: [t for c in picks[pos // block] for t in range(c * block, min((c + 1) * block, sk))]

    for bi in range(q.shape[0]):
        for h in range(hq):
            pattern, share = specs[h]
            first, second = parts(share)
            if pattern == "a_shape":
                chosen[bi, h] = (lambda s1, s2: lambda pos: sorted(set(range(min(s1, sk))) | set(
                    range(max(0, pos - s2 + 1), pos + 1))))(first, second)
            elif pattern == "vertical_slash":
                chosen[bi, h] = vertical_slash(bi, h, first, second)
            else:
                chosen[bi, h] = block_sparse(bi, h)
    return exact_over_blocks(q, k, v, causal, scale, lambda bi, h, kvh, i, pos: chosen[bi, h](pos))


# ---- seer -----------------------------------------------------------------------------------------------


def seer(q, k, v, causal, params, scale, gate_q=None, gate_k=None):
    block, top_k = params["block_size"], params["top_k"]
    hq, sq = q.shape[1], q.shape[2]
    sk, g = k.shape[2], hq // k.shape[1]
    n = math.ceil(sk / block)
    picks = {}
    for bi in range(q.shape[0]):
        for h in range(hq):
            pooled = []
            for c in range(n):
                keys = k[bi, h // g, c * block:(c + 1) * block]
                pooled.append((keys.amax(0), keys.amin(0), keys.mean(0)))
            rows = {}
            for i in range(sq):
                rows.setdefault((i + sk - sq) // block, []).append(i)
            for own, members in rows.items():
                qm = q[bi, h, members].mean(0)
                if gate_q is None:
                    qg, kgs = qm, [p[2] for p in pooled]
                else:
                    qg = qm @ gate_q[h]
                    kgs = [sum(p[s] @ gate_k[h, s] for s in range(3)) for p in pooled]
                others = {c: float(qg @ kgs[c]) for c in range(n) if c != own and (not causal or c < own)}
                picks[bi, h, own] = [own] + _top(others, top_k - 1)
    return exact_over_blocks(q, k, v, causal, scale, lambda bi, h, kvh, i, pos: [
        t for c in picks[bi, h, pos // block] for t in range(c * block, min((c + 1) * block, sk))])
