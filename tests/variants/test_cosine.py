"""`cosine` (Cottention) beyond the shared contract (test_linear_family.py): the length normalisation by
position^sigmoid(m), per-head m, the default scale of 1, zero vectors, the token count in the state."""
from __future__ import annotations

import math

import pytest
import torch
from linear_defs import loop

import attnzoo as az

F64 = torch.float64


def make(b=2, hq=4, hkv=2, s=19, d=4, dv=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, s, d, generator=gen, dtype=F64), torch.randn(b, hkv, s, d, generator=gen, dtype=F64),
            torch.randn(b, hkv, s, dv, generator=gen, dtype=F64))


def test_the_authors_matrix_form():
    """The authors' GPT layer: V / (causal row counts)^sigmoid(m), then (N(Q) N(K)^T ⊙ causal mask) V."""
    q, k, v = make(hq=2, hkv=2)
    s = q.shape[2]
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    m = torch.tensor([0.5, -1.5], dtype=F64).view(1, 2, 1, 1)
    vs = v / mask.sum(-1, keepdim=True).to(F64) ** torch.sigmoid(m)
    nq, nk = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    expected = ((nq @ nk.transpose(-1, -2)) * mask) @ vs
    for mode in ("parallel", "chunk", "recurrent"):
        o = az.get("cosine", m=(0.5, -1.5), chunk_size=4)(q, k, v, causal=True, mode=mode)
        assert (o - expected).abs().max() < 1e-10


@pytest.mark.parametrize("m", [0.5, (2.0, -3.0), [-40.0, 40.0]])
def test_per_head_m_equals_the_loop(m):
    q, k, v = make()
    expected, final = loop("cosine", {"m": m}, q, k, v)
    for mode in ("parallel", "chunk", "recurrent"):
        o, state = az.get("cosine", m=m, chunk_size=6)(q, k, v, causal=True, mode=mode, output_final_state=True)
        assert (o - expected).abs().max() < 1e-10 and (state - final).abs().max() < 1e-10


def test_scale_defaults_to_one_and_magnitudes_do_not_matter():
    q, k, v = make()
    attn = az.get("cosine")
    o = attn(q, k, v, causal=True)
    assert torch.equal(o, attn(q, k, v, causal=True, scale=1.0))
    assert (attn(q, k, v, causal=True, scale=2.0) - 2 * o).abs().max() < 1e-12
    assert (attn(3.0 * q, 0.01 * k, v, causal=True) - o).abs().max() < 1e-12   # cosine similarities only
    o_t, _ = attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], attn.init_state(2, 2, 4, 3, dtype=F64))
    assert (o_t - o[:, :, 0]).abs().max() < 1e-12


@pytest.mark.parametrize("mode", ["parallel", "chunk", "recurrent"])
def test_zero_vectors_have_zero_cosine_never_nan(mode):
    q, k, v = make(b=1, hq=2, hkv=1, s=8)
    q[:, :, 2] = 0.0
    k[:, :, 5] = 0.0
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = az.get("cosine", chunk_size=3)(q, k, v, causal=True, mode=mode)
    assert torch.isfinite(o).all() and not o[:, :, 2].any()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(o.square().sum(), (q, k, v)))
    assert (o - loop("cosine", {}, q.detach(), k.detach(), v.detach())[0]).abs().max() < 1e-10


def test_state_counts_tokens_and_a_bad_count_is_refused():
    q, k, v = make(s=10)
    attn = az.get("cosine")
    _, state = attn(q, k, v, causal=True, output_final_state=True)
    assert state.shape == (2, 2, 5, 3) and torch.equal(state[:, :, 4], torch.full((2, 2, 3), 10.0, dtype=F64))
    _, state2 = attn(q, k, v, causal=True, initial_state=state, output_final_state=True)
    assert torch.equal(state2[:, :, 4], torch.full((2, 2, 3), 20.0, dtype=F64))
    for bad in (-1.0, math.nan):
        broken = state.clone()
        broken[0, 0, 4] = bad
        with pytest.raises(ValueError, match="number of tokens seen"):
            attn(q, k, v, causal=True, initial_state=broken)
    broken = state.clone()
    broken[0, 0, 4, 1] = 3.0
    with pytest.raises(ValueError, match="number of tokens seen"):
        attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], broken)


def test_bad_parameters_name_the_argument():
    for bad in (math.nan, math.inf, (), (1.0, math.nan)):
        with pytest.raises(ValueError, match="parameter 'm' must be a finite float"):
            az.get("cosine", m=bad)
    for bad in (None, "0.5", True):
        with pytest.raises(TypeError, match="parameter 'm' must be"):
            az.get("cosine", m=bad)
    q, k, v = make(hkv=2)
    with pytest.raises(ValueError, match="parameter 'm' has 3 entries but the call has Hkv=2"):
        az.get("cosine", m=(0.1, 0.2, 0.3))(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"scale must be a finite float > 0"):
        az.get("cosine")(q, k, v, causal=True, scale=-1.0)
    with pytest.raises(ValueError, match=r"state must be \(B, Hkv, D \+ 1, Dv\)"):
        az.get("cosine").step(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.zeros(2, 2, 4, 3, dtype=F64))
