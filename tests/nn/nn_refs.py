"""Plain definitions the attnzoo.nn tests compare the modules against: written from the papers' formulas
with dense tensors, sharing no code with src/attnzoo/nn."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64


def rope(x, pos, base=10000.0):
    """Rotate-half RoPE written pair by pair: channels (i, i + D/2) turn by pos * base^(-2i/D)."""
    d = x.shape[-1]
    half = d // 2
    out = torch.empty_like(x)
    for i in range(half):
        theta = pos.to(F64) * base ** (-2.0 * i / d)
        c, s = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = a * s + b * c
    return out


def allowed(sq, sk, causal=True, window=None):
    """bool (Sq, Sk): query i sits at position i + Sk - Sq; causal keeps keys <= it, window keeps the
    `window` keys before it (and after it when not causal)."""
    qp = torch.arange(sq).view(-1, 1) + sk - sq
    kp = torch.arange(sk).view(1, -1)
    m = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        m &= kp <= qp
    if window is not None:
        m &= (qp - kp).abs() <= window
    return m


def weights(q, k, scale, mask):
    """softmax(scale q k^T) over allowed keys, (B, H, Sq, Sk); rows with nothing allowed are zeros."""
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


def heads_of(t, b, s, h, d):
    return t.view(b, s, h, d).transpose(1, 2)


def lin(layer, x):
    return F.linear(x, layer.weight, layer.bias)


def mha(m, x, causal=True, window=None, head_gates=None):
    """Multi-head attention from a module's weights: projections, RoPE, K/V repeated over the group,
    dense masked softmax, optional per-(token, head) output gates (B, S, H), output projection."""
    b, s, _ = x.shape
    h, hkv, d = m.heads, m.kv_heads, m.head_dim
    q = heads_of(lin(m.q_proj, x), b, s, h, d)
    k = heads_of(lin(m.k_proj, x), b, s, hkv, d)
    v = heads_of(lin(m.v_proj, x), b, s, hkv, d)
    if m.rope:
        pos = torch.arange(s)
        q, k = rope(q, pos, m.rope_base), rope(k, pos, m.rope_base)
    k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    o = weights(q, k, d ** -0.5, allowed(s, s, causal, window)) @ v  # (B, H, S, D)
    if head_gates is not None:
        o = o * head_gates.transpose(1, 2).unsqueeze(-1)
    return lin(m.o_proj, o.transpose(1, 2).reshape(b, s, h * d))


def gla(m, x):
    """GLA inside the module, as a loop: g_t = logsigmoid(W2 W1 x_t + b) / 16,
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = D^-1/2 q_t S_t (query head h reads KV head h // G)."""
    b, s, _ = x.shape
    h, hkv, d = m.heads, m.kv_heads, m.head_dim
    q = heads_of(lin(m.q_proj, x), b, s, h, d)
    k = heads_of(lin(m.k_proj, x), b, s, hkv, d)
    v = heads_of(lin(m.v_proj, x), b, s, hkv, d)
    if m.rope:
        pos = torch.arange(s)
        q, k = rope(q, pos, m.rope_base), rope(k, pos, m.rope_base)
    gate = m.learned["g"]
    g = heads_of(F.logsigmoid(lin(gate.up, lin(gate.down, x))) / 16.0, b, s, hkv, d)
    o = torch.zeros(b, h, s, d, dtype=x.dtype)
    for bi in range(b):
        for kh in range(hkv):
            st = torch.zeros(d, d, dtype=x.dtype)
            for t in range(s):
                st = torch.exp(g[bi, kh, t]).unsqueeze(1) * st + torch.outer(k[bi, kh, t], v[bi, kh, t])
                for j in range(h // hkv):
                    qh = kh * (h // hkv) + j
                    o[bi, qh, t] = d ** -0.5 * q[bi, qh, t] @ st
    return lin(m.o_proj, o.transpose(1, 2).reshape(b, s, h * d))


def rmsnorm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def decode_pieces(m, x, cuts, **kw):
    """Feed x in pieces split at `cuts`, each with the previous piece's cache; the outputs joined."""
    outs, cache, start = [], None, 0
    for end in list(cuts) + [x.shape[1]]:
        if end > start:
            y, cache = m(x[:, start:end], cache=cache, **kw)
            outs.append(y)
        start = end
    return torch.cat(outs, dim=1), cache


def assert_every_parameter_learns(m, loss, lr=1e-2):
    """A backward pass gives every parameter a non-zero gradient, and one SGD step changes each."""
    for p in m.parameters():
        p.grad = None
    loss.backward()
    names = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
             or p.grad.abs().max() == 0]
    assert not names, f"no gradient reaches {names}"
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    torch.optim.SGD(m.parameters(), lr=lr).step()
    same = [n for n, p in m.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not same, f"not updated: {same}"


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=seeded(seed), dtype=F64)


def isclose(a, b, tol=1e-10):
    return math.isfinite(max_err(a, b)) and max_err(a, b) <= tol
