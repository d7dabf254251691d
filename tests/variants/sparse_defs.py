"""Independent definitions of the content-sparse and approximate variants, written plainly: one query at a
time, Python loops and lists, no code shared with attnzoo. Each returns (mask, out): the keys the query
reads (bool (B, Hq, Sq, Sk), causality included) and the output (B, Hq, Sq, Dv) in float64."""
from __future__ import annotations

import math

import torch


def softmax_over(qi, keys, values, scale):
    """softmax(scale q.k) v over the given key rows; zeros when there are none."""
    if len(keys) == 0:
        return torch.zeros(values.shape[-1], dtype=torch.float64)
    w = torch.softmax(scale * (keys @ qi), 0)
    return w @ values


def _loop(q, k):
    b, hq, sq, _ = q.shape
    sk, g = k.shape[2], hq // k.shape[1]
    for bi in range(b):
        for h in range(hq):
            for i in range(sq):
                yield bi, h, h // g, i, i + sk - sq


# ---- nsa ----------------------------------------------------------------------------------------------


def nsa(q, k, v, causal, params, gates, scale):
    assert causal
    bs, top_k, window = params["block_size"], params["top_k"], params["window"]
    b, hq, sq, _ = q.shape
    sk, g = k.shape[2], hq // k.shape[1]
    n = math.ceil(sk / bs)
    mask = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)

    def compressed(bi, h, pos):
        kv = h // g
        seen = [c for c in range(n) if (c + 1) * bs - 1 <= pos]
        kc = torch.stack([k[bi, kv, c * bs:(c + 1) * bs].mean(0) for c in range(n)])
        vc = torch.stack([v[bi, kv, c * bs:(c + 1) * bs].mean(0) for c in range(n)])
        probs = [0.0] * n
        if seen:
            w = torch.softmax(scale * (kc[seen] @ q[bi, h, pos - (sk - sq)]), 0)
            for c, p in zip(seen, w.tolist()):
                probs[c] = p
        return probs, softmax_over(q[bi, h, pos - (sk - sq)], kc[seen], vc[seen], scale)

    for bi, h, kvh, i, pos in _loop(q, k):
        _, o_cmp = compressed(bi, h, pos)
        # the group's vote: the compressed probabilities summed over the query heads sharing kv head kvh
        votes = [0.0] * n
        for h2 in range(kvh * g, (kvh + 1) * g):
            for c, p in enumerate(compressed(bi, h2, pos)[0]):
                votes[c] += p
        own = pos // bs
        chosen = []
        for c in (own, own - 1, 0):
            if c >= 0 and c not in chosen:
                chosen.append(c)
        rest = sorted((c for c in range(own) if c not in chosen), key=lambda c: -votes[c])
        chosen = (chosen + rest)[:top_k]
        keys = sorted(t for c in chosen for t in range(c * bs, min((c + 1) * bs, sk)) if t <= pos)
        mask[bi, h, i, keys] = True
        o_slc = softmax_over(q[bi, h, i], k[bi, kvh, keys], v[bi, kvh, keys], scale)
        lo = max(0, pos - window)
        o_win = softmax_over(q[bi, h, i], k[bi, kvh, lo:pos + 1], v[bi, kvh, lo:pos + 1], scale)
        gc, gs, gw = gates[bi, h, i].tolist()
        out[bi, h, i] = gc * o_cmp + gs * o_slc + gw * o_win
    return mask, out


def exact_over_blocks(q, k, v, causal, scale, choose):
    """Exact softmax over the blocks `choose(bi, h, kv_head, i, pos)` returns as lists of key indices."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    mask = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)
    for bi, h, kvh, i, pos in _loop(q, k):
        keys = sorted(t for t in choose(bi, h, kvh, i, pos) if not causal or t <= pos)
        mask[bi, h, i, keys] = True
        out[bi, h, i] = softmax_over(q[bi, h, i], k[bi, kvh, keys], v[bi, kvh, keys], scale)
    return mask, out


# ---- hip ----------------------------------------------------------------------------------------------


def hip(q, k, v, causal, params, scale):
    """HiP's tree search, one query at a time: top_k spans of the visible blocks, halved round by round,
    the top_k halves by the query's score on the key at each half's centre kept (own block's span forced)."""
    bs, top_k = params["block_size"], params["top_k"]
    sk = k.shape[2]
    n = math.ceil(sk / bs)

    def choose(bi, h, kvh, i, pos):
        own = pos // bs
        seen = own + 1 if causal else n
        spans = [(j * seen // top_k, (j + 1) * seen // top_k) for j in range(top_k)]
        spans = [(lo, hi) for lo, hi in spans if hi > lo]

        def score(span):
            lo, hi = span
            if lo <= own < hi:
                return math.inf
            centre = (lo * bs + min(hi * bs, sk) - 1) // 2
            return float(q[bi, h, i] @ k[bi, kvh, centre])

        while any(hi - lo > 1 for lo, hi in spans):
            halves = []
            for lo, hi in spans:
                if hi - lo > 1:
                    mid = lo + (hi - lo + 1) // 2
                    halves += [(lo, mid), (mid, hi)]
                else:
                    halves.append((lo, hi))
            spans = sorted(halves, key=score, reverse=True)[:top_k]
        return [t for lo, hi in spans for t in range(lo * bs, min(hi * bs, sk))]

    return exact_over_blocks(q, k, v, causal, scale, choose)


# ---- tokenselect --------------------------------------------------------------------------------------


def tokenselect(q, k, v, causal, params, scale):
    """Per-head softmax of each voting head over the keys the query sees, summed; own position first, then
    the keys with the most votes."""
    top_k, vote = params["top_k"], params["vote"]
    hq, sk = q.shape[1], k.shape[2]
    g = hq // k.shape[1]

    def choose(bi, h, kvh, i, pos):
        seen = list(range(pos + 1)) if causal else list(range(sk))
        voters = range(kvh * g, (kvh + 1) * g) if vote == "group" else range(hq)
        votes = [0.0] * sk
        for h2 in voters:
            w = torch.softmax(scale * (k[bi, h2 // g, seen] @ q[bi, h2, i]), 0)
            for j, p in zip(seen, w.tolist()):
                votes[j] += p
        rest = sorted((j for j in seen if j != pos), key=lambda j: -votes[j])
        return [pos] + rest[: top_k - 1]

    return exact_over_blocks(q, k, v, causal, scale, choose)


# ---- landmark -----------------------------------------------------------------------------------------


def landmark(q, k, v, causal, params, scale):
    """The paper's grouped softmax over the blocks a query reads: its own block's tokens and the read blocks'
    landmarks in one softmax group, each read block's tokens in a group of their own, their weights scaled
    by their landmark's; landmarks carry no value. Read blocks: the top_k - 1 by landmark score."""
    assert causal
    period, top_k = params["block_size"] + 1, params["top_k"]
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    mask = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)
    for bi, h, kvh, i, pos in _loop(q, k):
        qi = q[bi, h, i]
        own = pos // period
        mark = [c * period + period - 1 for c in range(own)]       # earlier blocks are complete
        read = sorted(range(own), key=lambda c: -float(qi @ k[bi, kvh, mark[c]]))[: top_k - 1]
        mine = [j for j in range(own * period, pos + 1) if j % period != period - 1]
        local = mine + [mark[c] for c in read]
        w = torch.softmax(scale * (k[bi, kvh, local] @ qi), 0).tolist()
        o = sum((w[n] * v[bi, kvh, j] for n, j in enumerate(mine)), torch.zeros(v.shape[-1], dtype=torch.float64))
        for n, c in enumerate(read):
            tokens = list(range(c * period, c * period + period - 1))
            o = o + w[len(mine) + n] * softmax_over(qi, k[bi, kvh, tokens], v[bi, kvh, tokens], scale)
            mask[bi, h, i, tokens + [mark[c]]] = True
        mask[bi, h, i, mine] = True
        out[bi, h, i] = o
    return mask, out


# ---- biformer -----------------------------------------------------------------------------------------


def biformer(q, k, v, causal, params, scale):
    """Regions of the grid, their mean queries and keys, affinity summed over heads, each region's own region
    plus its top_k - 1 others by affinity; every query reads all keys of its region's regions."""
    assert not causal
    (hh, ww), (rh, rw), top_k = params["grid"], params["regions"], params["top_k"]
    hq, g = q.shape[1], q.shape[1] // k.shape[1]

    def region(t):
        return (t // ww) // (hh // rh) * rw + (t % ww) // (ww // rw)

    members = [[t for t in range(hh * ww) if region(t) == r] for r in range(rh * rw)]
    kept = []
    for bi in range(q.shape[0]):
        rows = []
        for i in range(rh * rw):
            affinity = {j: sum(float(q[bi, h, members[i]].mean(0) @ k[bi, h // g, members[j]].mean(0)) for h in range(hq))
                        for j in range(rh * rw) if j != i}
            rows.append([i] + sorted(affinity, key=lambda j: -affinity[j])[: top_k - 1])
        kept.append(rows)
    return exact_over_blocks(q, k, v, False, scale,
                             lambda bi, h, kvh, i, pos: [t for r in kept[bi][region(pos)] for t in members[r]])


# ---- hyper --------------------------------------------------------------------------------------------


def causal_pieces(sq, sk, min_seq_len):
    """The paper's causal recursion: diagonal halves recurse, the block below the diagonal (and, with
    Sq < Sk, the keys before the first query) is non-causal, pieces of at most min_seq_len keys exact."""
    if sk <= min_seq_len:
        return [("exact", 0, sq, 0, sk)]
    if sq < sk:
        return [("hyper", 0, sq, 0, sk - sq)] + [(kind, a, b, c + sk - sq, d + sk - sq)
                                                  for kind, a, b, c, d in causal_pieces(sq, sq, min_seq_len)]
    h = sq // 2
    top = causal_pieces(h, h, min_seq_len)
    bottom = causal_pieces(sq - h, sq - h, min_seq_len)
    return top + [("hyper", h, sq, 0, h)] + [(kind, a + h, b + h, c + h, d + h) for kind, a, b, c, d in bottom]


def _gray_position(code):
    position, shift = code, code >> 1
    while shift:
        position ^= shift
        shift >>= 1
    return position


def _lsh_positions(rows, projections):
    """Sorted position of every row: codes from the signs of the projections, ranked along the Gray code,
    ties by index."""
    codes = [sum(1 << b for b in range(projections.shape[1]) if float(r @ projections[:, b]) > 0) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (_gray_position(codes[i]), i))
    return {i: p for p, i in enumerate(order)}


def hyper(q, k, v, causal, params, scale, projections, pieces):
    """N / D per query from its pieces: exact causal terms; or the keys of its sorted-LSH block plus the
    sampled keys outside it, each sampled occurrence weighted n / m. `pieces`: (kind, q0, q1, k0, k1,
    samples) with the variant's random draws."""
    bs = params["block_size"]
    b, hq, sq, _ = q.shape
    sk, g = k.shape[2], hq // k.shape[1]
    expect = causal_pieces(sq, sk, params["min_seq_len"]) if causal else [("hyper", 0, sq, 0, sk)]
    assert [p[:5] for p in pieces] == expect
    weight = [[[{} for _ in range(sq)] for _ in range(hq)] for _ in range(b)]
    for kind, q0, q1, k0, k1, samples in pieces:
        for bi in range(b):
            for h in range(hq):
                if kind == "exact":
                    for i in range(q0, q1):
                        for j in range(k0, min(k1, i + sk - sq + 1)):
                            weight[bi][h][i][j] = weight[bi][h][i].get(j, 0.0) + 1.0
                    continue
                nq, nk = q1 - q0, k1 - k0
                blocks = math.ceil(nk / bs)
                kpos = _lsh_positions(k[bi, h // g, k0:k1], projections)
                qpos = _lsh_positions(q[bi, h, q0:q1], projections)
                for i in range(nq):
                    mine = qpos[i] * blocks // nq
                    heavy = [j for j in range(nk) if kpos[j] // bs == mine]
                    row = weight[bi][h][q0 + i]
                    for j in heavy:
                        row[k0 + j] = row.get(k0 + j, 0.0) + 1.0
                    if samples is not None:
                        m = samples.shape[-1]
                        for j in samples[bi, h].tolist():
                            if j not in heavy:
                                row[k0 + j] = row.get(k0 + j, 0.0) + nk / m
    mask = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)
    for bi, h, kvh, i, pos in _loop(q, k):
        row = weight[bi][h][i]
        keys = sorted(row)
        mask[bi, h, i, keys] = True
        e = torch.tensor([row[j] for j in keys], dtype=torch.float64) * torch.softmax(
            scale * (k[bi, kvh, keys] @ q[bi, h, i]), 0)
        out[bi, h, i] = (e / e.sum()) @ v[bi, kvh, keys]
    return mask, out
