"""The content-sparse and approximate family beyond moba/quest/topk: each variant's fast path and reference
against its independent per-query definition (tests/variants/sparse_defs.py) on every pattern it claims,
GQA and lengths that are not multiples of its blocks; budgets at the edges; gradients; bad inputs."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import sparse_defs
import sparse_defs_retrieval
import torch
from harness import PATTERN_SHAPES, assert_reference_rule, qkv

import attnzoo as az


def _gates(q, seed=11):
    g = torch.Generator().manual_seed(seed)
    return {"gates": torch.rand(*q.shape[:3], 3, generator=g, dtype=q.dtype)}


def _no_inputs(q):
    return {}


def _own_block(p, pos, sk):
    start = pos // p["block_size"] * p["block_size"]
    return set(range(start, min(start + p["block_size"], sk)))


def _own_landmark_block(p, pos, sk):
    """The tokens of the query's block up to itself; a landmark query ignores its own key."""
    period = p["block_size"] + 1
    return set(range(pos // period * period, pos + 1)) - ({pos} if pos % period == period - 1 else set())


def _hyper_draws(attn, q, k, v, causal):
    plan = attn.plan(q, k, attn.prepare(q, k, v, causal, None, {}))
    return {"projections": plan.projections,
            "pieces": [(p.kind, p.q0, p.q1, p.k0, p.k1, p.samples) for p in plan.pieces]}


@dataclass
class Case:
    params: dict                                  # a small configuration, odd blocks
    define: Callable                              # sparse_defs function
    inputs: Callable = _no_inputs                 # q -> extra inputs
    all_params: Callable = None                   # sk -> params selecting everything
    all_inputs: Callable = None                   # q -> inputs under which select-all is full attention
    smallest: dict = field(default_factory=dict)  # params of the smallest budget
    own: Callable = None                          # (params, pos, sk) -> keys of the query's own block it may read
    bad: tuple = ()                               # (params, exception, message)
    shapes: dict = field(default_factory=dict)    # pattern -> (causal, Sq, Sk) where PATTERN_SHAPES do not fit
    shared_by_heads: bool = False                 # one choice for every head (the paper's routing)
    draws: Callable = None                        # (attn, q, k, v, causal) -> the random draws define needs
    positional: bool = False                      # the selection depends on positions only (combiner's own segment)


CASES = {
    "nsa": Case(
        params={"block_size": 6, "top_k": 4, "window": 5},
        define=sparse_defs.nsa,
        inputs=_gates,
        all_params=lambda sk: {"block_size": 6, "top_k": math.ceil(sk / 6), "window": 5},
        all_inputs=lambda q: {"gates": torch.tensor([0.0, 1.0, 0.0], dtype=q.dtype).expand(*q.shape[:3], 3)},
        smallest={"block_size": 6, "top_k": 1, "window": 5},
        own=_own_block,
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"block_size": 0}, ValueError, "'block_size' must be a positive int"),
             ({"window": -1}, ValueError, "'window' must be a non-negative int"),
             ({"top_k": 2.0}, TypeError, "'top_k' must be int")),
    ),
    "hip": Case(
        params={"block_size": 5, "top_k": 3},
        define=sparse_defs.hip,
        all_params=lambda sk: {"block_size": 5, "top_k": math.ceil(sk / 5)},
        smallest={"block_size": 5, "top_k": 1},
        own=_own_block,
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"block_size": -3}, ValueError, "'block_size' must be a positive int"),
             ({"top_k": None}, TypeError, "'top_k' must be int")),
    ),
    "tokenselect": Case(
        params={"top_k": 7, "vote": "group"},
        define=sparse_defs.tokenselect,
        all_params=lambda sk: {"top_k": sk},
        smallest={"top_k": 1},
        own=lambda p, pos, sk: {pos},
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"vote": "heads"}, ValueError, "'vote' must be 'group' or 'all'"),
             ({"vote": 1}, TypeError, "'vote' must be str")),
    ),
    "landmark": Case(
        params={"block_size": 5, "top_k": 3},
        define=sparse_defs.landmark,
        all_params=lambda sk: {"block_size": sk, "top_k": 1},   # no landmark fits: one block, full causal
        smallest={"block_size": 5, "top_k": 1},
        own=_own_landmark_block,
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"block_size": 0}, ValueError, "'block_size' must be a positive int")),
    ),
    "biformer": Case(
        params={"grid": (9, 10), "regions": (3, 2), "top_k": 2},
        define=sparse_defs.biformer,
        shapes={"noncausal_self": (False, 90, 90)},
        shared_by_heads=True,
        all_params=lambda sk: {"grid": (9, 10), "regions": (3, 2), "top_k": 6},
        smallest={"grid": (9, 10), "regions": (3, 2), "top_k": 1},
        own=lambda p, pos, sk: {t for t in range(90) if (t // 10 // 3, t % 10 // 5) == (pos // 10 // 3, pos % 10 // 5)},
        bad=(({"grid": (9, 10), "top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"grid": (9, 10), "regions": (2, 2)}, ValueError, r"regions=\(2, 2\) must divide grid=\(9, 10\)"),
             ({"grid": 90}, TypeError, "'grid' must be tuple or list or None"),
             ({"grid": (9, 0)}, ValueError, "'grid' must be None or \\(H, W\\)"),
             ({"regions": (3,)}, ValueError, "'regions' must be \\(rh, rw\\)")),
    ),
    "hyper": Case(
        params={"block_size": 6, "sample_size": 5, "lsh_bits": 3, "min_seq_len": 9, "seed": 1},
        define=sparse_defs.hyper,
        draws=_hyper_draws,
        all_params=lambda sk: {"block_size": sk, "sample_size": 5, "lsh_bits": 3, "min_seq_len": 9},
        bad=(({"block_size": 0}, ValueError, "'block_size' must be a positive int"),
             ({"sample_size": -1}, ValueError, "'sample_size' must be a non-negative int"),
             ({"lsh_bits": 0}, ValueError, r"'lsh_bits' must be an int in \[1, 30\]"),
             ({"min_seq_len": 0}, ValueError, "'min_seq_len' must be a positive int"),
             ({"seed": 1.5}, TypeError, "'seed' must be int")),
    ),
}
CASES.update({
    "retrieval_attention": Case(
        params={"top_k": 5, "sinks": 2, "window": 6, "index": "exact"},
        define=sparse_defs_retrieval.retrieval_attention,
        all_params=lambda sk: {"top_k": sk, "sinks": 2, "window": 6, "index": "exact"},
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"window": -1}, ValueError, "'window' must be a non-negative int"),
             ({"index": "ivf"}, ValueError, "'index' must be 'hnsw' or 'exact'"),
             ({"ef_search": 0}, ValueError, "'ef_search' must be a positive int")),
    ),
    "longheads": Case(
        params={"chunk_size": 6, "top_k": 4},
        define=sparse_defs_retrieval.longheads,
        all_params=lambda sk: {"chunk_size": 6, "top_k": math.ceil(sk / 6)},
        smallest={"chunk_size": 6, "top_k": 1},
        own=lambda p, pos, sk: _own_block({"block_size": p["chunk_size"]}, pos, sk),
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"chunk_size": 0}, ValueError, "'chunk_size' must be a positive int")),
    ),
    "ltri": Case(
        params={"chunk_size": 12, "max_span": 5, "top_k": 3, "baseline": None},
        define=sparse_defs_retrieval.ltri,
        all_params=lambda sk: {"chunk_size": sk, "max_span": 5, "top_k": 1},   # one chunk: full causal
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"chunk_size": 4, "max_span": 5}, ValueError, "max_span=5 must be at most chunk_size=4"),
             ({"baseline": 1.0}, ValueError, r"'baseline' must be None or a number in \[0, 1\)")),
    ),
    "combiner": Case(
        params={"block_size": 6, "pooling": "max"},
        define=sparse_defs_retrieval.combiner,
        positional=True,
        all_params=lambda sk: {"block_size": sk},
        smallest={"block_size": 1},
        own=lambda p, pos, sk: {pos},
        bad=(({"block_size": 0}, ValueError, "'block_size' must be a positive int"),
             ({"pooling": "min"}, ValueError, "'pooling' must be 'max' or 'mean'")),
    ),
})
NAMES = list(CASES)


def _shape(name, pattern):
    return CASES[name].shapes.get(pattern, PATTERN_SHAPES[pattern])


def _call(name, pattern, b=2, hq=4, hkv=2, d=8, seed=0, params=None):
    causal, sq, sk = _shape(name, pattern)
    q, k, v = qkv(b, hq, hkv, sq, sk, d, seed=seed)
    case = CASES[name]
    return az.get(name, **(params or case.params)), q, k, v, causal, case.inputs(q)


@pytest.mark.parametrize("pattern", list(PATTERN_SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_and_reference_equal_the_independent_definition(name, pattern):
    attn, q, k, v, causal, inputs = _call(name, pattern)
    if pattern not in attn.info.patterns:
        with pytest.raises(ValueError, match=pattern):
            attn(q, k, v, causal=causal, **inputs)
        return
    case = CASES[name]
    draws = case.draws(attn, q, k, v, causal) if case.draws else {}
    mask, expected = case.define(q, k, v, causal, attn.config, scale=8 ** -0.5, **inputs, **draws)
    assert torch.equal(attn.dense_mask(q.shape[2], k.shape[2], causal=causal, q=q, k=k, **inputs), mask)
    assert (attn.reference(q, k, v, causal=causal, **inputs) - expected).abs().max() < 1e-10
    out = attn(q, k, v, causal=causal, **inputs)
    assert out.shape == expected.shape and out.dtype == q.dtype
    assert (out - expected).abs().max() < 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_selections_are_per_batch_row_and_kv_head_unless_the_paper_shares_them(name):
    attn, q, k, v, causal, inputs = _call(name, next(p for p in PATTERN_SHAPES if p in az.get(name).info.patterns))
    sel = attn.selection(q, k, causal=causal, **inputs)
    assert sel.indices.shape[:3] == q.shape[:3]
    mask = attn.dense_mask(q.shape[2], k.shape[2], causal=causal, q=q, k=k, **inputs)
    if CASES[name].positional:                          # the keys read directly; the rest through summaries
        assert torch.equal(mask[0], mask[1]) and all(torch.equal(mask[:, 0], mask[:, h]) for h in range(1, 4))
        return
    assert not torch.equal(mask[0], mask[1])            # rows choose apart
    if CASES[name].shared_by_heads:                     # one routing for the layer, as the paper
        assert all(torch.equal(mask[:, 0], mask[:, h]) for h in range(1, 4))
    else:
        assert not torch.equal(mask[:, 0], mask[:, 2])  # kv heads choose apart


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].all_params])
def test_a_budget_that_selects_everything_is_full_attention(name):
    case = CASES[name]
    for pattern in az.get(name).info.patterns:
        causal, sq, sk = _shape(name, pattern)
        q, k, v = qkv(1, 4, 2, sq, sk, 8, seed=2)
        attn = az.get(name, **case.all_params(sk))
        inputs = case.all_inputs(q) if case.all_inputs else case.inputs(q)
        full = az.attention(q, k, v, variant="full", causal=causal)
        assert (attn(q, k, v, causal=causal, **inputs) - full).abs().max() < 1e-10
        assert (attn.reference(q, k, v, causal=causal, **inputs) - full).abs().max() < 1e-10


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].own])
def test_the_smallest_budget_still_reads_the_queries_own_block(name):
    case = CASES[name]
    for pattern in az.get(name).info.patterns:
        causal, sq, sk = _shape(name, pattern)
        q, k, v = qkv(1, 2, 1, sq, sk, 8, seed=5)
        attn = az.get(name, **case.smallest)
        mask = attn.dense_mask(sq, sk, causal=causal, q=q, k=k, **case.inputs(q))
        for i in range(sq):
            pos = i + sk - sq
            for h in range(2):
                keys = set(mask[0, h, i].nonzero().flatten().tolist())
                own = case.own(attn.config, pos, sk)
                assert keys and keys <= own and (pos in keys) == (pos in own), (pattern, i, h)
        assert torch.isfinite(attn(q, k, v, causal=causal, **case.inputs(q))).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_of_the_fast_path_equal_the_references(name):
    pattern = next(p for p in ("causal_cross", "noncausal_self", "causal_self") if p in az.get(name).info.patterns)
    attn, q, k, v, causal, inputs = _call(name, pattern, b=1)
    leaves = [q, k, v] + [t for t in inputs.values() if t.is_floating_point()]
    for t in leaves:
        t.requires_grad_(True)
    grads = torch.autograd.grad(attn(q, k, v, causal=causal, **inputs).square().sum(), leaves)
    ref = torch.autograd.grad(attn.reference(q, k, v, causal=causal, **inputs).square().sum(), leaves)
    for a, b in zip(grads, ref):
        assert a.abs().max() > 0 and (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_follows_flashattention_rule_against_the_definition(name, dtype):
    """Fast path in dtype vs float64 <= 2x the variant's own definition run on dtype inputs (both choose from
    the rounded q and k)."""
    pattern = next(p for p in ("causal_self", "noncausal_self") if p in az.get(name).info.patterns)
    attn, q, k, v, causal, inputs = _call(name, pattern, b=1, d=16, seed=7)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))   # representable in dtype: one choice in both
    assert_reference_rule(attn, q, k, v, causal, dtype, **inputs)


@pytest.mark.parametrize("name", NAMES)
def test_bad_parameters_raise_naming_them(name):
    for params, exc, message in CASES[name].bad:
        with pytest.raises(exc, match=message):
            az.get(name, **params)


@pytest.mark.parametrize("name", NAMES)
def test_info_cites_the_paper_and_declares_the_budget(name):
    info = az.get(name).info
    assert info.paper.title and info.paper.arxiv and info.family in ("sparse", "approx")
    assert type(az.get(name)).budget_param in {p.name for p in info.params}


# ---- nsa -----------------------------------------------------------------------------------------------


def test_nsa_needs_gates_to_attend_but_not_to_choose():
    attn, q, k, v, causal, inputs = _call("nsa", "causal_self")
    with pytest.raises(TypeError, match="missing required input 'gates'"):
        attn(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"'gates' must have shape \(B, H, Sq, 3\)"):
        attn(q, k, v, causal=True, gates=torch.zeros(2, 4, 77, 2, dtype=torch.float64))
    assert torch.equal(attn.dense_mask(77, 77, causal=True, q=q, k=k),
                       attn.dense_mask(77, 77, causal=True, q=q, k=k, **inputs))


def test_nsa_selection_is_shared_by_a_gqa_group_and_forces_first_previous_own():
    attn, q, k, v, causal, inputs = _call("nsa", "causal_self")
    sel = attn.selection(q, k, causal=True)
    assert torch.equal(sel.indices[:, 0], sel.indices[:, 1]) and torch.equal(sel.indices[:, 2], sel.indices[:, 3])
    for i in range(77):
        own = i // 6
        chosen = set(sel.indices[0, 0, i].tolist()) - {-1}
        assert {own, max(own - 1, 0), 0} <= chosen and len(chosen) == min(4, own + 1)


def test_nsa_matches_fla_naive_nsa():
    """fla's naive compression, top-k and selection (float32) on the same mean-pooled blocks; optional."""
    naive = pytest.importorskip("fla.ops.nsa.naive")
    from attnzoo.variants.sparse.nsa import block_means

    q, k, v = qkv(1, 16, 1, 45, 45, 8, seed=4)
    gates = _gates(q)["gates"].clone()
    gates[..., 2] = 0  # fla's naive window branch needs flash-attn
    attn = az.get("nsa", block_size=6, top_k=4, window=5)
    t = lambda x: x.transpose(1, 2)  # fla's (B, T, H, D)
    k_cmp, v_cmp = block_means(k, 6), block_means(v, 6)
    o_cmp, _ = naive.naive_nsa_compression(t(q), t(k_cmp), t(v_cmp), 6, 8 ** -0.5)
    idx = naive.naive_nsa_topk(t(q), t(k_cmp), 4, 6, 8 ** -0.5)             # (B, T, Hkv, S)
    o_slc = naive.naive_nsa_selection(t(q), t(k), t(v), idx, 6, 8 ** -0.5)
    ours = attn.selection(q, k, causal=True).indices[:, ::16].transpose(1, 2)
    assert [set(r) - {-1} for r in ours.reshape(-1, 4).tolist()] == [set(r) - {-1} for r in idx.reshape(-1, 4).tolist()]
    expected = gates[..., :1] * t(o_cmp).double() + gates[..., 1:2] * t(o_slc).double()
    assert (attn(q, k, v, causal=True, gates=gates) - expected).abs().max() < 1e-5


# ---- hip -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_hip_reads_top_k_distinct_blocks_its_own_among_them(causal):
    q, k, v = qkv(1, 2, 2, 83, 83, 8, seed=9)
    sel = az.get("hip", block_size=4, top_k=5).selection(q, k, causal=causal)
    for i in range(83):
        own, seen = i // 4, (i // 4 + 1 if causal else 21)
        for h in range(2):
            chosen = [b for b in sel.indices[0, h, i].tolist() if b >= 0]
            assert len(set(chosen)) == len(chosen) == min(5, seen) and own in chosen and max(chosen) < seen


def test_hip_finds_a_far_block_whose_keys_match_the_query():
    """Attention locality: a run of keys aligned with the query, far from it, is found by the tree search."""
    q, k, v = qkv(1, 1, 1, 1, 256, 16, seed=3)
    attn, run = az.get("hip", block_size=4, top_k=4), {10, 11, 12, 13}
    k = k * 0.1
    assert not run & set(attn.selection(q, k, causal=True).indices[0, 0, 0].tolist())
    k[0, 0, 40:56] = 3 * q[0, 0, 0]  # blocks 10-13 of 4 keys
    assert len(run & set(attn.selection(q, k, causal=True).indices[0, 0, 0].tolist())) >= 2


# ---- tokenselect ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["causal_cross", "noncausal_self"])
def test_tokenselect_layer_wide_vote_equals_its_independent_definition(pattern):
    attn, q, k, v, causal, _ = _call("tokenselect", pattern, params={"top_k": 5, "vote": "all"})
    mask, expected = sparse_defs.tokenselect(q, k, v, causal, attn.config, scale=8 ** -0.5)
    assert torch.equal(attn.dense_mask(q.shape[2], k.shape[2], causal=causal, q=q, k=k), mask)
    assert torch.equal(mask[:, 0], mask[:, 3])  # one choice for every head
    assert (attn(q, k, v, causal=causal) - expected).abs().max() < 1e-10


def test_tokenselect_votes_are_normalised_per_head():
    """One head sure of key 3 loses to three heads that lean to key 5: each head has one vote to spread."""
    from attnzoo.variants.sparse.tokenselect import soft_votes

    probs = torch.zeros(1, 4, 1, 8)
    probs[0, 0, 0, 3] = 1.0
    probs[0, 1:, 0, 5] = 0.6
    probs[0, 1:, 0, 6] = 0.4
    assert soft_votes(probs, 4)[0, 0, 0].argmax() == 5 and soft_votes(probs, 2).shape == (1, 2, 1, 8)
    with pytest.raises(ValueError, match="heads=3 must divide the 4 query heads"):
        soft_votes(probs, 3)


# ---- landmark ------------------------------------------------------------------------------------------


def test_landmark_training_form_reads_every_block_and_its_weights_sum_to_one():
    attn, q, k, v, causal, _ = _call("landmark", "causal_self", params={"block_size": 4, "top_k": 100})
    mask, expected = sparse_defs.landmark(q, k, v, True, attn.config, scale=8 ** -0.5)
    assert (attn(q, k, v, causal=True) - expected).abs().max() < 1e-10
    assert (attn.reference(q, k, v, causal=True) - expected).abs().max() < 1e-10
    ones = torch.ones_like(v)
    assert (attn(q, k, ones, causal=True) - 1).abs().max() < 1e-12


def test_landmark_a_block_is_read_through_its_landmark():
    """Raising one landmark's score moves weight onto its block's tokens, not onto the landmark's value."""
    q, k, v = qkv(1, 1, 1, 1, 30, 8, seed=1)
    attn = az.get("landmark", block_size=4, top_k=2)       # period 5: landmarks at 4, 9, 14, 19, 24
    v = torch.zeros_like(v)
    v[0, 0, 10:14, 0] = 1.0                                  # block 2's tokens
    v[0, 0, 14, 0] = 100.0                                   # its landmark's value is never used
    k[0, 0, 14] = 4 * q[0, 0, 0]
    assert set(attn.selection(q, k, causal=True).indices[0, 0, 0].tolist()) == {2, 5}
    assert 0.9 < attn(q, k, v, causal=True)[0, 0, 0, 0] < 1.0


# ---- biformer ------------------------------------------------------------------------------------------


def test_biformer_refuses_a_grid_that_does_not_hold_the_sequence():
    q, k, v = qkv(1, 2, 1, 90, 90, 8)
    with pytest.raises(ValueError, match=r"grid=\(9, 11\) holds 99 tokens, but Sq = Sk = 90"):
        az.get("biformer", grid=(9, 11), regions=(3, 1))(q, k, v)
    with pytest.raises(ValueError, match=r"needs grid=\(H, W\)"):
        az.get("biformer")(q, k, v)
    with pytest.raises(ValueError, match="cannot serve the causal_self pattern"):
        az.get("biformer", grid=(9, 10), regions=(3, 2))(q, k, v, causal=True)


def test_biformer_routes_a_query_region_to_the_region_its_keys_match():
    q, k, v = qkv(1, 2, 2, 36, 36, 8, seed=6)
    attn = az.get("biformer", grid=(6, 6), regions=(2, 2), top_k=2)   # regions of 3 x 3 tokens
    region_of = lambda t: (t // 6 // 3) * 2 + (t % 6) // 3
    k = k * 0.01
    for t in range(36):
        if region_of(t) == 3:                                          # bottom-right region's keys follow
            k[0, :, t] = q[0, :, 0] * 5                                # the first query (region 0)
    sel = attn.selection(q, k)
    assert {region_of(t) for t in sel.indices[0, 0, 0].tolist()} == {0, 3}


# ---- hyper: what the paper proves about its estimator, with fixed seeds -------------------------------


@pytest.fixture(scope="module")
def hyper_draws():
    """Estimates of one small problem under seeds 0..299, for 4 and 64 samples: row sums D~, numerators
    N~, the sampling variance of D~ given each draw's heavy blocks, and the output's relative error."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 600 tiny problems: two OpenMP threads only spin against each other
    try:
        return _hyper_runs()
    finally:
        torch.set_num_threads(threads)


def _hyper_runs():
    from attnzoo.core.registry import variant_class

    q, k, v = qkv(1, 1, 1, 8, 40, 8, seed=3)
    e = torch.exp(8 ** -0.5 * q[0, 0] @ k[0, 0].T)                     # (Sq, Sk) exact e^{s_ij}
    exact = az.attention(q, k, v)
    runs = {}
    for m in (4, 64):
        rows, nums, variances, errors = [], [], [], []
        for seed in range(300):
            attn = variant_class("hyper")(block_size=8, sample_size=m, lsh_bits=2, seed=seed)
            call = attn.prepare(q, k, v, False, None, {})
            plan = attn.plan(q, k, call)
            out, log_rows = attn.estimate_from(plan, q, k, v, call)
            rows.append(log_rows.exp()[0, 0])
            nums.append((out * log_rows.exp().unsqueeze(-1))[0, 0])
            piece = plan.pieces[0]
            light = e.masked_fill(piece.q_block[0, 0].view(-1, 1) == piece.k_block[0, 0].view(1, -1), 0)
            variances.append((40 * light.square().sum(-1) - light.sum(-1).square()) / m)
            errors.append(float((out - exact).norm() / exact.norm()))
        runs[m] = torch.stack(rows), torch.stack(nums), torch.stack(variances), sum(errors) / len(errors)
    return e.sum(-1), e @ v[0, 0], runs


def test_hyper_row_sum_and_numerator_estimates_are_unbiased(hyper_draws):
    row_sum, numerator, runs = hyper_draws
    for m, (rows, nums, _, _) in runs.items():
        n = rows.shape[0]
        assert ((rows.mean(0) - row_sum) / (rows.std(0) / n ** 0.5)).abs().max() < 4.5, m
        assert ((nums.mean(0) - numerator) / (nums.std(0) / n ** 0.5)).abs().max() < 4.5, m


def test_hyper_row_sum_variance_is_the_uniform_sampling_variance(hyper_draws):
    """Var(D~) = E over heavy blocks of (n sum_light e^2 - (sum_light e)^2) / m: the concentration the paper's
    ApproxD bound rests on (with replacement, weight n / m)."""
    _, _, runs = hyper_draws
    for m, (rows, _, variances, _) in runs.items():
        ratio = rows.var(0) / variances.mean(0)
        assert 0.7 < float(ratio.min()) and float(ratio.max()) < 1.4, (m, ratio)
        assert 0.85 < float(rows.var(0).sum() / variances.mean(0).sum()) < 1.18, m


def test_hyper_error_falls_like_one_over_root_samples(hyper_draws):
    _, _, runs = hyper_draws
    assert runs[64][3] < runs[4][3] / 2.5           # 16x the samples: about 4x less error


def test_hyper_without_samples_reads_its_block_and_the_causal_base_reads_itself():
    q, k, v = qkv(1, 2, 1, 45, 70, 8, seed=8)
    attn = az.get("hyper", block_size=7, sample_size=0, lsh_bits=3)
    mask = attn.dense_mask(45, 70, q=q, k=k)
    assert (mask.sum(-1) == 7).all()                                  # 70 keys in 10 blocks of 7
    draws = _hyper_draws(attn, q, k, v, False)
    _, expected = sparse_defs.hyper(q, k, v, False, attn.config, 8 ** -0.5, **draws)
    assert (attn(q, k, v) - expected).abs().max() < 1e-10
    q, k, v = qkv(1, 2, 1, 40, 40, 8, seed=8)
    attn = az.get("hyper", block_size=1, sample_size=0, lsh_bits=2, min_seq_len=1)
    mask = attn.dense_mask(40, 40, causal=True, q=q, k=k)
    assert mask.diagonal(dim1=-2, dim2=-1).all() and torch.isfinite(attn(q, k, v, causal=True)).all()


@pytest.mark.parametrize("block,sk", [(1, 37), (16, 100), (64, 64), (128, 300)])
def test_selection_density_counts_the_keys_of_its_blocks(block, sk):
    """density() from block indices (no per-key expansion) == the share of keys token_indices() lists."""
    from attnzoo.core.selection import Selection

    nb = -(-sk // block)
    g = torch.Generator().manual_seed(block)
    idx = torch.randint(-1, nb, (2, 3, 11, 4), generator=g)
    idx = torch.where(torch.arange(4) < 3, idx, nb - 1)          # the last, partial block in every row
    sel = Selection(idx, block, sk)
    tok = sel.token_indices()
    # duplicate block ids count twice in both (a selection holds each block once; the count must still agree)
    assert sel.density() == pytest.approx(float((tok >= 0).sum()) / (2 * 3 * 11 * sk), abs=1e-12)
