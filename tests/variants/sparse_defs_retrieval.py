"""Independent definitions of retrieval_attention, longheads, ltri and combiner, written plainly as
sparse_defs.py's: one query at a time, Python loops and lists, no code shared with attnzoo. Each returns
(mask, out): the keys the query reads (bool (B, Hq, Sq, Sk), causality included) and the output in float64."""
from __future__ import annotations

import functools
import math

import torch
from sparse_defs import _loop, exact_over_blocks, softmax_over


def retrieval_attention(q, k, v, causal, params, scale):
    """The first `sinks` keys, the `window` keys up to the query, and the top_k others by q.k (index='exact')."""
    assert params["index"] == "exact"
    sinks, window, top_k = params["sinks"], params["window"], params["top_k"]
    sk = k.shape[2]

    def choose(bi, h, kvh, i, pos):
        seen = range(pos + 1) if causal else range(sk)
        static = [j for j in seen if j < sinks or pos - window < j <= pos]
        far = [j for j in seen if j not in static]
        return static + sorted(far, key=lambda j: -float(q[bi, h, i] @ k[bi, kvh, j]))[:top_k]

    return exact_over_blocks(q, k, v, causal, scale, choose)


def longheads(q, k, v, causal, params, scale):
    """Chunk key = the softmax(scale pooled . k) mean of its keys, pooled = mean over the chunk's queries of
    their in-chunk attention output over its keys; own, previous and first chunk, then the best by q . key."""
    c, top_k = params["chunk_size"], params["top_k"]
    sk = k.shape[2]
    n = math.ceil(sk / c)

    @functools.cache
    def chunk_key(bi, h, kvh, r):
        keys = k[bi, kvh, r * c:min((r + 1) * c, sk)]
        pooled = torch.stack([torch.softmax(scale * (keys @ q[bi, h, t]), 0) @ keys
                              for t in range(r * c, min((r + 1) * c, sk))]).mean(0)
        return torch.softmax(scale * (keys @ pooled), 0) @ keys

    def choose(bi, h, kvh, i, pos):
        own = pos // c
        forced = []
        for r in (own, own - 1, 0):
            if r >= 0 and r not in forced:
                forced.append(r)
        candidates = range(own) if causal else range(n)
        rest = sorted((r for r in candidates if r not in forced),
                      key=lambda r: -float(q[bi, h, i] @ chunk_key(bi, h, kvh, r)))
        return [t for r in (forced + rest)[:top_k] for t in range(r * c, min((r + 1) * c, sk))]

    return exact_over_blocks(q, k, v, causal, scale, choose)


def combiner(q, k, v, causal, params, scale):
    """Own segment's keys directly, every other (earlier, under causality) segment as one entry: pooled key,
    value = softmax(scale pooled query . keys) mean of its values; one softmax over both."""
    bs, how = params["block_size"], params["pooling"]
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    pooling = (lambda x: x.max(0).values) if how == "max" else (lambda x: x.mean(0))
    mask = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)

    @functools.cache
    def summary(bi, h, kvh, r):
        seg = list(range(r * bs, min((r + 1) * bs, sk)))
        return pooling(k[bi, kvh, seg]), softmax_over(pooling(q[bi, h, seg]), k[bi, kvh, seg], v[bi, kvh, seg], scale)

    for bi, h, kvh, i, pos in _loop(q, k):
        own = pos // bs
        direct = [j for j in range(own * bs, min((own + 1) * bs, sk)) if not causal or j <= pos]
        others = [r for r in range(math.ceil(sk / bs)) if (r < own if causal else r != own)]
        keys, values = [k[bi, kvh, j] for j in direct], [v[bi, kvh, j] for j in direct]
        for r in others:
            kr, vr = summary(bi, h, kvh, r)
            keys.append(kr)
            values.append(vr)
        mask[bi, h, i, direct] = True
        out[bi, h, i] = softmax_over(q[bi, h, i], torch.stack(keys), torch.stack(values), scale)
    return mask, out


def ltri_spans(q, k, scale, params):
    """Per batch row, the spans [start, end) of every chunk: triangle scores of the local attention (each query
    over the max_span keys up to itself in its chunk, probabilities averaged over heads), greedy non-overlapping
    suppression of the positive ones (scores to 9 decimals, best first, ties to the earlier start, then the
    shorter), the uncovered
    runs cut into pieces of at most max_span."""
    c, w = params["chunk_size"], params["max_span"]
    base = 1 / w if params["baseline"] is None else params["baseline"]
    b, hq, sk, _ = q.shape
    g = hq // k.shape[1]
    spans = []
    for bi in range(b):
        row = []
        for start in range(0, sk, c):
            end = min(start + c, sk)
            attn = {}
            for i in range(start, end):
                band = list(range(max(start, i - w + 1), i + 1))
                for h in range(hq):
                    p = torch.softmax(scale * (k[bi, h // g, band] @ q[bi, h, i]), 0)
                    for j, pj in zip(band, p.tolist()):
                        attn[i, j] = attn.get((i, j), 0.0) + pj / hq
            cands = []
            for x in range(start, end):
                for y in range(x, min(x + w, end)):
                    score = round(sum(attn[i, j] - base for i in range(x, y + 1) for j in range(x, i + 1)), 9)
                    if score > 0:
                        cands.append((-score, x, y - x, y + 1))
            taken = set()
            for _, x, _, e in sorted(cands):
                if not taken & set(range(x, e)):
                    taken |= set(range(x, e))
                    row.append((x, e))
            t = start
            while t < end:
                if t in taken:
                    t += 1
                    continue
                run = t
                while t < end and t not in taken:
                    t += 1
                row += [(a, min(a + w, t)) for a in range(run, t, w)]
        spans.append(sorted(row))
    return spans


def ltri(q, k, v, causal, params, scale):
    """Own chunk up to the query, the first span, then the best spans of earlier chunks by q . mean key."""
    assert causal
    c, top_k = params["chunk_size"], params["top_k"]
    spans = ltri_spans(q, k, scale, params)

    def choose(bi, h, kvh, i, pos):
        chunk = pos // c * c
        earlier = [n for n, (a, e) in enumerate(spans[bi]) if e <= chunk]
        score = {n: float(q[bi, h, i] @ k[bi, kvh, spans[bi][n][0]:spans[bi][n][1]].mean(0)) for n in earlier}
        ranked = sorted(earlier, key=lambda n: (n != 0, -score[n]))[:top_k]
        return list(range(chunk, pos + 1)) + [t for n in ranked for t in range(*spans[bi][n])]

    return exact_over_blocks(q, k, v, causal, scale, choose)
