"""DifferentialAttention against the Differential Transformer's equations written plainly, head by head;
lambda's re-parametrisation and schedule, the cache, sizes, gradients, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo.nn as azn
from nn_refs import (F64, allowed, assert_every_parameter_learns, decode_pieces, lin, max_err, randn, rmsnorm, rope,
                     weights)

TOL = 1e-10


def diff(dim=24, heads=3, kv_heads=None, seed=0, **kw):
    torch.manual_seed(seed)
    m = azn.DifferentialAttention(dim, heads, kv_heads, **kw).to(F64)
    with torch.no_grad():  # affine weights away from their initial ones, so the reference must apply them
        m.norm.weight.uniform_(0.5, 1.5)
        if getattr(m.norm, "bias", None) is not None:
            m.norm.bias.normal_()
    return m


def reference(m, x, causal=True, window=None):
    """Sec. 2.1-2.2 of the paper, one head at a time; head i reads KV head i // (heads // kv_heads)."""
    b, s, _ = x.shape
    h, hkv, d = m.heads, m.kv_heads, m.head_dim
    pos = torch.arange(s)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * (m.layer - 1))
    lam = (torch.exp((m.lambda_q1 * m.lambda_k1).sum()) - torch.exp((m.lambda_q2 * m.lambda_k2).sum()) + lam_init)
    Q, K, V = lin(m.q_proj, x), lin(m.k_proj, x), lin(m.v_proj, x)
    mask = allowed(s, s, causal, window)
    outs = []
    for i in range(h):
        g = i // (h // hkv)
        q1, q2 = Q[..., 2 * d * i:2 * d * i + d], Q[..., 2 * d * i + d:2 * d * (i + 1)]
        k1, k2 = K[..., 2 * d * g:2 * d * g + d], K[..., 2 * d * g + d:2 * d * (g + 1)]
        v = V[..., 2 * d * g:2 * d * (g + 1)]
        if m.rope:
            q1, q2, k1, k2 = (rope(t, pos, m.rope_base) for t in (q1, q2, k1, k2))
        a1, a2 = weights(q1, k1, d ** -0.5, mask), weights(q2, k2, d ** -0.5, mask)
        head = (a1 - lam * a2) @ v  # (B, S, 2d)
        if m.norm_kind == "rmsnorm":
            head = rmsnorm(head, m.norm.weight, m.eps)
        else:  # GroupNorm, one group per head: per-head mean and variance, per-channel affine
            mu = head.mean(-1, keepdim=True)
            var = head.var(-1, unbiased=False, keepdim=True)
            sl = slice(2 * d * i, 2 * d * (i + 1))
            head = (head - mu) / torch.sqrt(var + m.eps) * m.norm.weight[sl] + m.norm.bias[sl]
        outs.append((1 - lam_init) * head)
    return lin(m.o_proj, torch.cat(outs, dim=-1))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), s=st.integers(1, 10), kv_heads=st.integers(1, 2), group=st.integers(1, 3),
       half=st.integers(1, 3), layer=st.integers(1, 12), causal=st.booleans(), rope=st.booleans(),
       norm=st.sampled_from(["rmsnorm", "groupnorm"]), bias=st.booleans())
def test_equals_the_equations_written_plainly(b, s, kv_heads, group, half, layer, causal, rope, norm, bias):
    heads = kv_heads * group
    m = diff(10, heads, kv_heads, head_dim=2 * half, layer=layer, rope=rope, norm=norm, bias=bias)
    x = randn(b, s, 10, seed=s)
    y, cache = m(x, causal=causal)
    assert max_err(y, reference(m, x, causal)) <= TOL
    assert cache.k.shape == (b, 2 * kv_heads, s, 2 * half) and cache.v.shape == (b, kv_heads, s, 4 * half)


@pytest.mark.parametrize("variant,params,window", [("full", {}, None), ("sliding_window", {"window": 2}, 2)])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_cache_equals_recomputation(variant, params, window, kv_heads):
    m = diff(kv_heads=kv_heads, layer=4, variant=variant, **params)
    x = randn(2, 10, 24, seed=1)
    full, whole = m(x)
    assert max_err(full, reference(m, x, True, window)) <= TOL
    pieces, cache = decode_pieces(m, x, (3, 4, 5, 6, 7, 8, 9))
    assert max_err(pieces, full) <= TOL
    assert max_err(cache.k, whole.k) <= TOL and max_err(cache.v, whole.v) <= TOL


def test_lambda_schedule_and_reparametrisation():
    assert azn.DifferentialAttention(24, 3, layer=1).lambda_init == pytest.approx(0.2)
    assert azn.DifferentialAttention(24, 3, layer=2).lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
    assert azn.DifferentialAttention(24, 3, layer=40).lambda_init == pytest.approx(0.8, abs=1e-5)
    m = diff()
    with torch.no_grad():
        for p, val in ((m.lambda_q1, 0.3), (m.lambda_k1, 0.2), (m.lambda_q2, -0.1), (m.lambda_k2, 0.4)):
            p.fill_(val)
    d = m.head_dim
    assert m.lambda_full().item() == pytest.approx(math.exp(0.06 * d) - math.exp(-0.04 * d) + 0.2, rel=1e-12)
    fresh = azn.DifferentialAttention(576, 9)
    assert fresh.lambda_q1.shape == (32,) and 0.02 < fresh.lambda_q1.std().item() < 0.2


def test_identical_maps_cancel_to_one_minus_lambda():
    """Q2 = Q1 and K2 = K1: both maps are the same A, so each head is (1 - lambda) A V before the norm."""
    m = diff(norm="rmsnorm", rope=False)
    d = m.head_dim
    with torch.no_grad():
        for proj in (m.q_proj, m.k_proj):
            w = proj.weight.view(-1, 2, d, 24)
            w[:, 1] = w[:, 0]
        m.lambda_q1.fill_(0.0), m.lambda_k1.fill_(0.0), m.lambda_q2.fill_(0.0), m.lambda_k2.fill_(0.0)
    x = randn(1, 6, 24, seed=2)
    # lambda = 1 - 1 + lambda_init = 0.2, so every head is (1 - 0.2) A V (the norm left out: it would remove the factor)
    m.norm = torch.nn.Identity()
    y, _ = m(x)
    plain = azn.MultiheadAttention(24, 3, head_dim=2 * d, rope=False).to(F64)
    with torch.no_grad():
        # [Q1, 0] . [K1, 0] with head dim 2d: sqrt(2) on Q1 keeps the scale 1 / sqrt(d)
        plain.q_proj.weight.copy_(torch.cat([torch.cat([w[0], torch.zeros_like(w[0])], 0) for w in
                                             m.q_proj.weight.view(3, 2, d, 24)], 0) * math.sqrt(2))
        plain.k_proj.weight.copy_(torch.cat([torch.cat([w[0], torch.zeros_like(w[0])], 0) for w in
                                             m.k_proj.weight.view(3, 2, d, 24)], 0))
        plain.v_proj.weight.copy_(m.v_proj.weight)
        plain.o_proj.weight.copy_(m.o_proj.weight)
    want, _ = plain(x)
    assert max_err(y, 0.8 * 0.8 * want) <= TOL  # (1 - lambda) = 0.8 on the maps, (1 - lambda_init) = 0.8 after


@pytest.mark.parametrize("norm", ["rmsnorm", "groupnorm"])
def test_gradients_reach_every_parameter(norm):
    m = diff(kv_heads=1, norm=norm, bias=True)
    x = randn(2, 6, 24, seed=3)
    y, _ = m(x)
    assert_every_parameter_learns(m, (y ** 2).mean())


def test_sizes():
    m = azn.DifferentialAttention(576, 9, kv_heads=3)
    assert m.head_dim == 32
    assert m.kv_elements_per_token() == 4 * 3 * 32
    assert m.kv_bytes_per_token(torch.bfloat16) == 768
    assert m.num_parameters() == 576 * 576 * 2 + 2 * 576 * 192 + 4 * 32 + 64
    g = azn.DifferentialAttention(576, 9, norm="groupnorm")
    assert g.num_parameters() == 4 * 576 * 576 + 4 * 32 + 2 * 576


def test_paper():
    assert azn.DifferentialAttention.paper.title == "Differential Transformer"
    assert azn.DifferentialAttention.paper.arxiv == "2410.05258"


@pytest.mark.parametrize("kwargs,exc,names", [
    (dict(dim=30, heads=4), ValueError, "2 \\* heads"),
    (dict(heads=4, kv_heads=3), ValueError, "kv_heads"),
    (dict(layer=0), ValueError, "layer"),
    (dict(layer=1.5), TypeError, "layer"),
    (dict(norm="layernorm"), ValueError, "norm"),
    (dict(head_dim=3), ValueError, "head_dim"),
    (dict(variant="retention"), ValueError, "recurrent"),
    (dict(variant="sliding_window", size=3), TypeError, "size"),
])
def test_bad_construction(kwargs, exc, names):
    args = dict(dim=24, heads=3)
    args.update(kwargs)
    with pytest.raises(exc, match=names):
        azn.DifferentialAttention(**args)


def test_bad_calls():
    m = diff()
    _, cache = m(randn(2, 3, 24))
    with pytest.raises(ValueError, match="cache holds"):
        diff(kv_heads=1)(randn(2, 1, 24), cache=cache)
    with pytest.raises(ValueError, match="x must have shape"):
        m(randn(2, 3, 25))
