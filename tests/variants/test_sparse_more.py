"""routing, recycled, dma, minference and seer under the sparse family's contract (the checks of
test_sparse_family.py, run over these variants' cases against sparse_defs_more.py), then what is particular
to each: k-means state, the recycled step structure across calls, dma's learned mask, MInference's offline
search and SeerAttention's self-distillation on real SmolLM2 activations."""
from __future__ import annotations

import json
import math

import pytest
import sparse_defs_more as defs
import test_sparse_family as contract
import torch
from harness import PATTERN_SHAPES, qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sparse_family import Case

import attnzoo as az

_SK_OF_SQ = {sq: sk for _, sq, sk in PATTERN_SHAPES.values()}


def _dt(q, fill=None):
    """dma's dynamic mask for the contract's calls (2 kv heads, Sk of the pattern): distinct values exact in
    bfloat16 and float16 (k / 16), so rounding never reorders the keys."""
    b, sk = q.shape[0], _SK_OF_SQ[q.shape[2]]
    if fill is not None:
        return {"dt": torch.full((b, 2, sk), fill, dtype=q.dtype)}
    g = torch.Generator().manual_seed(q.shape[2])
    return {"dt": torch.stack([torch.randperm(sk, generator=g) for _ in range(2 * b)]).view(b, 2, sk).to(q.dtype) / 16}


CASES = {
    "routing": Case(
        params={"clusters": 3, "top_k": 9, "kmeans_steps": 2},
        define=defs.routing,
        all_params=lambda sk: {"clusters": 3, "top_k": sk},
        bad=(({"clusters": 0}, ValueError, "'clusters' must be a positive int"),
             ({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"kmeans_steps": -1}, ValueError, "'kmeans_steps' must be a non-negative int"),
             ({"top_k": 2.0}, TypeError, "'top_k' must be int")),
    ),
    "recycled": Case(
        params={"top_k": 5, "stride": 4},
        define=defs.recycled,
        all_params=lambda sk: {"top_k": sk, "stride": 4},
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"stride": 0}, ValueError, "'stride' must be a positive int")),
    ),
    "dma": Case(
        params={"top_k": 7},
        define=defs.dma,
        inputs=_dt,
        all_params=lambda sk: {"top_k": sk},
        all_inputs=lambda q: _dt(q, fill=0.0),
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"top_k": "all"}, TypeError, "'top_k' must be int")),
    ),
    "minference": Case(
        params={"budget": 20, "heads": ("vertical_slash", 0.5), "block_size": 6, "last_q": 8},
        define=defs.minference,
        all_params=lambda sk: {"budget": 6 * math.ceil(sk / 6), "heads": ("block_sparse", 0.0), "block_size": 6},
        smallest={"budget": 1, "heads": ("block_sparse", 0.0), "block_size": 6},
        own=lambda p, pos, sk: set(range(pos // 6 * 6, min(pos // 6 * 6 + 6, sk))),
        bad=(({"budget": 0}, ValueError, "'budget' must be a positive int"),
             ({"heads": ("diagonal", 0.5)}, ValueError, "'heads' must be \\(pattern, share\\)"),
             ({"heads": ("a_shape", 1.5)}, ValueError, "share a float in \\[0, 1\\]"),
             ({"heads": "a_shape"}, TypeError, "'heads' must be tuple or list"),
             ({"block_size": 0}, ValueError, "'block_size' must be a positive int")),
    ),
    "seer": Case(
        params={"block_size": 6, "top_k": 3},
        define=defs.seer,
        all_params=lambda sk: {"block_size": 6, "top_k": math.ceil(sk / 6)},
        smallest={"block_size": 6, "top_k": 1},
        own=contract._own_block,
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"block_size": 0}, ValueError, "'block_size' must be a positive int")),
    ),
}
contract.CASES.update(CASES)   # the contract's helpers look cases up by name
NAMES = list(CASES)


# ---- the family contract --------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", list(PATTERN_SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_and_reference_equal_the_independent_definition(name, pattern):
    contract.test_fast_path_and_reference_equal_the_independent_definition(name, pattern)


@pytest.mark.parametrize("name", NAMES)
def test_selections_are_per_batch_row_and_kv_head(name):
    contract.test_selections_are_per_batch_row_and_kv_head_unless_the_paper_shares_them(name)


@pytest.mark.parametrize("name", NAMES)
def test_a_budget_that_selects_everything_is_full_attention(name):
    contract.test_a_budget_that_selects_everything_is_full_attention(name)


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].own])
def test_the_smallest_budget_still_reads_the_queries_own_block(name):
    contract.test_the_smallest_budget_still_reads_the_queries_own_block(name)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_of_the_fast_path_equal_the_references(name):
    contract.test_gradients_of_the_fast_path_equal_the_references(name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_follows_flashattention_rule_against_the_definition(name, dtype):
    contract.test_low_precision_follows_flashattention_rule_against_the_definition(name, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_bad_parameters_raise_naming_them(name):
    contract.test_bad_parameters_raise_naming_them(name)


@pytest.mark.parametrize("name", NAMES)
def test_info_cites_the_paper_and_declares_the_budget(name):
    contract.test_info_cites_the_paper_and_declares_the_budget(name)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(NAMES), hkv=st.integers(1, 2), groups=st.integers(1, 3), sk=st.integers(1, 40),
       cut=st.integers(0, 30), budget=st.integers(1, 12), causal=st.booleans())
def test_fuzz_fast_path_equals_reference(name, hkv, groups, sk, cut, budget, causal):
    """Any lengths (Sq <= Sk), head layouts and budgets, each variant's own parameters derived from `budget`."""
    sq = max(1, sk - cut)
    q, k, v = qkv(1, hkv * groups, hkv, sq, sk, 4, seed=sk + budget)
    g = torch.Generator().manual_seed(budget)
    params = {"routing": {"clusters": 1 + budget % 3, "top_k": budget},
              "recycled": {"top_k": budget, "stride": 1 + budget % 4},
              "dma": {"top_k": budget},
              "minference": {"budget": budget, "heads": (("a_shape", "vertical_slash", "block_sparse")[budget % 3], 0.5),
                             "block_size": 1 + budget % 5, "last_q": 3},
              "seer": {"block_size": 1 + budget % 5, "top_k": 1 + budget % 3}}[name]
    attn = az.get(name, **params)
    causal = causal or "noncausal_self" not in attn.info.patterns
    inputs = {}
    if name == "dma":
        inputs["dt"] = torch.randn(1, hkv, sk, generator=g, dtype=torch.float64)
    first = sk - sq
    if name == "recycled" and first % params["stride"]:
        inputs["anchor_keys"] = torch.randint(0, first - first % params["stride"] + 1, (1, hkv, budget), generator=g)
    out = attn(q, k, v, causal=causal, **inputs)
    assert torch.isfinite(out).all()
    assert (out - attn.reference(q, k, v, causal=causal, **inputs)).abs().max() < 1e-10


# ---- routing --------------------------------------------------------------------------------------------


def test_routing_with_given_centroids_equals_its_definition_and_reads_its_own_position():
    q, k, v = qkv(2, 4, 2, 45, 70, 8, seed=3)
    centroids = torch.randn(4, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    attn = az.get("routing", clusters=5, top_k=6)
    mask, expected = defs.routing(q, k, v, False, attn.config, 8 ** -0.5, centroids=centroids)
    assert torch.equal(attn.dense_mask(45, 70, q=q, k=k, centroids=centroids), mask)
    assert (attn(q, k, v, centroids=centroids) - expected).abs().max() < 1e-10
    assert mask[..., torch.arange(45), torch.arange(25, 70)].all()             # own position always
    assert (mask.sum(-1) <= 7).all() and (mask.sum(-1) >= 6).all()            # 6 members, + own unless a member
    with pytest.raises(ValueError, match=r"'centroids' must have shape \(H, clusters, D\)"):
        attn(q, k, v, centroids=centroids[:, :4])


def test_routing_online_kmeans_update_is_the_ema_of_the_routed_queries_and_keys():
    attn = az.get("routing", clusters=2, top_k=4)
    mu = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)          # (H=1, C=2, D=2)
    q = torch.tensor([[[[2.0, 0.2], [0.1, 3.0]]]], dtype=torch.float64)          # one query per centroid
    k = torch.tensor([[[[1.0, -0.1], [1.0, 0.3], [-0.2, 1.0]]]], dtype=torch.float64)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)                             # noqa: E731
    uq, uk = unit(q[0, 0]), unit(k[0, 0])
    moved0 = unit(0.9 * mu[0, 0] + 0.05 * (uq[0] + (uk[0] + uk[1]) / 2))
    moved1 = unit(0.9 * mu[0, 1] + 0.05 * (uq[1] + uk[2]))
    new = attn.update_centroids(mu, q, k, decay=0.9)
    assert torch.allclose(new[0], torch.stack([moved0, moved1]), atol=1e-12)
    # a centroid nothing is routed to stays; decay must be a float in [0, 1)
    far = torch.tensor([[[1.0, 0.0], [-1.0, -1.0]]], dtype=torch.float64)
    assert torch.allclose(attn.update_centroids(far, q, k, decay=0.5)[0, 1], unit(far[0, 1]), atol=1e-12)
    with pytest.raises(ValueError, match=r"decay must be a float in \[0, 1\)"):
        attn.update_centroids(mu, q, k, decay=1.0)
    with pytest.raises(ValueError, match=r"update_centroids needs centroids \(H, C, D\)"):
        attn.update_centroids(mu, q.expand(1, 2, 2, 2), k)


def test_routing_clusters_keys_that_match_a_query_together():
    """Keys aligned with one direction and queries along it land in one cluster: those queries read those keys."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(2, 16, generator=g, dtype=torch.float64)
    q = torch.cat([d[0] + 0.05 * torch.randn(20, 16, generator=g, dtype=torch.float64),
                   d[1] + 0.05 * torch.randn(20, 16, generator=g, dtype=torch.float64)]).view(1, 1, 40, 16)
    k = q[:, :, torch.randperm(40, generator=g)]
    attn = az.get("routing", clusters=2, top_k=20, kmeans_steps=3)
    mask = attn.dense_mask(40, 40, q=q, k=k)[0, 0]
    near = (torch.nn.functional.normalize(q[0, 0], dim=-1) @ torch.nn.functional.normalize(k[0, 0], dim=-1).T) > 0.5
    assert torch.equal(mask | torch.eye(40, dtype=torch.bool), near | torch.eye(40, dtype=torch.bool))


# ---- recycled -------------------------------------------------------------------------------------------


def test_recycled_decoding_token_by_token_equals_one_call():
    """A prefill of 17 tokens, then 23 decoded one at a time, anchor_keys carried: the same outputs as one call
    over all 40 queries (full steps at 0, 4, 8, ...; the first decoded token recycles the prefill's step 16)."""
    q, k, v = qkv(1, 4, 2, 40, 40, 8, seed=4)
    attn = az.get("recycled", top_k=5, stride=4)
    whole = attn(q, k, v, causal=True)
    anchor = attn.recycle(q[:, :, :17], k[:, :, :17], causal=True)
    assert anchor.shape == (1, 2, 5)
    outs = [attn(q[:, :, :17], k[:, :, :17], v[:, :, :17], causal=True)]
    for t in range(17, 40):
        kt, vt = k[:, :, :t + 1], v[:, :, :t + 1]
        outs.append(attn(q[:, :, t:t + 1], kt, vt, causal=True, anchor_keys=anchor))
        anchor = attn.recycle(q[:, :, t:t + 1], kt, causal=True, anchor_keys=anchor)
    assert (torch.cat(outs, dim=2) - whole).abs().max() < 1e-12
    chunk = attn(q[:, :, 17:], k, v, causal=True, anchor_keys=attn.recycle(q[:, :, :17], k[:, :, :17]))
    assert (chunk - whole[:, :, 17:]).abs().max() < 1e-12


def test_recycled_full_steps_are_full_attention_and_a_call_between_full_steps_needs_anchor_keys():
    q, k, v = qkv(1, 4, 2, 30, 30, 8, seed=5)
    attn = az.get("recycled", top_k=3, stride=5)
    out, full = attn(q, k, v, causal=True), az.attention(q, k, v, causal=True)
    rows = torch.arange(0, 30, 5)
    assert (out[:, :, rows] - full[:, :, rows]).abs().max() < 1e-12
    assert (out - full).abs().max() > 1e-3
    sel = attn.selection(q, k, causal=True)
    assert (sel.indices[:, :, rows] == -1).all() and (sel.indices[:, :, 1] >= 0).any()
    with pytest.raises(ValueError, match="first query sits at position 22.*pass anchor_keys"):
        attn(q[:, :, 22:], k, v, causal=True)
    with pytest.raises(ValueError, match=r"'anchor_keys' must have shape \(B, Hkv, top_k\)"):
        attn(q[:, :, 22:], k, v, causal=True, anchor_keys=torch.zeros(1, 2, 4, dtype=torch.long))


# ---- dma ------------------------------------------------------------------------------------------------


def test_dma_learned_mask_is_the_release_formula_and_trains_through_the_bias():
    torch.manual_seed(0)
    mask = az.nn.DynamicMask(kv_heads=2, head_dim=4).double()
    with torch.no_grad():
        mask.A.copy_(torch.tensor([0.5, -1.0]))
    v = torch.randn(3, 2, 7, 4, dtype=torch.float64)
    flat = v.transpose(1, 2).reshape(3, 7, 8)
    expected = torch.exp(mask.A * torch.nn.functional.softplus(flat @ mask.proj.weight.T)).transpose(1, 2)
    assert torch.allclose(mask(v), expected, atol=1e-14)
    with pytest.raises(ValueError, match=r"v must be \(B, kv_heads=2, S, head_dim=4\)"):
        mask(v[:, :1])
    layer = az.nn.MultiheadAttention(dim=16, heads=4, kv_heads=2, variant="dma", top_k=5).double()
    with torch.no_grad():
        layer.learned["dt"].A.fill_(0.5)
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    y, _ = layer(x)
    first, cache = layer(x[:, :11])
    rest, _ = layer(x[:, 11:], cache=cache)
    assert (torch.cat([first, rest], 1) - y).abs().max() < 1e-12            # a cached step == recomputation
    y.square().sum().backward()
    learned = layer.learned["dt"]
    assert learned.A.grad.abs().max() > 0 and learned.proj.weight.grad.abs().max() > 0


def test_dma_needs_its_mask():
    q, k, v = qkv(1, 4, 2, 20, 20, 8)
    attn = az.get("dma", top_k=4)
    with pytest.raises(TypeError, match="missing required input 'dt'"):
        attn(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"'dt' must have shape \(B, Hkv, Sk\)"):
        attn(q, k, v, causal=True, dt=torch.zeros(1, 4, 20, dtype=torch.float64))


# ---- minference -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["causal_self", "causal_cross"])
def test_minference_a_pattern_per_head_equals_its_definition(pattern):
    causal, sq, sk = PATTERN_SHAPES[pattern]
    q, k, v = qkv(2, 4, 2, sq, sk, 8, seed=6)
    heads = (("a_shape", 0.25), ("vertical_slash", 0.3), ("block_sparse", 0.0), ("vertical_slash", 0.9))
    attn = az.get("minference", budget=18, heads=heads, block_size=5, last_q=6)
    mask, expected = defs.minference(q, k, v, True, attn.config, 8 ** -0.5)
    assert torch.equal(attn.dense_mask(sq, sk, causal=True, q=q, k=k), mask)
    assert (attn(q, k, v, causal=True) - expected).abs().max() < 1e-10
    assert (mask.sum(-1) <= 18).all()
    with pytest.raises(ValueError, match="heads gives 4 per-head patterns, but q has Hq=2 heads"):
        attn(q[:, :2], k, v, causal=True)


@pytest.fixture(scope="module")
def real_qkv(request):
    """q/k/v of SmolLM2 on 512 tokens of real text at layers 0, 10, 19, 29 (the bench's capture, cached on disk;
    the model is loaded only when the cache misses)."""
    from attnzoo.bench import capture

    qkv_, _ = capture.captured_qkv("smollm2", 512, [0, 10, 19, 29], lambda: request.getfixturevalue("smollm2"))
    return qkv_


@pytest.mark.model
def test_minference_search_on_real_activations_saves_json_that_configures_the_variant(real_qkv, tmp_path):
    from attnzoo.bench import capture
    from attnzoo.variants.sparse import minference as mi

    candidates = (("a_shape", 0.25), ("vertical_slash", 0.5), ("block_sparse", 0.0))
    path = tmp_path / "patterns.json"
    result = mi.search_model("smollm2", 512, budget=64, layers=[0, 10, 19, 29], path=path, candidates=candidates,
                             block_size=16, progress=False)
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result)) and set(saved["layers"]) == {"0", "10", "19", "29"}
    q, k, _ = capture.stacked(real_qkv, [19])
    layer = saved["layers"]["19"]
    best = torch.tensor([max(m[h] for m in layer["mass"].values()) for h in range(9)])
    attn = az.get("minference", **mi.load_patterns(path, 19))
    searched = mi.mass_kept(q, k, attn.selection(q, k, causal=True))
    assert torch.allclose(searched, best.to(searched.dtype), atol=1e-5)     # each head got its best pattern
    for m in layer["mass"].values():
        assert searched.mean() >= torch.tensor(m).mean() - 1e-6                # >= any one pattern for all heads
    assert len({tuple(h) for layers in saved["layers"].values() for h in layers["heads"]}) > 1
    with pytest.raises(ValueError, match="layer 3 was not searched"):
        mi.load_patterns(path, 3)


# ---- seer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["causal_cross", "noncausal_self"])
def test_seer_with_gate_weights_equals_its_definition(pattern):
    causal, sq, sk = PATTERN_SHAPES[pattern]
    q, k, v = qkv(2, 4, 2, sq, sk, 8, seed=8)
    g = torch.Generator().manual_seed(2)
    gates = {"gate_q": torch.randn(4, 8, 5, generator=g, dtype=torch.float64),
             "gate_k": torch.randn(4, 3, 8, 5, generator=g, dtype=torch.float64)}
    attn = az.get("seer", block_size=6, top_k=3)
    mask, expected = defs.seer(q, k, v, causal, attn.config, 8 ** -0.5, **gates)
    assert torch.equal(attn.dense_mask(sq, sk, causal=causal, q=q, k=k, **gates), mask)
    assert (attn(q, k, v, causal=causal, **gates) - expected).abs().max() < 1e-10
    assert not torch.equal(mask, attn.dense_mask(sq, sk, causal=causal, q=q, k=k))
    with pytest.raises(TypeError, match="give both gate_q and gate_k"):
        attn(q, k, v, causal=causal, gate_q=gates["gate_q"])
    with pytest.raises(ValueError, match="must share G, got 5 and 4"):
        attn(q, k, v, causal=causal, gate_q=gates["gate_q"], gate_k=gates["gate_k"][..., :4])


def test_seer_distillation_target_is_the_block_max_pooled_attention():
    from attnzoo.nn.seer import block_attention_target

    q, k, _ = qkv(1, 4, 2, 19, 83, 8, seed=9)
    target = block_attention_target(q, k, 6, causal=True)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5
    s = s.masked_fill(torch.arange(83).view(1, -1) > (torch.arange(19) + 64).view(-1, 1), -torch.inf)
    p = torch.softmax(s, -1)
    rows = [list(range(0, 2)), list(range(2, 8)), list(range(8, 14)), list(range(14, 19))]   # positions 64-65, 66-71...
    expected = torch.stack([torch.stack([p[:, :, r, c * 6:(c + 1) * 6].amax((-1, -2)) for c in range(14)], -1)
                            for r in rows], 2)
    assert torch.allclose(target, expected / expected.sum(-1, keepdim=True), atol=1e-14)
    assert target.shape == (1, 4, 4, 14) and (target[..., 12:] == 0).sum() > 0


@pytest.mark.model
def test_seer_gate_distilled_on_real_activations_keeps_more_attention_than_untrained(real_qkv):
    """Trained on the first 256 tokens of SmolLM2 layer 19, scored on all 512 (half unseen): the distillation loss
    falls and, at 4 of 32 blocks, the trained gate keeps more exact attention mass than the same gate untrained."""
    from attnzoo.nn.seer import distill_seer_gate
    from attnzoo.variants.sparse.minference import mass_kept

    q, k, _ = real_qkv[19]
    torch.manual_seed(0)
    gate = az.nn.SeerGate(heads=9, head_dim=64, block_size=16, gate_dim=16)
    attn = az.get("seer", block_size=16, top_k=4)

    def kept():
        with torch.no_grad():
            return float(mass_kept(q, k, attn.selection(q, k, causal=True, **gate.inputs())).mean())

    before = kept()
    history = distill_seer_gate(gate, [(q[:, :, :256], k[:, :, :256])], steps=30, progress=False)
    after = kept()
    assert history["loss"][-1] < history["loss"][0] / 5
    assert after > before + 0.05, (before, after)
    with pytest.raises(ValueError, match=r"q must be \(B, heads=9, Sq, head_dim=64\)"):
        gate(q[:, :3], k)


# ---- a Flex BlockMask from a selection's indices ----------------------------------------------------------


@pytest.mark.flex
def test_flex_block_mask_from_a_selection_gives_the_selected_attention():
    """Eager FlexAttention (the reference path; compiled on GPU) under the BlockMask built from the indices
    equals the gather path, every pattern; one mask_mod per shape, its table refreshed by each call."""
    from attnzoo.core.selection import attend_selected
    from attnzoo.core.selection_flex import block_mask, flex_attend_selected

    for attn in (az.get("seer", block_size=16, top_k=2), az.get("quest", page=16, top_k=2)):
        for seed, (causal, sq, sk) in enumerate(((True, 90, 90), (True, 33, 90), (False, 90, 90), (False, 33, 90))):
            q, k, v = qkv(2, 4, 2, sq, sk, 16, seed=seed)
            call = attn.prepare(q, k, v, causal, None, {})
            sel = attn.select(q, k, call)
            out = flex_attend_selected(q, k, v, sel, call, q_block=32)
            assert (out - attend_selected(q, k, v, sel, call)).abs().max() < 1e-10, (causal, sq, sk, seed)
        q, k, v = qkv(2, 4, 2, 33, 90, 16, seed=9)                         # same shapes, new selection
        call = attn.prepare(q, k, v, False, None, {})
        sel = attn.select(q, k, call)
        assert (flex_attend_selected(q, k, v, sel, call, q_block=32) - attend_selected(q, k, v, sel, call)).abs().max() < 1e-10
        assert block_mask(sel, call, q_block=32).mask_mod is block_mask(attn.select(q.flip(2), k, call), call, 32).mask_mod
    with pytest.raises(ValueError, match="picks single tokens"):
        block_mask(az.get("topk", top_k=4).selection(q, k), call)
