"""The recurrent contract for every variant of the linear family without per-token inputs (gla has its own
module): parallel == chunk == recurrent == step == an independent per-token loop (linear_defs.py), at lengths
that are not multiples of the chunk; GQA; the causal cross pattern; state carried over pieces == one pass;
packed sequences never share state; gradients of the chunk form == gradients of the definition; bad input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linear_defs import loop

import attnzoo as az

F64 = torch.float64
MODES = ("parallel", "chunk", "recurrent")

# id -> (variant, parameters); lengths below are never multiples of the chunk sizes used.
CASES = {
    "linear-elu1": ("linear", {"feature_map": "elu1"}),
    "linear-relu": ("linear", {"feature_map": "relu"}),
    "linear-identity-unnormalised": ("linear", {"feature_map": "identity", "normalize": False}),
    "cosine": ("cosine", {}),
    "retention": ("retention", {}),
    "lightning": ("lightning", {"layer_idx": 1, "num_layers": 4}),
    "based": ("based", {}),
    "based-unnormalised": ("based", {"normalize": False}),
}
IDS = list(CASES)


def get(case, **extra):
    name, params = CASES[case]
    return az.get(name, **params, **extra)


def make(b=2, hq=4, hkv=2, s=29, d=4, dv=3, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=gen, dtype=F64)
    k = torch.randn(b, hkv, s, d, generator=gen, dtype=F64)
    v = torch.randn(b, hkv, s, dv, generator=gen, dtype=F64)
    return tuple(t.to(dtype) for t in (q, k, v))


def warm_state(attn, b, hkv, d, dv, seed=1, s=9):
    """A state a real earlier pass ends in (random states can put a normaliser near 0)."""
    q, k, v = make(b=b, hq=hkv, hkv=hkv, s=s, d=d, dv=dv, seed=seed)
    return attn(q, k, v, causal=True, mode="parallel", output_final_state=True)[1]


def err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("case", IDS)
def test_every_form_and_the_final_state_equal_the_per_token_loop(case, hq, hkv):
    q, k, v = make(hq=hq, hkv=hkv, s=21)
    expected, final = loop(*CASES[case], q, k, v)
    attn = get(case, chunk_size=8)
    for mode in MODES:
        o, state = attn(q, k, v, causal=True, mode=mode, output_final_state=True)
        assert o.shape == expected.shape and state.shape == final.shape, mode
        assert err(o, expected) < 1e-10 and err(state, final) < 1e-10, mode


@pytest.mark.parametrize("case", IDS)
def test_chunk_equals_parallel_at_lengths_not_multiple_of_the_chunk(case):
    q, k, v = make(s=53)
    ref = get(case).reference(q, k, v, causal=True)
    for chunk_size in (1, 5, 16, 100):
        assert err(get(case, chunk_size=chunk_size)(q, k, v, causal=True, mode="chunk"), ref) < 1e-10, chunk_size


@pytest.mark.parametrize("case", IDS)
def test_causal_cross_pattern_queries_are_the_last_positions(case):
    """Sq < Sk: the output equals the tail of the self-attention output; the first keys only build the state."""
    q, k, v = make(s=30)
    attn = get(case, chunk_size=7)
    full = attn.reference(q, k, v, causal=True)
    for mode in MODES:
        assert err(attn(q[:, :, -11:], k, v, causal=True, mode=mode), full[:, :, -11:]) < 1e-10, mode


@pytest.mark.parametrize("case", IDS)
def test_pieces_with_the_state_carried_equal_one_pass(case):
    q, k, v = make(s=31)
    attn = get(case, chunk_size=6)
    whole, final = attn.reference(q, k, v, causal=True, output_final_state=True)
    for mode in MODES:
        state, outs = None, []
        for a, b in [(0, 13), (13, 14), (14, 30), (30, 31)]:
            o, state = attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, mode=mode, initial_state=state,
                            output_final_state=True)
            outs.append(o)
        assert err(torch.cat(outs, 2), whole) < 1e-10 and err(state, final) < 1e-10, mode


@pytest.mark.parametrize("case", IDS)
def test_initial_state_matches_the_loop(case):
    q, k, v = make(s=17)
    attn = get(case, chunk_size=4)
    s0 = warm_state(attn, 2, 2, 4, 3)
    expected, final = loop(*CASES[case], q, k, v, state=s0)
    for mode in MODES:
        o, state = attn(q, k, v, causal=True, mode=mode, initial_state=s0, output_final_state=True)
        assert err(o, expected) < 1e-10 and err(state, final) < 1e-10, mode


@pytest.mark.parametrize("case", IDS)
def test_step_by_step_decoding_equals_the_call(case):
    q, k, v = make(s=12)
    attn = get(case)
    state = attn.init_state(2, 2, 4, 3, dtype=F64)
    assert state.shape == attn.state_shape(2, 2, 4, 3) and not state.any()
    outs = []
    for t in range(12):
        o_t, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(o_t)
    whole, final = attn(q, k, v, causal=True, output_final_state=True)
    assert err(torch.stack(outs, 2), whole) < 1e-10 and err(state, final) < 1e-10


@pytest.mark.parametrize("case", IDS)
def test_packed_sequences_never_share_state(case):
    """cu_seqlens: each sequence equals its own run from its own initial state; changing one sequence changes
    no other's outputs, in every form."""
    q, k, v = make(b=1, s=40)
    cu = torch.tensor([0, 9, 10, 33, 40])
    attn = get(case, chunk_size=8)
    s0 = torch.cat([warm_state(attn, 1, 2, 4, 3, seed=10 + i) for i in range(4)])
    k2 = k.clone()
    k2[:, :, :9] += 5.0  # a different first document
    for mode in MODES:
        o, states = attn(q, k, v, causal=True, mode=mode, cu_seqlens=cu, initial_state=s0, output_final_state=True)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone, st_ = attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, mode=mode,
                              initial_state=s0[i:i + 1], output_final_state=True)
            assert err(o[:, :, a:b], alone) < 1e-10 and err(states[i:i + 1], st_) < 1e-10, (mode, i)
        o2 = attn(q, k2, v, causal=True, mode=mode, cu_seqlens=cu)
        assert torch.equal(o2[:, :, 9:], attn(q, k, v, causal=True, mode=mode, cu_seqlens=cu)[:, :, 9:]), mode
        assert not torch.equal(o2[:, :, :9], o[:, :, :9])


@pytest.mark.parametrize("case", IDS)
def test_gradients_of_the_chunk_form_equal_those_of_the_definition(case):
    q, k, v = (t.requires_grad_() for t in make(b=1, hq=2, hkv=1, s=9, d=3, dv=2))
    attn = get(case, chunk_size=4)
    assert torch.autograd.gradcheck(lambda *x: attn(*x, causal=True, mode="chunk"), (q, k, v), fast_mode=True)
    s0 = warm_state(attn, 1, 1, 3, 2).requires_grad_()
    grads = torch.autograd.grad(attn(q, k, v, causal=True, mode="chunk", initial_state=s0).square().sum(),
                                (q, k, v, s0))
    ref = torch.autograd.grad(attn.reference(q, k, v, causal=True, initial_state=s0).square().sum(), (q, k, v, s0))
    assert all(err(a, b) < 1e-10 for a, b in zip(grads, ref))


@pytest.mark.parametrize("case", IDS)
def test_low_precision_is_finite_and_close_to_the_definition(case):
    q, k, v = make(b=1, hq=2, hkv=2, s=150, d=8, dv=8)
    attn = get(case, chunk_size=32)
    rounded = [t.to(torch.bfloat16) for t in (q, k, v)]
    ref = attn.reference(*(t.double() for t in rounded), causal=True)
    got = attn(*rounded, causal=True)
    assert got.dtype == torch.bfloat16  # the state accumulates in float32; the output comes back in bf16
    got = got.double()
    assert torch.isfinite(got).all()
    # No worse than twice the unavoidable error: rounding the exact output to bf16.
    assert (got - ref).norm() <= 2 * (ref.to(torch.bfloat16).double() - ref).norm() + 1e-12


@settings(max_examples=8, deadline=None)
@given(case=st.sampled_from(IDS), b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 3),
       s=st.integers(1, 24), d=st.integers(1, 5), dv=st.integers(1, 4), chunk=st.integers(1, 9),
       cross=st.integers(0, 5))
def test_fuzz_chunk_and_recurrent_equal_the_definition(case, b, hkv, groups, s, d, dv, chunk, cross):
    q, k, v = make(b=b, hq=hkv * groups, hkv=hkv, s=s, d=d, dv=dv, seed=s * 7 + d)
    sq = max(1, s - cross)
    attn = get(case, chunk_size=chunk)
    ref = attn.reference(q[:, :, -sq:], k, v, causal=True)
    for mode in ("chunk", "recurrent"):
        assert err(attn(q[:, :, -sq:], k, v, causal=True, mode=mode), ref) < 1e-10


@pytest.mark.parametrize("case", IDS)
def test_info_and_shared_bad_inputs(case):
    attn = get(case)
    info = attn.info
    assert info.family == "linear" and info.patterns == ("causal_self", "causal_cross") and not info.exact
    assert info.paper.title and info.paper.arxiv and 2019 < info.paper.year < 2026
    q, k, v = make(s=10)
    with pytest.raises(ValueError, match="noncausal_self"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="mode must be one of"):
        attn(q, k, v, causal=True, mode="fused")
    with pytest.raises(ValueError, match="initial_state must have shape"):
        attn(q, k, v, causal=True, initial_state=torch.zeros(2, 2, 4, 9, dtype=F64))
    with pytest.raises(TypeError, match="initial_state must be a torch.Tensor"):
        attn(q, k, v, causal=True, initial_state=[0.0])
    with pytest.raises(ValueError, match="rise strictly from 0 to S=10"):
        attn(q[:1], k[:1], v[:1], causal=True, cu_seqlens=torch.tensor([0, 4, 4, 10]))
    with pytest.raises(TypeError, match="unknown input"):
        attn(q, k, v, causal=True, g=torch.zeros(2, 2, 10, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        get(case, chunk_size=0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attn(q[:, :3], k, v, causal=True)
    state = attn.init_state(2, 2, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"state must be \(B, Hkv"):
        attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state[:, :1])
    with pytest.raises(ValueError, match="step's k_t must be a rank-3 tensor"):
        attn.step(q[:, :, 0], k[:, :, :1], v[:, :, 0], state)
    with pytest.raises(ValueError, match="Hq % Hkv == 0"):
        attn.step(q[:, :3, 0], k[:, :, 0], v[:, :, 0], state)
    with pytest.raises(TypeError, match="step takes no per-token inputs"):
        attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, g=k[:, :, 0])
