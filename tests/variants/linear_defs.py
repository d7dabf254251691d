"""Independent definitions of the linear family's variants for the tests: each paper's recurrence, one
batch row, KV head and token at a time, in float64, written from the papers without the library's code.

`loop(name, params, q, k, v, scale=None, state=None)` -> (o (B, Hq, S, Dv), final state in the library's
layout), with q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) aligned (Sq == Sk).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64

PHI = {"elu1": lambda x: F.elu(x) + 1, "relu": torch.relu, "identity": lambda x: x}


def taylor(x, scale):
    """Based's feature map, built entry by entry: [1, x', x'_a x'_b / sqrt 2 for a, b], x' = x sqrt(scale)."""
    xs = x * math.sqrt(scale)
    d = xs.shape[0]
    quad = [xs[a] * xs[b] / math.sqrt(2) for a in range(d) for b in range(d)]
    return torch.stack([torch.ones((), dtype=x.dtype), *xs, *quad])


def _decays(name, params, hkv):
    if params.get("decay") is not None:
        dec = params["decay"]
        return [float(dec)] * hkv if isinstance(dec, (int, float)) else [float(x) for x in dec]
    if name == "retention":
        return [1 - 2.0 ** (-5 - h) for h in range(hkv)]
    layer, layers = params.get("layer_idx", 0), params.get("num_layers", 1)
    return [math.exp(-(8 / hkv) * (1 - layer / layers) * h) for h in range(hkv)]


def loop(name, params, q, k, v, scale=None, state=None):
    q, k, v = q.double(), k.double(), v.double()
    b, hq, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    out = torch.zeros(b, hq, s, dv, dtype=F64)
    finals = []
    normalize = params.get("normalize", True) and name in ("linear", "based")
    if scale is None:
        scale = 1.0 if name == "cosine" else d ** -0.5
    for bi in range(b):
        row = []
        for h in range(hkv):
            st = None if state is None else state[bi, h].double().clone()
            if name in ("linear", "based"):
                phi = PHI[params.get("feature_map", "elu1")] if name == "linear" else (lambda x: taylor(x, scale))
                f = 1 + d + d * d if name == "based" else d
                S = torch.zeros(f, dv, dtype=F64) if st is None else st[:, :dv].clone()
                z = torch.zeros(f, dtype=F64) if (st is None or not normalize) else st[:, dv].clone()
                qscale = 1.0 if name == "based" else scale
                for t in range(s):
                    fk = phi(k[bi, h, t])
                    S = S + torch.outer(fk, v[bi, h, t])
                    z = z + fk
                    for j in range(g):
                        fq = phi(q[bi, h * g + j, t]) * qscale
                        num, den = fq @ S, fq @ z
                        out[bi, h * g + j, t] = (num / den if den != 0 else 0 * num) if normalize else num
                row.append(torch.cat([S, z[:, None]], 1) if normalize else S)
            elif name == "cosine":
                m = params.get("m", 0.5)
                p = 1 / (1 + math.exp(-(m if isinstance(m, (int, float)) else m[h])))
                S = torch.zeros(d, dv, dtype=F64) if st is None else st[:d].clone()
                n = 0.0 if st is None else float(st[d, 0])
                unit = lambda x: x / x.norm() if x.norm() > 0 else x  # noqa: E731
                for t in range(s):
                    n += 1
                    S = S + torch.outer(unit(k[bi, h, t]), v[bi, h, t] / n ** p)
                    for j in range(g):
                        out[bi, h * g + j, t] = scale * unit(q[bi, h * g + j, t]) @ S
                row.append(torch.cat([S, torch.full((1, dv), n, dtype=F64)], 0))
            elif name in ("retention", "lightning"):
                gamma = _decays(name, params, hkv)[h]
                S = torch.zeros(d, dv, dtype=F64) if st is None else st.clone()
                for t in range(s):
                    S = gamma * S + torch.outer(k[bi, h, t], v[bi, h, t])
                    for j in range(g):
                        out[bi, h * g + j, t] = scale * q[bi, h * g + j, t] @ S
                row.append(S)
            else:
                raise KeyError(name)
        finals.append(torch.stack(row))
    return out, torch.stack(finals)
