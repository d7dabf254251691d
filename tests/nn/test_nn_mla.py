"""MLA against DeepSeek-V2's equations written plainly; the absorbed path == the naive one; the latent
cache == recomputation; sizes, gradients, bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo.nn as azn
from nn_refs import F64, allowed, assert_every_parameter_learns, decode_pieces, lin, max_err, randn, rmsnorm, rope

TOL = 1e-10


def mla(dim=24, heads=3, kv_rank=10, rope_dim=4, seed=0, **kw):
    torch.manual_seed(seed)
    return azn.MLA(dim, heads, kv_rank, rope_dim, **kw).to(F64)


def reference(m, x, causal=True, window=None):
    """DeepSeek-V2 Sec. 2.1, one head at a time."""
    b, s, _ = x.shape
    h, dh, dr, dv, r = m.heads, m.head_dim, m.rope_dim, m.v_head_dim, m.kv_rank
    pos = torch.arange(s)
    a = lin(m.wkv_a, x)
    c_kv, k_r = a[..., :r], a[..., r:]
    if m.latent_norm:
        c_kv = rmsnorm(c_kv, m.kv_norm.weight, m.eps)
    k_r = rope(k_r, pos, m.rope_base)  # (B, S, dr): one RoPE key per token
    if m.q_rank is None:
        q_all = lin(m.wq, x)
    else:
        c_q = lin(m.wq_a, x)
        if m.latent_norm:
            c_q = rmsnorm(c_q, m.q_norm.weight, m.eps)
        q_all = lin(m.wq_b, c_q)
    kv_all = lin(m.wkv_b, c_kv)
    mask = allowed(s, s, causal, window)
    outs = []
    for i in range(h):
        q_i = q_all[..., i * (dh + dr):(i + 1) * (dh + dr)]
        q_c, q_r = q_i[..., :dh], rope(q_i[..., dh:], pos, m.rope_base)
        kv_i = kv_all[..., i * (dh + dv):(i + 1) * (dh + dv)]
        k_c, v_i = kv_i[..., :dh], kv_i[..., dh:]
        scores = (q_c @ k_c.transpose(-1, -2) + q_r @ k_r.transpose(-1, -2)) / (dh + dr) ** 0.5
        p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        outs.append(p @ v_i)
    return lin(m.wo, torch.cat(outs, dim=-1))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), s=st.integers(1, 10), heads=st.integers(1, 3), kv_rank=st.integers(1, 9),
       rope_half=st.integers(1, 3), head_dim=st.integers(1, 5), v_head_dim=st.sampled_from([None, 3]),
       q_rank=st.sampled_from([None, 5]), latent_norm=st.booleans(), causal=st.booleans())
def test_both_paths_equal_the_equations_written_plainly(b, s, heads, kv_rank, rope_half, head_dim, v_head_dim,
                                                        q_rank, latent_norm, causal):
    m = mla(12, heads, kv_rank, 2 * rope_half, head_dim=head_dim, v_head_dim=v_head_dim, q_rank=q_rank,
            latent_norm=latent_norm)
    if latent_norm:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
    x = randn(b, s, 12, seed=s)
    ref = reference(m, x, causal)
    naive, cache = m(x, causal=causal, absorb=False)
    absorbed, _ = m(x, causal=causal, absorb=True)
    assert max_err(naive, ref) <= TOL
    assert max_err(absorbed, ref) <= TOL
    assert cache.c_kv.shape == (b, s, kv_rank) and cache.k_rope.shape == (b, s, 2 * rope_half)


@pytest.mark.parametrize("variant,params,window", [("full", {}, None), ("sliding_window", {"window": 3}, 3)])
@pytest.mark.parametrize("q_rank", [None, 6])
def test_absorbed_decode_equals_naive_and_recomputation(variant, params, window, q_rank):
    m = mla(q_rank=q_rank, variant=variant, **params)
    x = randn(2, 11, 24, seed=1)
    full, whole = m(x, absorb=False)
    assert max_err(full, reference(m, x, True, window)) <= TOL
    for absorb in (True, False, None):
        pieces, cache = decode_pieces(m, x, (4, 5, 6, 7, 8, 9, 10), absorb=absorb)
        assert max_err(pieces, full) <= TOL, absorb
        assert max_err(cache.c_kv, whole.c_kv) <= TOL and max_err(cache.k_rope, whole.k_rope) <= TOL


def test_absorbed_weights_are_the_products_of_the_paper():
    m = mla(q_rank=6)
    w_qk, w_ov = m.absorbed_weights()
    dh, dv, r = m.head_dim, m.v_head_dim, m.kv_rank
    for i in range(m.heads):
        w_uk = m.wkv_b.weight[i * (dh + dv):i * (dh + dv) + dh]  # (dh, r)
        w_uv = m.wkv_b.weight[i * (dh + dv) + dh:(i + 1) * (dh + dv)]  # (dv, r)
        w_uq = m.wq_b.weight[i * (dh + m.rope_dim):i * (dh + m.rope_dim) + dh]  # (dh, q_rank)
        assert max_err(w_qk[i], w_uk.T @ w_uq) <= 1e-14
        assert max_err(w_ov[:, i], m.wo.weight[:, i * dv:(i + 1) * dv] @ w_uv) <= 1e-14
    assert w_qk.shape == (3, r, 6) and w_ov.shape == (24, 3, r)


@pytest.mark.parametrize("absorb", [False, True])
def test_gradients_reach_every_parameter(absorb):
    m = mla(q_rank=6)
    with torch.no_grad():
        m.kv_norm.weight.uniform_(0.5, 1.5)
    x = randn(2, 6, 24, seed=2)
    y, _ = m(x, absorb=absorb)
    assert_every_parameter_learns(m, (y ** 2).mean())


def test_sizes():
    m = azn.MLA(576, 9, kv_rank=256, rope_dim=32)
    assert m.head_dim == 64 and m.v_head_dim == 64
    assert m.kv_elements_per_token() == 288
    assert m.kv_bytes_per_token(torch.bfloat16) == 576
    assert m.cache_bytes(100, batch=2, dtype=torch.float32) == 2 * 100 * 288 * 4
    want = 576 * 9 * 96 + 576 * 288 + 256 + 256 * 9 * 128 + 9 * 64 * 576
    assert m.num_parameters() == want
    lowq = azn.MLA(576, 9, kv_rank=256, rope_dim=32, q_rank=192, latent_norm=False)
    assert lowq.num_parameters() == 576 * 192 + 192 * 9 * 96 + 576 * 288 + 256 * 9 * 128 + 9 * 64 * 576


def test_paper():
    assert azn.MLA.paper.title.startswith("DeepSeek-V2") and azn.MLA.paper.arxiv == "2405.04434"


@pytest.mark.parametrize("kwargs,exc,names", [
    (dict(rope_dim=3), ValueError, "rope_dim"),
    (dict(rope_dim=0), ValueError, "rope_dim"),
    (dict(kv_rank=0), ValueError, "kv_rank"),
    (dict(kv_rank=2.0), TypeError, "kv_rank"),
    (dict(q_rank=0), ValueError, "q_rank"),
    (dict(heads=5), ValueError, "dim"),
    (dict(variant="gla"), ValueError, "recurrent"),
    (dict(variant="nope"), ValueError, "nope"),
    (dict(variant="sliding_window", windo=2), TypeError, "window"),
    (dict(latent_norm=1), TypeError, "latent_norm"),
])
def test_bad_construction(kwargs, exc, names):
    args = dict(dim=24, heads=3, kv_rank=8, rope_dim=4)
    args.update(kwargs)
    with pytest.raises(exc, match=names):
        azn.MLA(**args)


def test_bad_calls():
    m = mla()
    _, cache = m(randn(2, 3, 24))
    with pytest.raises(ValueError, match="batch"):
        m(randn(1, 1, 24), cache=cache)
    with pytest.raises(ValueError, match="rank"):
        mla(kv_rank=6)(randn(2, 1, 24), cache=cache)
    with pytest.raises(TypeError, match="LatentCache"):
        m(randn(2, 1, 24), cache=azn.KVCache(cache.c_kv, cache.c_kv))
    with pytest.raises(TypeError, match="absorb"):
        m(randn(2, 1, 24), absorb="yes")
    with pytest.raises(ValueError, match="x must have shape"):
        m(randn(2, 1, 12))
