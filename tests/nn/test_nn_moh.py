"""MoHAttention against the MoH paper's Eq. 5 (and the authors' released gates) written plainly, token
by token; uniform routing over every head is scaled multi-head attention; cache, sizes, gradients,
bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo.nn as azn
from nn_refs import F64, assert_every_parameter_learns, decode_pieces, lin, max_err, mha, randn

TOL = 1e-10


def moh(dim=24, heads=6, shared_heads=2, top_k=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = azn.MoHAttention(dim, heads, shared_heads, top_k, **kw).to(F64)
    with torch.no_grad():  # routers far from uniform, so a wrong selection shows
        for name in ("w_shared", "w_routed", "w_type"):
            if getattr(m, name) is not None:
                getattr(m, name).weight.normal_(0, 1.0)
    return m


def softmax_list(vals):
    e = [torch.exp(v - max(vals)) for v in vals]
    tot = sum(e)
    return [t / tot for t in e]


@torch.no_grad()
def gates_reference(m, x):
    """Eq. 5, one token at a time: (B, S, heads)."""
    b, s, _ = x.shape
    hs, e, k = m.shared_heads, m.routed_heads, m.top_k
    release = m.gates == "release"
    g = torch.zeros(b, s, m.heads, dtype=x.dtype)
    for bi in range(b):
        for t in range(s):
            xt = x[bi, t]
            shared = softmax_list(list(lin(m.w_shared, xt))) if hs > 1 else [torch.tensor(1.0, dtype=F64)] * hs
            logits = list(lin(m.w_routed, xt)) if e > 1 else [torch.tensor(0.0, dtype=F64)] * e
            probs = softmax_list(logits) if e else []
            top = sorted(range(e), key=lambda i: -float(logits[i]))[:k]
            routed = [probs[i] if i in top else 0.0 * probs[i] for i in range(e)]
            if release:
                tot = sum(routed[i] for i in top)
                routed = [r / tot * k for r in routed]
                shared = [v * hs for v in shared]
            a1 = a2 = 1.0
            if hs and e:
                a1, a2 = softmax_list(list(lin(m.w_type, xt)))
                if release:
                    a1, a2 = 2 * a1, 2 * a2
            for i in range(hs):
                g[bi, t, i] = a1 * shared[i]
            for i in range(e):
                g[bi, t, hs + i] = a2 * routed[i]
    return g


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), s=st.integers(1, 8), heads=st.integers(1, 6), shared=st.integers(0, 6),
       k=st.integers(0, 6), kv_div=st.booleans(), gates=st.sampled_from(["paper", "release"]),
       causal=st.booleans())
def test_equals_eq5_written_plainly(b, s, heads, shared, k, kv_div, gates, causal):
    shared = min(shared, heads)
    routed = heads - shared
    k = 0 if routed == 0 else max(1, min(k, routed))
    kv_heads = 1 if kv_div else heads
    m = moh(12, heads, shared, k, kv_heads=kv_heads, head_dim=4, gates=gates)
    x = randn(b, s, 12, seed=s)
    y, _ = m(x, causal=causal)
    g = gates_reference(m, x)
    assert max_err(m.routing(x), g) <= TOL
    assert ((g != 0).sum(-1) == shared + k).all()  # each token activates shared + top_k heads
    assert max_err(y, mha(m, x, causal, head_gates=g)) <= TOL


def test_uniform_routing_over_every_head_is_scaled_multihead_attention():
    """k = every routed head and zero router weights: the paper's gates weigh the shared heads
    1/2 * 1/shared_heads and the routed ones 1/2 * 1/routed_heads, the release's weigh all heads 1."""
    for gates, scale in (("paper", [0.5 / 2] * 2 + [0.5 / 4] * 4), ("release", [1.0] * 6)):
        m = moh(shared_heads=2, top_k=4, kv_heads=3, gates=gates)
        with torch.no_grad():
            for name in ("w_shared", "w_routed", "w_type"):
                getattr(m, name).weight.zero_()
        x = randn(2, 7, 24, seed=1)
        plain = azn.MultiheadAttention(24, 6, kv_heads=3).to(F64)
        plain.load_state_dict({n: t for n, t in m.state_dict().items() if not n.startswith("w_")})
        with torch.no_grad():  # scaled MHA: head i's slice of W_O times its constant weight
            w = plain.o_proj.weight.view(24, 6, 4)
            w.mul_(torch.tensor(scale, dtype=F64).view(1, 6, 1))
        assert max_err(m(x)[0], plain(x)[0]) <= TOL, gates
        assert m.aux_loss.item() == pytest.approx(4 * sum(0.25 * 1.0 for _ in range(4)))


def test_aux_loss_is_the_released_load_balance_loss():
    m = moh(top_k=1)
    x = randn(2, 9, 24, seed=2)
    m(x)
    p = torch.softmax(lin(m.w_routed, x), -1).reshape(-1, 4)
    f = torch.zeros_like(p).scatter_(-1, p.argmax(-1, keepdim=True), 1.0)
    assert max_err(m.aux_loss, 4 * (p.mean(0) * f.mean(0)).sum()) <= TOL


@pytest.mark.parametrize("variant,params", [("full", {}), ("sliding_window", {"window": 3}), ("gla", {})])
def test_cache_equals_recomputation(variant, params):
    m = moh(variant=variant, **params)
    x = randn(2, 9, 24, seed=3)
    full, _ = m(x)
    pieces, _ = decode_pieces(m, x, (3, 4, 5, 6, 7, 8))
    assert max_err(pieces, full) <= TOL


@pytest.mark.parametrize("shared,k,gates", [(2, 2, "paper"), (2, 4, "release"), (0, 3, "paper"), (6, 0, "release")])
def test_gradients_reach_every_parameter(shared, k, gates):
    m = moh(shared_heads=shared, top_k=k, gates=gates)
    x = randn(2, 6, 24, seed=4)
    y, _ = m(x)
    loss = (y ** 2).mean() + (0.0 if m.aux_loss is None else 0.01 * m.aux_loss)
    assert_every_parameter_learns(m, loss)


def test_degenerate_routers_are_left_out():
    one_each = azn.MoHAttention(24, 2, 1, 1)
    assert one_each.w_shared is None and one_each.w_routed is None and one_each.w_type is not None
    only_shared = azn.MoHAttention(24, 4, 4, 0)
    assert only_shared.w_routed is None and only_shared.w_type is None and only_shared.active_heads == 4


def test_sizes():
    m = azn.MoHAttention(576, 9, shared_heads=3, top_k=3, kv_heads=3)
    base = azn.MultiheadAttention(576, 9, kv_heads=3)
    assert m.num_parameters() == base.num_parameters() + 576 * (3 + 6 + 2)
    assert m.kv_bytes_per_token(torch.bfloat16) == base.kv_bytes_per_token(torch.bfloat16) == 768
    assert m.active_heads == 6


def test_conversion_keeps_the_router():
    m = moh(kv_heads=6)
    new = azn.gqa_from_mha(m, 2)
    assert type(new) is azn.MoHAttention and new.kv_heads == 2 and new.top_k == 2
    assert torch.equal(new.w_routed.weight, m.w_routed.weight)


def test_paper():
    assert azn.MoHAttention.paper.title == "MoH: Multi-Head Attention as Mixture-of-Head Attention"


@pytest.mark.parametrize("kwargs,exc,names", [
    (dict(shared_heads=7, top_k=0), ValueError, "shared_heads"),
    (dict(shared_heads=-1, top_k=2), ValueError, "shared_heads"),
    (dict(shared_heads=2, top_k=5), ValueError, "top_k"),
    (dict(shared_heads=2, top_k=0), ValueError, "top_k"),
    (dict(shared_heads=6, top_k=1), ValueError, "top_k"),
    (dict(shared_heads=2, top_k=2.0), TypeError, "top_k"),
    (dict(shared_heads=2, top_k=2, gates="softmax"), ValueError, "gates"),
    (dict(shared_heads=2, top_k=2, kv_heads=4), ValueError, "kv_heads"),
])
def test_bad_construction(kwargs, exc, names):
    with pytest.raises(exc, match=names):
        azn.MoHAttention(24, 6, **kwargs)
