"""Independent definitions of hedgehog, lln, fast, flowformer and agent for the tests, written from the papers
(and, for Flowformer, the authors' published formulas) one batch row, head and token at a time in float64,
without the library's code. q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); query head h reads KV
head h // (Hq // Hkv)."""
from __future__ import annotations

import math

import torch
from linear_defs import taylor

F64 = torch.float64


def _unit(x):
    return x / x.norm() if x.norm() > 0 else x


def features(name, params, x, role, head, scale):
    """phi of one token x (D,) (queries already multiplied by `scale`)."""
    if name == "hedgehog":
        w, b = params.get(f"weight_{role}"), params.get(f"bias_{role}")
        z = x if w is None else x @ w[head].double()
        z = z if b is None else z + b[head].double()
        e = torch.exp(torch.cat([z, -z]))
        return e / e.sum()
    if name == "lln":
        return torch.exp((params["alpha"] if role == "q" else params["beta"]) * x)
    if name == "fast":
        if params.get("normalize"):
            x = _unit(x) * math.sqrt(scale)
        else:
            x = x / math.sqrt(scale) if role == "q" else x * math.sqrt(scale)
        f = taylor(x, 1.0)
        return f if params.get("order", 2) == 2 else f[:1 + x.shape[0]]
    raise KeyError(name)


def pair(name, params, qi, kj, hq, hkv, scale):
    """K(q_i, k_j) as the paper writes it (qi not yet scaled)."""
    if name == "fast":
        if params.get("normalize"):
            qi, kj = _unit(qi), _unit(kj)
        s = scale * float(qi @ kj)
        return 1 + s + (s * s / 2 if params.get("order", 2) == 2 else 0)
    if name == "lln":
        return float(sum(math.exp(params["alpha"] * scale * a + params["beta"] * b) for a, b in zip(qi, kj)))
    return float(features(name, params, qi * scale, "q", hq, scale) @ features(name, params, kj, "k", hkv, scale))


def default_scale(name, params, d):
    if name == "fast":
        return 1.0 if params.get("normalize") else d ** -0.5
    return 1.0


def kernel_loop(name, params, q, k, v, causal=True, scale=None):
    """Normalised kernel attention (hedgehog, lln, fast) pair by pair; causal: Sq == Sk or the last Sq positions.
    Returns o and, when causal and Sq == Sk, the final state (B, Hkv, F, Dv + 1) built from the features."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    scale = default_scale(name, params, d) if scale is None else scale
    out = torch.zeros(b, hq, sq, dv, dtype=F64)
    for bi in range(b):
        for h in range(hq):
            for i in range(sq):
                last = i + sk - sq if causal else sk - 1
                w = [pair(name, params, q[bi, h, i], k[bi, h // g, j], h, h // g, scale) for j in range(last + 1)]
                den = sum(w)
                num = sum(wj * v[bi, h // g, j] for wj, j in zip(w, range(last + 1)))
                out[bi, h, i] = num / den if den != 0 else 0 * v[bi, 0, 0]
    ones = torch.ones(1, dtype=F64)
    state = torch.stack([torch.stack([
        sum(torch.outer(features(name, params, k[bi, h, j], "k", h, scale), torch.cat([v[bi, h, j], ones]))
            for j in range(sk)) for h in range(hkv)]) for bi in range(b)])
    return out, state


def flow_causal_loop(q, k, v, scale=1.0):
    """The causal Flow-Attention of the authors' causal code (eps = 0), position by position with every sum
    over the past written out; a group's G query heads are G sinks per position; with Sq < Sk the first
    Sk - Sq positions have no query. Returns o (B, Hq, Sq, Dv)."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, sq, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[-1]
    g, first_query = hq // hkv, s - sq
    out = torch.zeros(b, hq, s, dv, dtype=F64)
    for bi in range(b):
        for kh in range(hkv):
            fk = torch.sigmoid(k[bi, kh])                                                   # (S, D)
            fq = torch.zeros(g, s, d, dtype=F64)
            for gi in range(g):
                fq[gi, first_query:] = torch.sigmoid(scale * q[bi, kh * g + gi])
            inc_norm = torch.zeros(g, s, dtype=F64)
            out_norm = torch.zeros(s, dtype=F64)
            for t in range(s):
                n = t + 1
                for gi in range(g):
                    den = sum(float(fq[gi, t] @ fk[j]) for j in range(t + 1))
                    inc_norm[gi, t] = n / den if den else 0.0
                den = sum(float(fq[gi, i] @ fk[t]) for gi in range(g) for i in range(t + 1))
                out_norm[t] = g * n / den if den else 0.0
            c_source = torch.zeros(s, dtype=F64)
            for t in range(s):
                total = sum(float(fq[gi, i] @ fk[t]) * inc_norm[gi, i] for gi in range(g) for i in range(t + 1))
                c_source[t] = min(1.0, max(-1.0, total / (g * (t + 1))))
            e = torch.exp(c_source)
            comp = torch.stack([e[t] / e[:t + 1].sum() * (t + 1) for t in range(s)])
            for gi in range(g):
                for t in range(s):
                    flows = [float(fq[gi, t] @ fk[j]) for j in range(t + 1)]
                    c_sink = sum(f * out_norm[j] for j, f in enumerate(flows)) / (t + 1)
                    num = sum(f * comp[j] * v[bi, kh, j] for j, f in enumerate(flows))
                    den = sum(flows)
                    out[bi, kh * g + gi, t] = (num / den if den else 0 * num) / (1 + math.exp(-float(c_sink)))
    return out[:, :, first_query:]


def flow_noncausal_official(q, k, v, scale=1.0):
    """The authors' non-causal Flow_Attention (eps = 0) per KV head, a group's query heads stacked as its sinks."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, length, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, length, v.shape[-1], dtype=F64)
    for bi in range(b):
        for kh in range(hkv):
            sinks = torch.sigmoid(scale * q[bi, kh * g:(kh + 1) * g].reshape(g * length, -1))
            sources = torch.sigmoid(k[bi, kh])
            incoming = 1.0 / (sinks @ sources.sum(0))
            outgoing = 1.0 / (sources @ sinks.sum(0))
            c_sink = sinks @ (sources * outgoing[:, None]).sum(0)
            c_source = (sources @ (sinks * incoming[:, None]).sum(0)).clamp(-1, 1)
            alloc = torch.sigmoid(c_sink * (g * length / s))
            comp = torch.softmax(c_source, 0) * s
            o = (sinks * incoming[:, None]) @ (sources.T @ (v[bi, kh] * comp[:, None])) * alloc[:, None]
            out[bi, kh * g:(kh + 1) * g] = o.view(g, length, -1)
    return out


def agent_loop(q, k, v, agents, scale=None):
    """Agent attention query by query: agents = means of n bins of query positions, then two softmaxes."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, length, d = q.shape
    g = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, length, v.shape[-1], dtype=F64)
    for bi in range(b):
        for h in range(hq):
            bins = [(a * length // agents, -(-(a + 1) * length // agents)) for a in range(agents)]
            agent = torch.stack([q[bi, h, lo:hi].mean(0) for lo, hi in bins])            # (n, D)
            kk, vv = k[bi, h // g], v[bi, h // g]
            agent_v = torch.stack([torch.softmax(scale * (kk @ a), 0) @ vv for a in agent])
            for i in range(length):
                out[bi, h, i] = torch.softmax(scale * (agent @ q[bi, h, i]), 0) @ agent_v
    return out
