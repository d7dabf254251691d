"""GLA and the recurrent contract: parallel == chunk == recurrent == step == an independent loop
written here; state carried over pieces == one pass; packed sequences never share state."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo as az

F64 = torch.float64


def make(b=2, hq=4, hkv=2, s=37, d=8, dv=6, dtype=F64, seed=0, gate_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=gen, dtype=F64)
    k = torch.randn(b, hkv, s, d, generator=gen, dtype=F64)
    v = torch.randn(b, hkv, s, dv, generator=gen, dtype=F64)
    g = F.logsigmoid(torch.randn(b, hkv, s, d, generator=gen, dtype=F64)) * gate_scale
    return tuple(t.to(dtype) for t in (q, k, v, g))


def loop_definition(q, k, v, g, scale=None, state=None):
    """The paper's recurrence, one scalar index at a time (independent of the library's code)."""
    b, hq, s, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b, hq, s, dv, dtype=F64)
    finals = torch.zeros(b, hkv, d, dv, dtype=F64)
    for bi in range(b):
        for h in range(hkv):
            st_ = torch.zeros(d, dv, dtype=F64) if state is None else state[bi, h].clone()
            for t in range(s):
                st_ = torch.exp(g[bi, h, t]).unsqueeze(1) * st_ + torch.outer(k[bi, h, t], v[bi, h, t])
                for j in range(hq // hkv):
                    out[bi, h * (hq // hkv) + j, t] = scale * q[bi, h * (hq // hkv) + j, t] @ st_
            finals[bi, h] = st_
    return out, finals


@pytest.mark.parametrize("mode", ["parallel", "chunk", "recurrent"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (3, 1)])
def test_every_form_equals_the_recurrence_written_plainly(mode, hq, hkv):
    q, k, v, g = make(hq=hq, hkv=hkv, s=29)
    expected, final = loop_definition(q, k, v, g)
    o, state = az.get("gla", chunk_size=8)(q, k, v, causal=True, g=g, mode=mode, output_final_state=True)
    assert (o - expected).abs().max() < 1e-10
    assert (state - final).abs().max() < 1e-10


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 100])
def test_chunk_equals_parallel_at_lengths_not_multiple_of_the_chunk(chunk_size):
    q, k, v, g = make(s=53)
    attn = az.get("gla", chunk_size=chunk_size)
    ref = attn.reference(q, k, v, causal=True, g=g)
    assert (attn(q, k, v, causal=True, g=g) - ref).abs().max() < 1e-10


def test_causal_cross_pattern_uses_the_first_keys_as_state():
    """With Sq < Sk the queries are the last Sq positions: equal to the tail of the self-attention output."""
    q, k, v, g = make(s=30)
    attn = az.get("gla", chunk_size=7)
    full = attn(q, k, v, causal=True, g=g)
    for mode in ("parallel", "chunk", "recurrent"):
        tail = attn(q[:, :, -11:], k, v, causal=True, g=g, mode=mode)
        assert (tail - full[:, :, -11:]).abs().max() < 1e-10


@pytest.mark.parametrize("mode", ["parallel", "chunk", "recurrent"])
def test_pieces_with_the_state_carried_equal_one_pass(mode):
    q, k, v, g = make(s=41)
    attn = az.get("gla", chunk_size=6)
    whole, final = attn(q, k, v, causal=True, g=g, mode=mode, output_final_state=True)
    state, outs = None, []
    for a, b in [(0, 13), (13, 14), (14, 40), (40, 41)]:
        o, state = attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, g=g[:, :, a:b], mode=mode,
                        initial_state=state, output_final_state=True)
        outs.append(o)
    assert (torch.cat(outs, 2) - whole).abs().max() < 1e-10
    assert (state - final).abs().max() < 1e-10


def test_initial_state_matches_the_plain_loop():
    q, k, v, g = make(s=19)
    s0 = torch.randn(2, 2, 8, 6, dtype=F64)
    expected, final = loop_definition(q, k, v, g, state=s0)
    for mode in ("parallel", "chunk", "recurrent"):
        o, st_ = az.get("gla", chunk_size=4)(q, k, v, causal=True, g=g, mode=mode, initial_state=s0,
                                             output_final_state=True)
        assert (o - expected).abs().max() < 1e-10 and (st_ - final).abs().max() < 1e-10


def test_step_by_step_decoding_equals_the_call():
    q, k, v, g = make(s=12)
    attn = az.get("gla")
    state = attn.init_state(2, 2, 8, 6, dtype=F64)
    outs = []
    for t in range(12):
        o_t, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state, g=g[:, :, t])
        outs.append(o_t)
    whole, final = attn(q, k, v, causal=True, g=g, output_final_state=True)
    assert (torch.stack(outs, 2) - whole).abs().max() < 1e-10 and (state - final).abs().max() < 1e-10


@pytest.mark.parametrize("mode", ["parallel", "chunk", "recurrent"])
def test_packed_sequences_never_share_state(mode):
    """cu_seqlens: each sequence equals its own run; changing one sequence changes no other's outputs."""
    q, k, v, g = make(b=1, s=40)
    cu = torch.tensor([0, 9, 10, 33, 40])
    attn = az.get("gla", chunk_size=8)
    s0 = torch.randn(4, 2, 8, 6, dtype=F64)
    o, states = attn(q, k, v, causal=True, g=g, mode=mode, cu_seqlens=cu, initial_state=s0, output_final_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, st_ = attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, g=g[:, :, a:b], mode=mode,
                          initial_state=s0[i:i + 1], output_final_state=True)
        assert (o[:, :, a:b] - alone).abs().max() < 1e-10
        assert (states[i:i + 1] - st_).abs().max() < 1e-10
    k2 = k.clone()
    k2[:, :, :9] += 5.0  # a different first document
    o2 = attn(q, k2, v, causal=True, g=g, mode=mode, cu_seqlens=cu)
    assert torch.equal(o2[:, :, 9:], attn(q, k, v, causal=True, g=g, mode=mode, cu_seqlens=cu)[:, :, 9:])


def test_gradients_of_the_chunk_form_match_gradcheck_and_the_definition():
    q, k, v, g = (t.requires_grad_() for t in make(b=1, hq=2, hkv=1, s=11, d=3, dv=2))
    attn = az.get("gla", chunk_size=4)
    assert torch.autograd.gradcheck(lambda *x: attn(*x[:3], causal=True, g=x[3]), (q, k, v, g))
    grads = torch.autograd.grad(attn(q, k, v, causal=True, g=g).square().sum(), (q, k, v, g))
    ref = torch.autograd.grad(attn.reference(q, k, v, causal=True, g=g).square().sum(), (q, k, v, g))
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(grads, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate_scale", [1e-6, 1.0, 30.0])
def test_low_precision_stays_close_and_finite_with_extreme_gates(dtype, gate_scale):
    """Gates near 1 (g ~ -1e-6: no decay, the state grows over 300 tokens) and near 0 (g ~ -30)."""
    q, k, v, g = make(b=1, s=300, d=16, dv=16, gate_scale=gate_scale)
    ref = az.get("gla").reference(q, k, v, causal=True, g=g)
    got = az.get("gla", chunk_size=64)(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, g=g.to(dtype))
    assert got.dtype == dtype  # accumulated in float32, returned in the inputs' dtype
    got = got.double()
    assert torch.isfinite(got).all()
    # The inputs themselves are rounded to `dtype`: compare with the float64 definition on those rounded inputs,
    # allowing twice the error of rounding the exact output to `dtype` plus the input rounding's effect.
    ref_rounded = az.get("gla").reference(*(t.to(dtype).double() for t in (q, k, v)), causal=True,
                                          g=g.to(dtype).double())
    out_rounding = (ref_rounded.to(dtype).double() - ref_rounded).norm()
    assert (got - ref_rounded).norm() <= 2 * out_rounding + 1e-12
    assert (got - ref).norm() / ref.norm() < 3e-2


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 3), s=st.integers(1, 40),
       d=st.integers(1, 9), dv=st.integers(1, 7), chunk=st.integers(1, 20), cross=st.integers(0, 5))
def test_fuzz_chunk_and_recurrent_equal_the_definition(b, hkv, groups, s, d, dv, chunk, cross):
    q, k, v, g = make(b=b, hq=hkv * groups, hkv=hkv, s=s, d=d, dv=dv, seed=s * 7 + d)
    sq = max(1, s - cross)
    attn = az.get("gla", chunk_size=chunk)
    ref = attn.reference(q[:, :, -sq:], k, v, causal=True, g=g)
    for mode in ("chunk", "recurrent"):
        assert (attn(q[:, :, -sq:], k, v, causal=True, g=g, mode=mode) - ref).abs().max() < 1e-10


def test_equals_fla_naive_reference_when_installed():
    naive = pytest.importorskip("fla.ops.gla.naive")
    q, k, v, g = make(b=2, hq=2, hkv=2, s=33, d=8, dv=8, dtype=torch.float32)
    s0 = torch.randn(2, 2, 8, 8)
    ours, state = az.get("gla")(q, k, v, causal=True, g=g, initial_state=s0, output_final_state=True)
    theirs, their_state = naive.naive_recurrent_gla(*(t.transpose(1, 2) for t in (q, k, v, g)), initial_state=s0,
                                                    output_final_state=True)
    assert torch.allclose(ours, theirs.transpose(1, 2), atol=1e-5)
    assert torch.allclose(state, their_state, atol=1e-5)


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_argument():
    q, k, v, g = make(s=10)
    attn = az.get("gla")
    with pytest.raises(ValueError, match="noncausal_self"):
        attn(q, k, v, g=g)
    with pytest.raises(ValueError, match="'g'.*<= 0"):
        attn(q, k, v, causal=True, g=-g)
    with pytest.raises(ValueError, match=r"input 'g' must have shape \(B, Hkv, Sk, D\)"):
        attn(q, k, v, causal=True, g=g[:, :1])
    with pytest.raises(TypeError, match="missing required input 'g'"):
        attn(q, k, v, causal=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        attn(q, k, v, causal=True, g=g, mode="fused")
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, Hkv, Dk, Dv\)"):
        attn(q, k, v, causal=True, g=g, initial_state=torch.zeros(2, 2, 8, 5, dtype=F64))
    with pytest.raises(ValueError, match="batch size 1"):
        attn(q, k, v, causal=True, g=g, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="rise strictly from 0 to S=10"):
        attn(q[:1], k[:1], v[:1], causal=True, g=g[:1], cu_seqlens=torch.tensor([0, 4, 4, 10]))
    with pytest.raises(ValueError, match="chunk_size"):
        az.get("gla", chunk_size=0)
    with pytest.raises(ValueError, match="state must be"):
        attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.zeros(2, 2, 8, 8, dtype=F64), g=g[:, :, 0])
    with pytest.raises(TypeError, match="needs g"):
        attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], attn.init_state(2, 2, 8, 6, dtype=F64))


def test_one_call_api_takes_the_recurrent_options():
    q, k, v, g = make(s=20)
    o, state = az.attention(q, k, v, variant="gla", causal=True, g=g, mode="recurrent", output_final_state=True)
    expected, final = loop_definition(q, k, v, g)
    assert (o - expected).abs().max() < 1e-10 and (state - final).abs().max() < 1e-10
    with pytest.raises(TypeError, match="did you mean 'mode'"):
        az.attention(q, k, v, variant="gla", causal=True, g=g, mdoe="chunk")
