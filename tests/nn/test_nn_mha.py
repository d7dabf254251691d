"""attnzoo.nn.MultiheadAttention against multi-head attention written plainly (projections, RoPE,
GQA, dense masked softmax), GLA's recurrence as a loop, the decoding cache == recomputation,
gradients, sizes and bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo.nn as azn
from nn_refs import F64, assert_every_parameter_learns, decode_pieces, gla, max_err, mha, randn

TOL = 1e-10


def module(dim=24, heads=4, kv_heads=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = azn.MultiheadAttention(dim, heads, kv_heads, **kw).to(F64)
    if kw.get("bias"):
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1:
                    p.normal_()
    return m


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), s=st.integers(1, 13), kv_heads=st.sampled_from([1, 2, 3]), group=st.integers(1, 3),
       half=st.integers(1, 4), causal=st.booleans(), rope=st.booleans(), bias=st.booleans(),
       window=st.sampled_from([None, 0, 3]))
def test_equals_multihead_attention_written_plainly(b, s, kv_heads, group, half, causal, rope, bias, window):
    heads, head_dim = kv_heads * group, 2 * half
    dim = 8
    params = {} if window is None else {"variant": "sliding_window", "window": window}
    m = module(dim, heads, kv_heads, head_dim=head_dim, rope=rope, bias=bias, **params)
    x = randn(b, s, dim, seed=s)
    y, cache = m(x, causal=causal)
    assert y.shape == x.shape
    assert max_err(y, mha(m, x, causal, window)) <= TOL
    assert cache.k.shape == cache.v.shape == (b, kv_heads, s, head_dim)


@pytest.mark.parametrize("variant,params", [("full", {}), ("sliding_window", {"window": 3}),
                                            ("gla", {"chunk_size": 4})])
@pytest.mark.parametrize("cuts", [(5, 6, 7, 8, 9, 10), (1, 2, 3), (4, 9)])
def test_cache_equals_recomputation(variant, params, cuts):
    """Prefill then one token at a time (or in chunks), each call with the last cache: the same
    outputs as one pass over the whole sequence, float64 to 1e-10."""
    m = module(variant=variant, **params)
    x = randn(2, 11, 24, seed=1)
    full, whole = m(x)
    pieces, cache = decode_pieces(m, x, cuts)
    assert max_err(pieces, full) <= TOL
    if variant == "gla":
        assert isinstance(cache, azn.StateCache) and cache.length == 11
        assert max_err(cache.state, whole.state) <= TOL
    else:
        assert isinstance(cache, azn.KVCache) and cache.length == 11
        assert max_err(cache.k, whole.k) <= TOL and max_err(cache.v, whole.v) <= TOL


def test_gla_core_equals_its_recurrence_written_plainly():
    m = module(variant="gla", chunk_size=4)
    x = randn(2, 9, 24, seed=2)
    y, _ = m(x)
    assert max_err(y, gla(m, x)) <= TOL
    g = m.learned["g"](x)
    assert g.shape == (2, 2, 9, 6) and bool((g <= 0).all())


def test_gla_gates_given_in_forward_replace_the_learned_ones():
    m = module(variant="gla", chunk_size=4)
    x = randn(1, 6, 24, seed=3)
    g = torch.full((1, 2, 6, 6), -0.5, dtype=F64)
    y_given, _ = m(x, g=g)
    y_learned, _ = m(x)
    assert max_err(y_given, y_learned) > 1e-6


@pytest.mark.parametrize("variant,params", [("full", {}), ("gla", {"chunk_size": 4})])
def test_gradients_reach_every_parameter(variant, params):
    m = module(variant=variant, bias=True, **params)
    x = randn(2, 7, 24, seed=4)
    y, _ = m(x)
    assert_every_parameter_learns(m, (y ** 2).mean())


def test_float32_matches_float64():
    m = module(variant="sliding_window", window=4)
    x = randn(2, 10, 24, seed=5)
    y64, _ = m(x)
    y32, _ = m.float()(x.float())
    assert y32.dtype == torch.float32 and max_err(y32, y64) < 1e-5


def test_sizes():
    m = azn.MultiheadAttention(576, 9, kv_heads=3)
    assert m.head_dim == 64 and m.groups == 3
    assert m.num_parameters() == 576 * 576 * 2 + 2 * 576 * 192
    assert m.kv_bytes_per_token(torch.bfloat16) == 2 * 3 * 64 * 2
    assert m.kv_bytes_per_token() == 2 * 3 * 64 * 4  # the parameters' dtype
    assert m.cache_bytes(1000, batch=2, dtype=torch.float16) == 2 * 1000 * 768
    biased = azn.MultiheadAttention(576, 9, kv_heads=3, bias=True)
    assert biased.num_parameters() == m.num_parameters() + 576 + 192 + 192 + 576
    lin = azn.MultiheadAttention(64, 4, variant="gla")
    assert lin.kv_bytes_per_token(torch.bfloat16) == 0
    assert lin.state_bytes(batch=3, dtype=torch.bfloat16) == 3 * 4 * 16 * 16 * 4  # float32 state
    assert lin.num_parameters() == 4 * 64 * 64 + 64 * 16 + 16 * 64 + 64
    ret = azn.MultiheadAttention(64, 4, kv_heads=2, variant="linear")  # (S, z): D x (D + 1) per KV head
    assert ret.state_bytes(dtype=torch.float32) == 2 * 16 * 17 * 4


def test_other_linear_variants_decode_through_their_state():
    for variant in ("linear", "retention", "cosine"):
        m = module(variant=variant, chunk_size=4)
        x = randn(1, 8, 24, seed=6)
        full, _ = m(x)
        pieces, _ = decode_pieces(m, x, (3, 4, 5, 6, 7))
        assert max_err(pieces, full) <= TOL, variant


def test_config_rebuilds_the_module():
    m = module(variant="sliding_window", window=5, bias=True)
    again = type(m)(**m.config).to(F64)
    again.load_state_dict(m.state_dict())
    x = randn(1, 6, 24, seed=7)
    assert max_err(again(x)[0], m(x)[0]) == 0
    assert "window=5" in repr(m)


@pytest.mark.parametrize("kwargs,exc,names", [
    (dict(dim=30, heads=4), ValueError, "dim"),
    (dict(dim=24, heads=4, kv_heads=3), ValueError, "kv_heads"),
    (dict(dim=24, heads=4, kv_heads=8), ValueError, "kv_heads"),
    (dict(dim=24, heads=0), ValueError, "heads"),
    (dict(dim=24.0, heads=4), TypeError, "dim"),
    (dict(dim=24, heads=4, head_dim=5), ValueError, "head_dim"),
    (dict(dim=24, heads=4, variant="slidng_window"), ValueError, "sliding_window"),
    (dict(dim=24, heads=4, variant="sliding_window", windw=3), TypeError, "window"),
    (dict(dim=24, heads=4, variant="sliding_window", window=-1), ValueError, "window"),
    (dict(dim=24, heads=4, variant=3), TypeError, "variant"),
    (dict(dim=24, heads=4, rope_base=0.0), ValueError, "rope_base"),
    (dict(dim=24, heads=4, rope="yes"), TypeError, "rope"),
])
def test_bad_construction_names_the_argument(kwargs, exc, names):
    with pytest.raises(exc, match=names):
        azn.MultiheadAttention(**kwargs)


def test_head_dim_need_not_divide_dim():
    m = azn.MultiheadAttention(30, 4, head_dim=6, rope=True)
    assert m(torch.randn(1, 3, 30))[0].shape == (1, 3, 30)
    odd = azn.MultiheadAttention(30, 6, rope=False)  # head_dim 5 is fine without RoPE
    assert odd(torch.randn(1, 3, 30))[0].shape == (1, 3, 30)


def test_bad_calls_name_the_argument():
    m = module()
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 5, 23, dtype=F64))
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(5, 24, dtype=F64))
    with pytest.raises(TypeError, match="x must be a floating"):
        m(torch.ones(1, 5, 24, dtype=torch.long))
    _, cache = m(randn(2, 4, 24))
    with pytest.raises(ValueError, match="batch"):
        m(randn(1, 1, 24), cache=cache)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        m(randn(2, 1, 24), cache=(cache.k, cache.v))
    other = module(kv_heads=4)
    with pytest.raises(ValueError, match="cache holds keys"):
        other(randn(2, 1, 24), cache=cache)
    with pytest.raises(TypeError, match="unknown input"):
        m(randn(2, 4, 24), windw=3)
    lin = module(variant="gla")
    with pytest.raises(TypeError, match="cache"):
        lin(randn(1, 4, 24), initial_state=None)
    with pytest.raises(ValueError, match="pattern"):
        lin(randn(1, 4, 24), causal=False)
    with pytest.raises(TypeError, match="StateCache"):
        lin(randn(2, 1, 24), cache=cache)


def test_paper_citations():
    from attnzoo.core.info import Paper

    assert isinstance(azn.MultiheadAttention.paper, Paper) and azn.MultiheadAttention.paper.arxiv == "1706.03762"
    assert "Rotary" in azn.MultiheadAttention.rope_paper.title
