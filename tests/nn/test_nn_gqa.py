"""MQA, GQA and GQA's mean-pooling conversion of a multi-head checkpoint, against plain definitions."""
from __future__ import annotations

import pytest
import torch

import attnzoo.nn as azn
from nn_refs import F64, assert_every_parameter_learns, decode_pieces, max_err, mha, randn

TOL = 1e-10


def mha_module(dim=24, heads=6, kv_heads=None, seed=0, **kw):
    torch.manual_seed(seed)
    return azn.MultiheadAttention(dim, heads, kv_heads, **kw).to(F64)


@pytest.mark.parametrize("cls,kw", [(azn.MultiQueryAttention, {}), (azn.GroupedQueryAttention, {"kv_heads": 2}),
                                    (azn.GroupedQueryAttention, {"kv_heads": 3})])
def test_shared_kv_heads_equal_the_plain_definition(cls, kw):
    torch.manual_seed(0)
    m = cls(24, 6, **kw).to(F64)
    x = randn(2, 9, 24, seed=1)
    y, cache = m(x)
    assert max_err(y, mha(m, x)) <= TOL
    assert cache.k.shape[1] == m.kv_heads == kw.get("kv_heads", 1)
    pieces, _ = decode_pieces(m, x, (4, 5, 6, 7, 8))
    assert max_err(pieces, y) <= TOL
    assert_every_parameter_learns(m, (y ** 2).mean())


def test_sizes_against_multihead():
    dim, heads, d = 576, 9, 64
    full = azn.MultiheadAttention(dim, heads)
    gqa = azn.GroupedQueryAttention(dim, heads, 3)
    mqa = azn.MultiQueryAttention(dim, heads)
    assert full.kv_bytes_per_token(torch.bfloat16) == 2 * 9 * d * 2
    assert gqa.kv_bytes_per_token(torch.bfloat16) == 2 * 3 * d * 2
    assert mqa.kv_bytes_per_token(torch.bfloat16) == 2 * 1 * d * 2
    assert full.num_parameters() == 4 * dim * dim
    assert gqa.num_parameters() == 2 * dim * dim + 2 * dim * 3 * d
    assert mqa.num_parameters() == 2 * dim * dim + 2 * dim * d


def test_papers():
    assert azn.GroupedQueryAttention.paper.title.startswith("GQA: Training Generalized Multi-Query")
    assert azn.MultiQueryAttention.paper.title == "Fast Transformer Decoding: One Write-Head is All You Need"


@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6])
def test_conversion_mean_pools_key_and_value_heads(kv_heads):
    m = mha_module(bias=True)
    with torch.no_grad():
        m.k_proj.bias.normal_()
        m.v_proj.bias.normal_()
    new = azn.gqa_from_mha(m, kv_heads)
    assert type(new) is (azn.MultiQueryAttention if kv_heads == 1 else azn.GroupedQueryAttention)
    assert new.kv_heads == kv_heads and new.heads == 6
    group = 6 // kv_heads
    for name in ("k_proj", "v_proj"):
        w = getattr(m, name).weight.detach()  # (6 * d, dim): rows of head i are i*d .. (i+1)*d - 1
        b = getattr(m, name).bias.detach()
        d = m.head_dim
        for j in range(kv_heads):
            want_w = sum(w[(j * group + i) * d:(j * group + i + 1) * d] for i in range(group)) / group
            want_b = sum(b[(j * group + i) * d:(j * group + i + 1) * d] for i in range(group)) / group
            assert max_err(getattr(new, name).weight[j * d:(j + 1) * d], want_w) <= 1e-14
            assert max_err(getattr(new, name).bias[j * d:(j + 1) * d], want_b) <= 1e-14
    for name in ("q_proj", "o_proj"):
        assert torch.equal(getattr(new, name).weight, getattr(m, name).weight)
    assert next(new.parameters()).dtype == F64


def test_conversion_is_exact_when_the_heads_of_a_group_agree():
    """Mean-pooling identical heads changes nothing: the converted module computes the same function."""
    m = mha_module(variant="sliding_window", window=3)
    d = m.head_dim
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            w = getattr(m, name).weight
            for h in range(6):
                w[h * d:(h + 1) * d] = w[(h // 3) * 3 * d:((h // 3) * 3 + 1) * d]
    new = azn.gqa_from_mha(m, 2)
    x = randn(2, 8, 24, seed=2)
    assert max_err(new(x)[0], m(x)[0]) <= TOL
    assert new.variant == "sliding_window" and new.params == {"window": 3}


def test_conversion_of_a_gqa_module_and_of_gla_gates():
    m = mha_module(kv_heads=6, variant="gla", chunk_size=4)
    two = azn.gqa_from_mha(m, 2)
    one = azn.gqa_from_mha(two, 1)
    assert isinstance(one, azn.MultiQueryAttention) and one.learned["g"].up.weight.shape == (4, 16)
    up = m.learned["g"].up.weight.detach().view(6, 4, 16)
    assert max_err(one.learned["g"].up.weight, up.mean(0)) <= 1e-14
    x = randn(1, 6, 24, seed=3)
    assert one(x)[0].shape == (1, 6, 24)


def test_conversion_errors():
    m = mha_module(kv_heads=3)
    with pytest.raises(ValueError, match="kv_heads"):
        azn.gqa_from_mha(m, 2)
    with pytest.raises(ValueError, match="kv_heads"):
        azn.gqa_from_mha(m, 6)
    with pytest.raises(TypeError, match="kv_heads"):
        azn.gqa_from_mha(m, 1.0)
    with pytest.raises(TypeError, match="module"):
        azn.gqa_from_mha(torch.nn.Linear(3, 3), 1)
    with pytest.raises(ValueError, match="kv_heads"):
        azn.MultiQueryAttention(24, 6, kv_heads=2)
    with pytest.raises(TypeError, match="kv_heads"):
        azn.GroupedQueryAttention(24, 6, None)
