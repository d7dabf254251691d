"""`linear` (Katharopoulos et al., 2020) beyond the shared contract (test_linear_family.py): the normaliser,
rows with a zero denominator, its parameters, and fla's naive reference (optional)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from linear_defs import loop

import attnzoo as az

F64 = torch.float64


def make(b=2, hq=4, hkv=2, s=19, d=4, dv=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, s, d, generator=gen, dtype=F64), torch.randn(b, hkv, s, d, generator=gen, dtype=F64),
            torch.randn(b, hkv, s, dv, generator=gen, dtype=F64))


def test_identity_map_normalised_equals_the_loop_on_positive_inputs():
    q, k, v = make()
    q, k = q.abs() + 0.1, k.abs() + 0.1  # the identity map keeps denominators away from 0 only on positive inputs
    params = {"feature_map": "identity", "normalize": True}
    expected, final = loop("linear", params, q, k, v)
    for mode in ("parallel", "chunk", "recurrent"):
        o, state = az.get("linear", chunk_size=5, **params)(q, k, v, causal=True, mode=mode, output_final_state=True)
        assert (o - expected).abs().max() < 1e-10 and (state - final).abs().max() < 1e-10


def test_state_is_s_then_z_and_scale_cancels_when_normalised():
    q, k, v = make()
    attn = az.get("linear")
    o, state = attn(q, k, v, causal=True, output_final_state=True)
    phi_k = F.elu(k) + 1
    assert state.shape == (2, 2, 4, 4)
    assert torch.allclose(state[..., :3], phi_k.transpose(-1, -2) @ v, atol=1e-12, rtol=0)
    assert torch.allclose(state[..., 3], phi_k.sum(2), atol=1e-12, rtol=0)
    assert (attn(q, k, v, causal=True, scale=0.37) - o).abs().max() < 1e-12
    unnorm = az.get("linear", normalize=False)
    half = unnorm(q, k, v, causal=True, scale=0.25)                    # D**-0.5 = 0.5 by default
    assert (half - 0.5 * unnorm(q, k, v, causal=True)).abs().max() < 1e-12


@pytest.mark.parametrize("mode", ["parallel", "chunk", "recurrent"])
def test_rows_whose_denominator_is_zero_give_zeros_never_nan(mode):
    """relu: a query whose features are all 0, or a prefix whose keys' features are all 0, has nothing to attend to."""
    q, k, v = make(b=1, hq=2, hkv=1, s=9)
    q[:, :, 3] = -1.0                     # phi(q_3) = 0 in every head
    k[:, :, :2] = -1.0                    # phi(k_0) = phi(k_1) = 0: the first two rows see nothing
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    attn = az.get("linear", feature_map="relu", chunk_size=4)
    o = attn(q, k, v, causal=True, mode=mode)
    assert torch.isfinite(o).all()
    assert not o[:, :, 3].any() and not o[:, :, :2].any() and o[:, :, 4:].abs().sum() > 0
    grads = torch.autograd.grad(o.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    expected, _ = loop("linear", {"feature_map": "relu"}, q.detach(), k.detach(), v.detach())
    assert (o - expected).abs().max() < 1e-10


def test_bad_parameters_name_the_argument():
    with pytest.raises(ValueError, match=r"parameter 'feature_map' must be one of \['elu1', 'identity', 'relu'\]"):
        az.get("linear", feature_map="softmax")
    with pytest.raises(TypeError, match="parameter 'feature_map' must be str"):
        az.get("linear", feature_map=None)
    with pytest.raises(TypeError, match="parameter 'normalize' must be bool"):
        az.get("linear", normalize=1)
    attn = az.get("linear")
    q, k, v = make(s=5)
    with pytest.raises(ValueError, match=r"state must be \(B, Hkv, D, Dv \+ 1\)"):
        attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.zeros(2, 2, 4, 3, dtype=F64))


@pytest.mark.parametrize("normalize", [True, False])
def test_equals_fla_naive_recurrent_linear_attn_when_installed(normalize):
    naive = pytest.importorskip("fla.ops.linear_attn.naive")
    gen = torch.Generator().manual_seed(3)
    b, h, s, d, dv = 2, 2, 33, 8, 8
    q, k, v = (torch.randn(b, h, s, n, generator=gen) for n in (d, d, dv))
    warm = [torch.randn(b, h, 7, n, generator=gen) for n in (d, d, dv)]
    attn = az.get("linear", normalize=normalize)
    s0 = attn(*warm, causal=True, output_final_state=True)[1]
    ours, state = attn(q, k, v, causal=True, initial_state=s0, output_final_state=True)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    init = (s0[..., :dv], s0[..., dv].unsqueeze(1)) if normalize else s0      # fla: (S, z (B, 1, H, K))
    theirs, their_state = naive.naive_recurrent_linear_attn(
        *(t.transpose(1, 2) for t in (fq, fk, v)), initial_state=init, output_final_state=True, normalize=normalize)
    assert torch.allclose(ours, theirs.transpose(1, 2), atol=1e-5, rtol=1e-5)
    if normalize:
        assert torch.allclose(state[..., :dv], their_state[0], atol=1e-4, rtol=1e-5)
        assert torch.allclose(state[..., dv], their_state[1][:, 0], atol=1e-4, rtol=1e-5)
    else:
        assert torch.allclose(state, their_state, atol=1e-4, rtol=1e-5)
