"""Head structures against their definitions written plainly (float64): Cross-Layer Attention, Shared
Attention, weighted GQA, a mixture of h-1 heads, the decoupled head dimension, DiffQKV, TPLA, hybrid
heads and CoCA; cache == recomputation, sizes, gradients, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo.nn as azn
from attnzoo.nn.bottleneck import DecoupledHeadAttention
from attnzoo.nn.cla import CrossLayerAttention
from attnzoo.nn.coca import CollinearConstrainedAttention
from attnzoo.nn.diffqkv import DiffQKVAttention
from attnzoo.nn.hybrid import HybridCache, HybridHeadAttention
from attnzoo.nn.mae import MixtureOfHeadsMinusOne
from attnzoo.nn.shared import SharedAttention, SharedWeightsCache
from attnzoo.nn.tpla import TPLA, hadamard
from attnzoo.nn.wgqa import WeightedGroupedQueryAttention
from nn_refs import (F64, allowed, assert_every_parameter_learns, decode_pieces, gla, heads_of, lin, max_err, mha,
                     randn, rmsnorm, rope, weights)

TOL = 1e-10


def made(cls, *args, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(*args, **kw).to(F64)


def attend(q, k, v, causal=True):
    """Dense softmax attention with K/V heads repeated over their query groups, scale 1/sqrt(D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return weights(q, k, q.shape[-1] ** -0.5, allowed(q.shape[2], k.shape[2], causal)) @ v


def merge_heads(o):
    b, h, s, d = o.shape
    return o.transpose(1, 2).reshape(b, s, h * d)


# ---- Cross-Layer Attention -----------------------------------------------------------------------

def test_cla_reads_the_owning_layers_keys_and_values():
    owner = made(CrossLayerAttention, 24, 6, 2)
    reader = made(CrossLayerAttention, 24, 6, 2, owns_kv=False, seed=1)
    x_owner, x_reader = randn(2, 9, 24, seed=2), randn(2, 9, 24, seed=3)
    _, kv = owner(x_owner)
    y, same = reader(x_reader, kv=kv)
    assert same is kv and reader.k_proj is None and reader.v_proj is None
    pos = torch.arange(9)
    q = rope(heads_of(lin(reader.q_proj, x_reader), 2, 9, 6, 4), pos)
    k = rope(heads_of(lin(owner.k_proj, x_owner), 2, 9, 2, 4), pos)
    v = heads_of(lin(owner.v_proj, x_owner), 2, 9, 2, 4)
    assert max_err(y, lin(reader.o_proj, merge_heads(attend(q, k, v)))) <= TOL
    # decoding: the owner first, then the reader on the owner's cache, piece by piece
    outs, cache = [], None
    for a, b in ((0, 4), (4, 5), (5, 9)):
        _, cache = owner(x_owner[:, a:b], cache=cache)
        outs.append(reader(x_reader[:, a:b], kv=cache)[0])
    assert max_err(torch.cat(outs, 1), y) <= TOL
    assert owner.kv_bytes_per_token(torch.bfloat16) == 2 * 2 * 4 * 2 and reader.kv_bytes_per_token() == 0
    assert reader.num_parameters() == 2 * 24 * 24
    assert_every_parameter_learns(reader, (y ** 2).mean())
    assert CrossLayerAttention.paper.arxiv == "2405.12981"


def test_cla_bad_input():
    owner, reader = made(CrossLayerAttention, 24, 6, 2), made(CrossLayerAttention, 24, 6, 2, owns_kv=False)
    x = randn(2, 3, 24)
    _, kv = owner(x)
    with pytest.raises(TypeError, match="kv must be the KVCache"):
        reader(x)
    with pytest.raises(ValueError, match="kv must be None"):
        owner(x, kv=kv)
    with pytest.raises(ValueError, match="keeps no cache"):
        reader(x, cache=kv, kv=kv)
    with pytest.raises(ValueError, match="kv holds keys"):
        reader(randn(2, 4, 24), kv=kv)
    with pytest.raises(ValueError, match="recurrent"):
        CrossLayerAttention(24, 6, variant="gla")
    with pytest.raises(TypeError, match="owns_kv"):
        CrossLayerAttention(24, 6, owns_kv=1)


# ---- Shared Attention ------------------------------------------------------------------------------

def test_shared_attention_reuses_the_first_layers_weights_with_its_own_values():
    first = made(SharedAttention, 24, 6, 3)
    later = made(SharedAttention, 24, 6, 3, computes_weights=False, seed=1)
    x1, x2 = randn(2, 8, 24, seed=2), randn(2, 8, 24, seed=3)
    y1, src = first(x1)
    assert isinstance(src, SharedWeightsCache) and max_err(y1, mha(first, x1)) <= TOL
    y2, own = later(x2, weights_from=src)
    pos = torch.arange(8)
    q = rope(heads_of(lin(first.q_proj, x1), 2, 8, 6, 4), pos)
    k = rope(heads_of(lin(first.k_proj, x1), 2, 8, 3, 4), pos)
    a = weights(q, k.repeat_interleave(2, 1), 0.5, allowed(8, 8))  # the shared map (B, H, S, S)
    v = heads_of(lin(later.v_proj, x2), 2, 8, 3, 4).repeat_interleave(2, 1)
    assert max_err(y2, lin(later.o_proj, merge_heads(a @ v))) <= TOL
    assert own.k.shape[-1] == 0 and own.v.shape == (2, 3, 8, 4)
    outs, c1, c2 = [], None, None
    for s0, s1 in ((0, 3), (3, 4), (4, 8)):
        _, c1 = first(x1[:, s0:s1], cache=c1)
        y, c2 = later(x2[:, s0:s1], cache=c2, weights_from=c1)
        outs.append(y)
    assert max_err(torch.cat(outs, 1), y2) <= TOL
    assert later.kv_elements_per_token() == 12 and first.kv_elements_per_token() == 24
    assert later.num_parameters() == 24 * 12 + 24 * 24
    assert_every_parameter_learns(later, (y2 ** 2).mean())
    assert SharedAttention.paper.title.startswith("Beyond KV Caching")


def test_shared_attention_bad_input():
    first, later = made(SharedAttention, 24, 6, 3), made(SharedAttention, 24, 6, 3, computes_weights=False)
    _, src = first(randn(2, 5, 24))
    with pytest.raises(TypeError, match="weights_from"):
        later(randn(2, 5, 24))
    with pytest.raises(ValueError, match="weights_from holds queries"):
        later(randn(2, 4, 24), weights_from=src)
    with pytest.raises(ValueError, match="weights_from must be None"):
        first(randn(2, 5, 24), weights_from=src)
    with pytest.raises(ValueError, match="recurrent"):
        SharedAttention(24, 6, variant="gla")


# ---- weighted GQA ------------------------------------------------------------------------------------

def test_weighted_gqa_merges_heads_by_learned_weights():
    m = made(WeightedGroupedQueryAttention, 24, 6, 2)
    with torch.no_grad():
        m.k_proj.w.uniform_(-1, 1)
        m.v_proj.w.uniform_(-1, 1)
    x = randn(2, 7, 24, seed=1)
    y, cache = m(x)

    def merged(layer):
        w = layer.weight.view(6, 4, 24) * layer.w.view(6, 1, 1)
        return w.view(2, 3, 4, 24).sum(1).reshape(8, 24)

    pos = torch.arange(7)
    q = rope(heads_of(lin(m.q_proj, x), 2, 7, 6, 4), pos)
    k = rope(heads_of(F.linear(x, merged(m.k_proj)), 2, 7, 2, 4), pos)
    v = heads_of(F.linear(x, merged(m.v_proj)), 2, 7, 2, 4)
    assert max_err(y, lin(m.o_proj, merge_heads(attend(q, k, v)))) <= TOL
    assert cache.k.shape == (2, 2, 7, 4)
    plain = m.merged()
    assert type(plain) is azn.GroupedQueryAttention and max_err(plain(x)[0], y) <= TOL
    assert max_err(decode_pieces(m, x, [3, 4])[0], y) <= TOL
    assert m.kv_bytes_per_token() == plain.kv_bytes_per_token() == 2 * 2 * 4 * 8
    assert m.num_parameters() == plain.num_parameters() + 2 * (24 * 16) + 2 * 6
    assert_every_parameter_learns(m, (y ** 2).mean())


def test_weighted_gqa_starts_as_gqa_mean_pooling_and_bad_input():
    full = made(azn.MultiheadAttention, 24, 6)
    m = WeightedGroupedQueryAttention.from_mha(full, 3)
    x = randn(2, 5, 24)
    assert max_err(m(x)[0], azn.gqa_from_mha(full, 3)(x)[0]) <= TOL
    with pytest.raises(TypeError, match="multi-head"):
        WeightedGroupedQueryAttention.from_mha(made(azn.GroupedQueryAttention, 24, 6, 2), 1)
    with pytest.raises(ValueError, match="heads % kv_heads"):
        WeightedGroupedQueryAttention(24, 6, 4)
    with pytest.raises(ValueError, match="learns per-KV-head gates"):
        WeightedGroupedQueryAttention(24, 6, 2, variant="gla")
    assert WeightedGroupedQueryAttention.paper.title == "Weighted Grouped Query Attention in Transformers"


# ---- a mixture of h-1 heads ------------------------------------------------------------------------------

def test_mixture_of_h_minus_one_heads_is_the_gated_mixture_of_dropped_head_experts():
    m = made(MixtureOfHeadsMinusOne, 24, 4, 2)
    with torch.no_grad():
        m.gate.weight.normal_(0, 1)
    x = randn(2, 6, 24, seed=1)
    y, cache = m(x)
    g = torch.softmax(lin(m.gate, x), dim=-1)  # (B, S, h)
    want = 0
    for i in range(4):  # expert i: every head but i, scaled h / (h - 1)
        keep = torch.ones(2, 6, 4, dtype=F64)
        keep[..., i] = 0
        want = want + g[..., i:i + 1] * mha(m, x, head_gates=keep * 4 / 3)
    assert max_err(y, want) <= TOL
    assert max_err(decode_pieces(m, x, [2, 3])[0], y) <= TOL
    assert m.kv_elements_per_token() == 2 * 2 * 6 and m.num_parameters() == 24 * 24 * 2 + 2 * 24 * 12 + 24 * 4
    assert_every_parameter_learns(m, (y ** 2).mean())
    with pytest.raises(ValueError, match="heads must be >= 2"):
        MixtureOfHeadsMinusOne(24, 1)
    assert MixtureOfHeadsMinusOne.paper.title == "A Mixture of h-1 Heads is Better than h Heads"


# ---- decoupled head dimension (low-rank bottleneck) ---------------------------------------------------------

def test_decoupled_head_dimension_lifts_the_rank_of_each_heads_scores():
    x = randn(1, 20, 24, seed=1)
    wide = made(DecoupledHeadAttention, 24, 4, head_dim=16)
    usual = made(azn.MultiheadAttention, 24, 4)
    y, _ = wide(x)
    assert max_err(y, mha(wide, x)) <= TOL
    for m, rank in ((wide, 16), (usual, 6)):
        q = heads_of(lin(m.q_proj, x), 1, 20, 4, m.head_dim)[0, 0]
        k = heads_of(lin(m.k_proj, x), 1, 20, 4, m.head_dim)[0, 0]
        assert torch.linalg.matrix_rank(q @ k.T).item() == rank
    assert wide.score_rank_bound(20) == 16 and wide.score_rank_bound(8) == 8
    assert wide.num_parameters() == 4 * 24 * 64 and wide.kv_elements_per_token() == 2 * 64
    with pytest.raises(TypeError, match="head_dim"):
        DecoupledHeadAttention(24, 4, head_dim=None)
    assert DecoupledHeadAttention.paper.arxiv == "2002.07028"


# ---- DiffQKV ---------------------------------------------------------------------------------------------

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k_heads=st.sampled_from([1, 2, 4]), v_heads=st.sampled_from([1, 2, 4]), v_head_dim=st.integers(1, 5),
       s=st.integers(1, 8), causal=st.booleans())
def test_diffqkv_reads_its_own_key_and_value_heads(k_heads, v_heads, v_head_dim, s, causal):
    m = made(DiffQKVAttention, 16, 4, k_heads, v_heads, 4, v_head_dim)
    x = randn(2, s, 16, seed=s)
    y, cache = m(x, causal=causal)
    pos = torch.arange(s)
    q = rope(heads_of(lin(m.q_proj, x), 2, s, 4, 4), pos)
    k = rope(heads_of(lin(m.k_proj, x), 2, s, k_heads, 4), pos)
    v = heads_of(lin(m.v_proj, x), 2, s, v_heads, v_head_dim)
    mask = allowed(s, s, causal)
    outs = [weights(q[:, h:h + 1], k[:, h // (4 // k_heads)][:, None], 0.5, mask) @ v[:, h // (4 // v_heads)][:, None]
            for h in range(4)]
    assert max_err(y, lin(m.o_proj, merge_heads(torch.cat(outs, 1)))) <= TOL
    assert cache.k.shape == (2, k_heads, s, 4) and cache.v.shape == (2, v_heads, s, v_head_dim)
    assert m.kv_elements_per_token() == 4 * k_heads + v_head_dim * v_heads


def test_diffqkv_cache_sizes_gradients_and_bad_input():
    m = made(DiffQKVAttention, 24, 6, 1, 3, 4, 2)
    x = randn(2, 7, 24)
    y, _ = m(x)
    assert max_err(decode_pieces(m, x, [3, 4])[0], y) <= TOL
    assert m.kv_bytes_per_token(torch.bfloat16) == (4 + 6) * 2
    assert m.num_parameters() == 24 * 24 + 24 * 4 + 24 * 6 + 12 * 24
    assert_every_parameter_learns(m, (y ** 2).mean())
    for kwargs, match in ((dict(k_heads=4), "heads % k_heads"), (dict(k_heads=2, v_heads=3), "must divide"),
                          (dict(head_dim=3), "even"), (dict(v_heads=0), "v_heads")):
        args = dict(dim=24, heads=6, k_heads=1, v_heads=3, head_dim=4) | kwargs
        with pytest.raises(ValueError, match=match):
            DiffQKVAttention(**args)
    with pytest.raises(ValueError, match="cache holds keys"):
        m(x, cache=made(DiffQKVAttention, 24, 6, 3, 3, 4, 2)(x)[1])
    assert DiffQKVAttention.paper.title.startswith("Sigma")


# ---- TPLA ----------------------------------------------------------------------------------------------

def tpla_reference(m, x, rot=None):
    """Per shard p: softmax(scale (q_lat^(p) . c^(p) + q_R . k_R)) c^(p), mapped out by W_ov^(p), summed."""
    b, s, _ = x.shape
    r, hd, rd, p = m.kv_rank, m.head_dim, m.rope_dim, m.shards
    pos = torch.arange(s)
    a = lin(m.wkv_a, x)
    c, k_r = rmsnorm(a[..., :r], m.kv_norm.weight, m.eps), rope(a[..., r:], pos, m.rope_base)
    ukv = m.wkv_b.weight.view(m.heads, hd + m.v_head_dim, r)
    wq = m.wq.weight.view(m.heads, hd + rd, -1)
    wo = m.wo.weight.view(m.dim, m.heads, m.v_head_dim)
    y = 0
    for h in range(m.heads):
        q_c = x @ wq[h, :hd].T
        q_r = rope(x @ wq[h, hd:].T, pos, m.rope_base)
        q_lat = q_c @ ukv[h, :hd]  # (B, S, r)
        w_ov = wo[:, h] @ ukv[h, hd:]  # (dim, r)
        lat = c
        if rot is not None:
            q_lat, lat, w_ov = q_lat @ rot.T, c @ rot.T, w_ov @ rot.T
        for part in range(p):
            sl = slice(part * r // p, (part + 1) * r // p)
            scores = (q_lat[..., sl] @ lat[..., sl].transpose(1, 2) + q_r @ k_r.transpose(1, 2)) * m.scale
            att = torch.softmax(scores.masked_fill(~allowed(s, s), float("-inf")), dim=-1)
            y = y + (att @ lat[..., sl]) @ w_ov[:, sl].T
    return y


@pytest.mark.parametrize("shards,transform", [(1, "none"), (2, "none"), (4, "none"), (2, "hadamard")])
def test_tpla_shards_the_latent_and_equals_mla_when_merged(shards, transform):
    mla = made(azn.MLA, 24, 3, 8, 4, head_dim=6)
    with torch.no_grad():
        mla.kv_norm.weight.uniform_(0.5, 1.5)
    m = TPLA.from_mla(mla, shards, transform)
    x = randn(2, 7, 24, seed=1)
    y, _ = m(x)
    rot = hadamard(8, F64) if transform == "hadamard" else None
    assert max_err(y, tpla_reference(m, x, rot)) <= TOL
    assert max_err(m(x, merged=True)[0], mla(x)[0]) <= TOL
    if shards == 1:
        assert max_err(y, mla(x)[0]) <= TOL
    else:
        assert max_err(y, mla(x)[0]) > 1e-4  # shards > 1 approximate MLA
    assert max_err(decode_pieces(m, x, [3, 4])[0], y) <= TOL
    assert m.kv_elements_per_token_per_shard() == 8 // shards + 4 and m.kv_elements_per_token() == 12
    assert m.num_parameters() == mla.num_parameters()


def test_tpla_hadamard_is_orthonormal_and_bad_input():
    h = hadamard(8, F64)
    assert max_err(h @ h.T, torch.eye(8, dtype=F64)) <= TOL
    with pytest.raises(ValueError, match="divisible by shards"):
        TPLA(24, 3, 8, 4, shards=3)
    with pytest.raises(ValueError, match="power of 2"):
        TPLA(24, 3, 12, 4, shards=2, transform="hadamard")
    with pytest.raises(ValueError, match="transform"):
        TPLA(24, 3, 8, 4, transform="pca")
    with pytest.raises(TypeError, match="mla must be"):
        TPLA.from_mla(azn.MultiheadAttention(24, 3), 2)
    assert TPLA.paper.title.startswith("TPLA")


# ---- hybrid heads ----------------------------------------------------------------------------------------

def test_hybrid_heads_average_normalised_attention_and_recurrent_paths():
    m = made(HybridHeadAttention, 24, 2, 2, head_dim=6)
    with torch.no_grad():
        m.beta_attn.uniform_(0.5, 1.5)
        m.beta_rec.uniform_(0.5, 1.5)
    x = randn(2, 7, 24, seed=1)
    y, cache = m(x)
    attn, rec = mha(m.attn_path, x), gla(m.rec_path, x)
    want = (m.beta_attn * rmsnorm(attn, m.attn_norm.weight, 1e-6)
            + m.beta_rec * rmsnorm(rec, m.rec_norm.weight, 1e-6)) / 2
    assert max_err(y, want) <= TOL
    assert isinstance(cache, HybridCache) and cache.length == 7
    assert max_err(decode_pieces(m, x, [3, 4, 5, 6])[0], y) <= TOL  # single tokens take the recurrent step
    assert m.kv_elements_per_token() == 2 * 2 * 6 and m.state_bytes() == 2 * 6 * 6 * 8
    assert m.cache_bytes(10) == 10 * 24 * 8 + m.state_bytes()
    assert_every_parameter_learns(m, (y ** 2).mean())
    with pytest.raises(ValueError, match="rec_variant"):
        HybridHeadAttention(24, 2, 2, rec_variant="full")
    with pytest.raises(ValueError, match="attn_variant"):
        HybridHeadAttention(24, 2, 2, attn_variant="gla")
    with pytest.raises(TypeError, match="HybridCache"):
        m(x, cache=cache.kv)
    assert HybridHeadAttention.paper.title.startswith("Hymba") and HybridHeadAttention.also.title.startswith("Falcon")


# ---- CoCA ---------------------------------------------------------------------------------------------

def test_coca_scores_are_the_collinear_form_written_plainly():
    m = made(CollinearConstrainedAttention, 24, 6, 3)
    x = randn(2, 8, 24, seed=1)
    y, cache = m(x)
    pos = torch.arange(8)
    q = heads_of(lin(m.q_proj, x), 2, 8, 6, 4)
    t = heads_of(lin(m.k_proj, x), 2, 8, 3, 4)
    t = torch.relu((t[..., :2] + t[..., 2:]) / 2)
    t = torch.cat([t, t], dim=-1).repeat_interleave(2, dim=1)
    q_rot, t_rot = rope(q, pos), rope(t, pos)
    scores = torch.einsum("bhmd,bhnd->bhmn", q * q_rot, t_rot) / 2.0  # sum_d q_d RoPE(q)_d RoPE(t)_d / sqrt(4)
    att = torch.softmax(scores.masked_fill(~allowed(8, 8), float("-inf")), dim=-1)
    v = heads_of(lin(m.v_proj, x), 2, 8, 3, 4).repeat_interleave(2, dim=1)
    assert max_err(y, lin(m.o_proj, merge_heads(att @ v))) <= TOL
    assert max_err(decode_pieces(m, x, [3, 4])[0], y) <= TOL
    assert m.kv_elements_per_token() == 2 * 3 * 4
    assert_every_parameter_learns(m, (y ** 2).mean())
    with pytest.raises(ValueError, match="rope must be True"):
        CollinearConstrainedAttention(24, 6, rope=False)
    with pytest.raises(ValueError, match="cache holds keys"):
        m(x, cache=made(CollinearConstrainedAttention, 24, 6, 2)(x)[1])
    assert CollinearConstrainedAttention.paper.arxiv == "2309.08646"
