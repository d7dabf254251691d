"""The linear family's kernel variants that serve both directions (hedgehog, lln, fast, flowformer) and agent:
every form equals an independent definition (kernel_defs.py) in float64, causal and not, GQA, cross patterns,
lengths that are not multiples of the chunk; states carried over pieces equal one pass; packed sequences never
share state; gradients; low precision; bad input; hypothesis fuzz."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_defs import (
    agent_loop,
    flow_causal_loop,
    flow_noncausal_official,
    kernel_loop,
)

import attnzoo as az
from attnzoo.variants.linear.lln import lln_moments

F64 = torch.float64
MODES = ("parallel", "chunk", "recurrent")


def hedgehog_maps(hq, hkv, d, f=3, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {"weight_q": torch.randn(hq, d, f, generator=gen, dtype=F64), "bias_q": torch.randn(hq, f, generator=gen,
                                                                                               dtype=F64),
            "weight_k": torch.randn(hkv, d, f, generator=gen, dtype=F64), "bias_k": torch.randn(hkv, f, generator=gen,
                                                                                                dtype=F64)}


# id -> (variant, parameters as a function of (Hq, Hkv, D)).
CASES = {
    "hedgehog-identity": ("hedgehog", lambda hq, hkv, d: {}),
    "hedgehog-learned": ("hedgehog", hedgehog_maps),
    "lln": ("lln", lambda hq, hkv, d: {"alpha": 0.8, "beta": 1.2}),
    "fast": ("fast", lambda hq, hkv, d: {}),
    "fast-order1-normalized": ("fast", lambda hq, hkv, d: {"order": 1, "normalize": True}),
    "flowformer": ("flowformer", lambda hq, hkv, d: {}),
}
IDS = list(CASES)


def params(case, hq=4, hkv=2, d=4):
    return CASES[case][1](hq, hkv, d)


def get(case, hq=4, hkv=2, d=4, **extra):
    return az.get(CASES[case][0], **params(case, hq, hkv, d), **extra)


def expected(case, q, k, v, causal=True):
    name = CASES[case][0]
    if name == "flowformer":
        return flow_causal_loop(q, k, v) if causal else flow_noncausal_official(q, k, v)
    return kernel_loop(name, params(case, q.shape[1], k.shape[1], q.shape[-1]), q, k, v, causal=causal)[0]


def make(b=2, hq=4, hkv=2, sq=21, sk=None, d=4, dv=3, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    sk = sq if sk is None else sk
    q = torch.randn(b, hq, sq, d, generator=gen, dtype=F64)
    k = torch.randn(b, hkv, sk, d, generator=gen, dtype=F64)
    v = torch.randn(b, hkv, sk, dv, generator=gen, dtype=F64)
    return tuple(t.to(dtype) for t in (q, k, v))


def err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("case", IDS)
def test_causal_forms_equal_the_independent_definition(case, hq, hkv):
    q, k, v = make(hq=hq, hkv=hkv, sq=13)
    ref = expected(case, q, k, v)
    attn = get(case, hq, hkv, chunk_size=5)
    outs = {m: attn(q, k, v, causal=True, mode=m, output_final_state=True) for m in MODES}
    for mode, (o, state) in outs.items():
        assert err(o, ref) < 1e-10 and err(state, outs["parallel"][1]) < 1e-10, mode
    if CASES[case][0] != "flowformer":   # the state is the features' sums: compare with the definition's
        assert err(outs["chunk"][1], kernel_loop(CASES[case][0], params(case, hq, hkv), q, k, v)[1]) < 1e-10


@pytest.mark.parametrize("sq,sk", [(13, 13), (7, 13), (13, 6)])
@pytest.mark.parametrize("case", IDS)
def test_noncausal_self_and_cross_equal_the_definition(case, sq, sk):
    q, k, v = make(sq=sq, sk=sk)
    ref = expected(case, q, k, v, causal=False)
    attn = get(case, chunk_size=4)
    for mode in ("parallel", "chunk"):
        assert err(attn(q, k, v, mode=mode), ref) < 1e-10, mode
    assert err(attn.reference(q, k, v), ref) < 1e-10


@pytest.mark.parametrize("case", IDS)
def test_causal_cross_queries_are_the_last_positions(case):
    """Sq < Sk: the first keys only feed the state (for flowformer: positions with no query, sources only)."""
    q, k, v = make(sq=5, sk=17)
    ref = expected(case, q, k, v)
    attn = get(case, chunk_size=6)
    for mode in MODES:
        assert err(attn(q, k, v, causal=True, mode=mode), ref) < 1e-10, mode


@pytest.mark.parametrize("case", IDS)
def test_chunk_equals_parallel_at_lengths_not_multiple_of_the_chunk(case):
    q, k, v = make(sq=53)
    ref = get(case).reference(q, k, v, causal=True)
    for chunk_size in (1, 5, 16, 100):
        assert err(get(case, chunk_size=chunk_size)(q, k, v, causal=True, mode="chunk"), ref) < 1e-10, chunk_size


@pytest.mark.parametrize("case", IDS)
def test_pieces_with_the_state_carried_equal_one_pass_and_step(case):
    q, k, v = make(sq=31)
    attn = get(case, chunk_size=6)
    whole, final = attn.reference(q, k, v, causal=True, output_final_state=True)
    for mode in MODES:
        state, outs = None, []
        for a, b in [(0, 13), (13, 14), (14, 30), (30, 31)]:
            o, state = attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, mode=mode, initial_state=state,
                            output_final_state=True)
            outs.append(o)
        assert err(torch.cat(outs, 2), whole) < 1e-10 and err(state, final) < 1e-10, mode
    state = attn.init_state(2, 2, 4, 3, dtype=F64)
    assert state.shape == attn.state_shape(2, 2, 4, 3) and not state.any()
    steps = []
    for t in range(31):
        o_t, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        steps.append(o_t)
    assert err(torch.stack(steps, 2), whole) < 1e-10 and err(state, final) < 1e-10


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", IDS)
def test_packed_sequences_never_share_state(case, causal):
    q, k, v = make(b=1, sq=40)
    cu = torch.tensor([0, 9, 10, 33, 40])
    attn = get(case, chunk_size=8)
    k2 = k.clone()
    k2[:, :, :9] += 5.0  # a different first document
    for mode in MODES if causal else ("parallel", "chunk"):
        o = attn(q, k, v, causal=causal, mode=mode, cu_seqlens=cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=causal, mode=mode)
            assert err(o[:, :, a:b], alone) < 1e-10, (mode, a)
        o2 = attn(q, k2, v, causal=causal, mode=mode, cu_seqlens=cu)
        assert torch.equal(o2[:, :, 9:], o[:, :, 9:]) and not torch.equal(o2[:, :, :9], o[:, :, :9]), mode


@pytest.mark.parametrize("case", IDS)
def test_gradients_of_the_fast_forms_equal_those_of_the_definition(case):
    q, k, v = (t.requires_grad_() for t in make(b=1, hq=2, hkv=1, sq=9, d=3, dv=2))
    maps = {n: t.clone().requires_grad_() for n, t in params(case, 2, 1, 3).items() if isinstance(t, torch.Tensor)}
    attn = az.get(CASES[case][0], **{**params(case, 2, 1, 3), **maps}, chunk_size=4)
    assert torch.autograd.gradcheck(lambda *x: attn(*x, causal=True, mode="chunk"), (q, k, v), fast_mode=True)
    leaves = (q, k, v, *maps.values())
    for causal, mode in ((True, "chunk"), (False, "chunk")):
        grads = torch.autograd.grad(attn(q, k, v, causal=causal, mode=mode).square().sum(), leaves)
        ref = torch.autograd.grad(attn.reference(q, k, v, causal=causal).square().sum(), leaves)
        assert all(err(a, b) < 1e-10 for a, b in zip(grads, ref)), causal


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", IDS)
def test_low_precision_is_finite_and_close_to_the_definition(case, causal):
    q, k, v = make(b=1, hq=2, hkv=2, sq=150, d=8, dv=8)
    p = {n: t.float() if isinstance(t, torch.Tensor) else t for n, t in params(case, 2, 2, 8).items()}
    attn = az.get(CASES[case][0], **p, chunk_size=32)
    rounded = [t.to(torch.bfloat16) for t in (q, k, v)]
    ref = attn.reference(*(t.double() for t in rounded), causal=causal)
    got = attn(*rounded, causal=causal)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    # No worse than twice the unavoidable error: rounding the exact output to bf16.
    assert (got.double() - ref).norm() <= 2 * (ref.to(torch.bfloat16).double() - ref).norm() + 1e-12


@settings(max_examples=10, deadline=None)
@given(case=st.sampled_from(IDS), b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 3),
       s=st.integers(1, 20), d=st.integers(1, 5), dv=st.integers(1, 4), chunk=st.integers(1, 9),
       cross=st.integers(-4, 4), causal=st.booleans())
def test_fuzz_fast_forms_equal_the_definition(case, b, hkv, groups, s, d, dv, chunk, cross, causal):
    hq = hkv * groups
    sq = max(1, s - abs(cross)) if causal else max(1, s + cross)
    q, k, v = make(b=b, hq=hq, hkv=hkv, sq=sq, sk=s, d=d, dv=dv, seed=s * 7 + d)
    attn = get(case, hq, hkv, d, chunk_size=chunk)
    ref = attn.reference(q, k, v, causal=causal)
    for mode in ("chunk", "recurrent") if causal else ("chunk",):
        assert err(attn(q, k, v, causal=causal, mode=mode), ref) < 1e-10


@pytest.mark.parametrize("case", IDS)
def test_info_and_bad_inputs(case):
    attn = get(case)
    info = attn.info
    assert info.family == "linear" and not info.exact and len(info.patterns) == 4
    assert info.paper.title and info.paper.arxiv
    q, k, v = make(sq=10)
    with pytest.raises(ValueError, match="mode='recurrent' decodes causally"):
        attn(q, k, v, mode="recurrent")
    state = attn.init_state(2, 2, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match="non-causal call reads its whole sequence"):
        attn(q, k, v, initial_state=state)
    with pytest.raises(ValueError, match="non-causal call reads its whole sequence"):
        attn(q, k, v, output_final_state=True)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        attn(q, k, v, causal=True, initial_state=state[..., :-1])
    with pytest.raises(ValueError, match="rise strictly from 0 to S=10"):
        attn(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 4, 4, 10]))
    with pytest.raises(TypeError, match="unknown input"):
        attn(q, k, v, causal=True, g=torch.zeros(2, 2, 10, 4))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attn(q[:, :3], k, v, causal=True)
    with pytest.raises(ValueError, match="state must be"):
        attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state[:, :1])
    with pytest.raises(ValueError, match="step's k_t must be a rank-3 tensor"):
        attn.step(q[:, :, 0], k[:, :, :1], v[:, :, 0], state)
    with pytest.raises(ValueError, match="chunk_size"):
        get(case, chunk_size=0)


def test_hedgehog_feature_map_mismatches_are_refused():
    q, k, v = make(hq=4, hkv=2, d=4)
    maps = hedgehog_maps(4, 2, 4)
    with pytest.raises(ValueError, match=r"'weight_k' must have shape \(Hkv, D, F\) = \(2, 4, 3\)"):
        az.get("hedgehog", **{**maps, "weight_k": torch.randn(1, 4, 3, dtype=F64)})(q, k, v)
    with pytest.raises(ValueError, match=r"'bias_q' must have shape \(Hq, F\)"):
        az.get("hedgehog", **{**maps, "bias_q": torch.randn(4, 5, dtype=F64)})(q, k, v)
    with pytest.raises(ValueError, match="one feature dimension F"):
        az.get("hedgehog", **{**maps, "weight_k": torch.randn(2, 4, 5, dtype=F64)})
    with pytest.raises(ValueError, match="given together"):
        az.get("hedgehog", weight_q=maps["weight_q"])
    with pytest.raises(ValueError, match="rank 3"):
        az.get("hedgehog", weight_q=torch.randn(4, 3, dtype=F64), weight_k=maps["weight_k"])
    attn = az.get("hedgehog", **maps)
    with pytest.raises(ValueError, match=r"'weight_q' must have shape \(Hq, D, F\)"):
        attn.step(q[:, :2, 0], k[:, :, 0], v[:, :, 0], attn.init_state(2, 2, 4, 3, dtype=F64))
    assert attn.init_state(2, 2, 4, 3).shape == (2, 2, 6, 4)          # 2F features


def test_lln_moment_matching_per_call_and_per_document():
    q, k, v = make(b=1, sq=30)
    alpha, beta = lln_moments(q, k)
    fixed = az.get("lln", alpha=alpha, beta=beta)
    matched = az.get("lln")
    for causal in (True, False):
        assert err(matched(q, k, v, causal=causal), fixed(q, k, v, causal=causal)) < 1e-12
    cu = torch.tensor([0, 12, 30])
    part = matched(q, k, v, causal=True, cu_seqlens=cu)[:, :, 12:]
    a2, b2 = lln_moments(q[:, :, 12:], k[:, :, 12:])
    assert err(part, az.get("lln", alpha=a2, beta=b2)(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], causal=True)) < 1e-12
    with pytest.raises(ValueError, match="step needs fixed alpha and beta"):
        matched.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], matched.init_state(1, 2, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="pass them"):
        matched(q, k, v, causal=True, initial_state=matched.init_state(1, 2, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="given together"):
        az.get("lln", alpha=1.0)
    with pytest.raises(ValueError, match="finite float > 0"):
        az.get("lln", alpha=-1.0, beta=1.0)
    # the fit: sigma~^2 = (s_q^2 s_k^2 - b) / 2a, alpha = sigma~ / s_q, beta = sigma~ / s_k
    sq_, sk_ = q.std().item(), k.std().item()
    sigma = ((sq_ ** 2 * sk_ ** 2 + 0.35487039130661086) / (2 * 0.14855178144710912)) ** 0.5
    assert abs(alpha - sigma / sq_) < 1e-12 and abs(beta - sigma / sk_) < 1e-12


def test_fast_equals_based_at_order_two_and_refuses_other_orders():
    q, k, v = make()
    assert err(az.get("fast")(q, k, v, causal=True), az.get("based")(q, k, v, causal=True)) < 1e-12
    with pytest.raises(ValueError, match="'order' must be 1 or 2"):
        az.get("fast", order=3)
    assert az.get("fast").init_state(1, 2, 16, 8).shape == (1, 2, 273, 9)
    assert az.get("fast", order=1).init_state(1, 2, 16, 8).shape == (1, 2, 17, 9)


def test_flowformer_state_is_checked():
    q, k, v = make()
    attn = az.get("flowformer")
    bad = attn.init_state(2, 2, 4, 3, dtype=F64)
    bad[:, :, -1, 1] = -1.0
    with pytest.raises(ValueError, match="position"):
        attn(q, k, v, causal=True, initial_state=bad)


# ---- agent ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agents", [1, 4, 13, 30])
@pytest.mark.parametrize("hq,hkv,sq,sk", [(2, 2, 13, 13), (4, 2, 13, 21), (3, 1, 21, 9)])
def test_agent_equals_the_per_query_definition(agents, hq, hkv, sq, sk):
    q, k, v = make(hq=hq, hkv=hkv, sq=sq, sk=sk)
    attn = az.get("agent", agents=agents)
    ref = agent_loop(q, k, v, agents)
    assert err(attn(q, k, v), ref) < 1e-10 and err(attn.reference(q, k, v), ref) < 1e-10
    assert err(attn(q, k, v, scale=0.3), agent_loop(q, k, v, agents, scale=0.3)) < 1e-10


def test_agent_serves_the_non_causal_patterns_only_and_has_gradients():
    attn = az.get("agent", agents=3)
    assert attn.info.patterns == ("noncausal_self", "noncausal_cross") and attn.info.family == "linear"
    q, k, v = make(b=1, hq=2, hkv=1, sq=7, sk=9, d=3, dv=2)
    with pytest.raises(ValueError, match=r"cannot serve the causal_cross pattern.*serves \['noncausal_self', "
                                         r"'noncausal_cross'\]"):
        attn(q, k, v, causal=True)
    with pytest.raises(ValueError, match="'agents' must be a positive int"):
        az.get("agent", agents=0)
    leaves = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda *x: attn(*x), leaves, fast_mode=True)
    grads = torch.autograd.grad(attn(*leaves).square().sum(), leaves)
    ref = torch.autograd.grad(attn.reference(*leaves).square().sum(), leaves)
    assert all(err(a, b) < 1e-10 for a, b in zip(grads, ref))


def test_agent_low_precision_is_close_to_the_definition():
    q, k, v = (t.to(torch.bfloat16) for t in make(b=1, hq=2, hkv=2, sq=150, sk=120, d=8, dv=8))
    attn = az.get("agent", agents=16)
    ref = attn.reference(q.double(), k.double(), v.double())
    got = attn(q, k, v)
    assert got.dtype == torch.bfloat16
    assert (got.double() - ref).norm() <= 2 * (ref.to(torch.bfloat16).double() - ref).norm() + 1e-12


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 3), sq=st.integers(1, 20),
       sk=st.integers(1, 20), d=st.integers(1, 5), dv=st.integers(1, 4), agents=st.integers(1, 25))
def test_fuzz_agent_fast_path_equals_the_definition(b, hkv, groups, sq, sk, d, dv, agents):
    q, k, v = make(b=b, hq=hkv * groups, hkv=hkv, sq=sq, sk=sk, d=d, dv=dv, seed=sq + 3 * sk)
    attn = az.get("agent", agents=agents)
    assert err(attn(q, k, v), attn.reference(q, k, v)) < 1e-10


def test_lln_moment_matched_per_call_in_every_form():
    q, k, v = make(sq=17)
    attn = az.get("lln", chunk_size=5)
    ref = attn.reference(q, k, v, causal=True)
    for mode in MODES:
        assert err(attn(q, k, v, causal=True, mode=mode), ref) < 1e-10, mode
