"""`lightning` beyond the shared contract (test_linear_family.py): TransNormerLLM's decay schedule as fla's
lightning_attn, the `decay` override (MiniMax-01's slopes), and fla's naive simple-GLA reference (optional)."""
from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az

F64 = torch.float64


def make(b=2, hq=4, hkv=2, s=19, d=4, dv=3, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(t.to(dtype) for t in (torch.randn(b, hq, s, d, generator=gen, dtype=F64),
                                       torch.randn(b, hkv, s, d, generator=gen, dtype=F64),
                                       torch.randn(b, hkv, s, dv, generator=gen, dtype=F64)))


def fla_log_decays(heads, layer_idx, num_layers):
    """fla's chunk_lightning_attn: g_gamma = -(8 / H * (1 - layer_idx / L)) * arange(H)."""
    return -(8 / heads * (1 - layer_idx / num_layers)) * torch.arange(heads, dtype=F64)


@pytest.mark.parametrize("layer_idx,num_layers", [(0, 1), (3, 12), (11, 12)])
def test_schedule_is_transnormers_as_in_fla(layer_idx, num_layers):
    q, k, v = make(hq=6, hkv=3)
    lam = tuple(fla_log_decays(3, layer_idx, num_layers).exp().tolist())
    o = az.get("lightning", layer_idx=layer_idx, num_layers=num_layers, chunk_size=5)(q, k, v, causal=True)
    assert (o - az.get("lightning", decay=lam)(q, k, v, causal=True, mode="parallel")).abs().max() < 1e-10


def test_head_zero_does_not_decay_it_is_plain_linear_attention():
    q, k, v = make(hq=2, hkv=1)
    plain = az.get("linear", feature_map="identity", normalize=False)(q, k, v, causal=True)
    for mode in ("parallel", "chunk", "recurrent"):
        assert (az.get("lightning", chunk_size=4)(q, k, v, causal=True, mode=mode) - plain).abs().max() < 1e-10


def test_minimax_slopes_through_decay():
    """MiniMax-01 (and TransNormerLLM's released code) decay by exp(-slope_h) with ALiBi-style slopes."""
    slopes = [2 ** (-8 * (h + 1) / 2) for h in range(2)]
    q, k, v = make(hq=2, hkv=2, s=13)
    o = az.get("lightning", decay=tuple(math.exp(-s) for s in slopes))(q, k, v, causal=True)
    expected = torch.zeros_like(o)
    for h, slope in enumerate(slopes):
        for t in range(13):
            for s in range(t + 1):
                expected[:, h, t] += math.exp(-slope * (t - s)) * (q[:, h, t] * k[:, h, s]).sum(-1, keepdim=True) \
                    * 0.5 * v[:, h, s]
    assert (o - expected).abs().max() < 1e-10


def test_bad_parameters_name_the_argument():
    with pytest.raises(ValueError, match="parameter 'layer_idx' must be < num_layers=4, got 4"):
        az.get("lightning", layer_idx=4, num_layers=4)
    with pytest.raises(ValueError, match="parameter 'layer_idx' must be a non-negative int"):
        az.get("lightning", layer_idx=-1)
    with pytest.raises(ValueError, match="parameter 'num_layers' must be a positive int"):
        az.get("lightning", num_layers=0)
    for bad in (0.0, 1.01, -0.5, math.inf, (0.5, 0.0)):
        with pytest.raises(ValueError, match=r"parameter 'decay' must be None, a float in \(0, 1\]"):
            az.get("lightning", decay=bad)
    assert az.get("lightning", decay=1.0).config["decay"] == 1.0   # no decay is allowed here (head 0's schedule)
    q, k, v = make(hkv=2)
    with pytest.raises(ValueError, match="parameter 'decay' has 1 entries but the call has Hkv=2"):
        az.get("lightning", decay=(0.5,))(q, k, v, causal=True)


def test_equals_fla_naive_simple_gla_with_fla_lightning_decays_when_installed():
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    q, k, v = make(b=2, hq=4, hkv=4, s=70, d=8, dv=8, dtype=torch.float32)
    s0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours, state = az.get("lightning", layer_idx=2, num_layers=8)(q, k, v, causal=True, initial_state=s0,
                                                                 output_final_state=True)
    g = fla_log_decays(4, 2, 8).float().view(1, 1, 4).expand(2, 70, 4)
    theirs, their_state = naive.naive_chunk_simple_gla(*(t.transpose(1, 2) for t in (q, k, v)), g,
                                                       initial_state=s0.clone(), output_final_state=True)
    assert torch.allclose(ours, theirs.transpose(1, 2), atol=1e-4, rtol=1e-5)
    assert torch.allclose(state, their_state, atol=1e-4, rtol=1e-5)
