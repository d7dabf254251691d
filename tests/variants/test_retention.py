"""`retention` (RetNet) beyond the shared contract (test_linear_family.py): the D-matrix form, RetNet's decay
schedule, the `decay` override, and fla's naive references (optional)."""
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


def d_matrix_form(q, k, v, gammas):
    """RetNet eq. (5)-(6): (Q K^T ⊙ D) V with D_nm = gamma^(n-m) for n >= m, heads equal (Hq == Hkv)."""
    s = q.shape[2]
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=F64)
    for h, gamma in enumerate(gammas):
        d = torch.tensor([[gamma ** (a - b) if a >= b else 0.0 for b in range(s)] for a in range(s)], dtype=F64)
        out[:, h] = ((q[:, h] @ k[:, h].transpose(-1, -2)) * q.shape[-1] ** -0.5 * d) @ v[:, h]
    return out


def test_default_decays_are_retnets_schedule_and_the_d_matrix_form_holds():
    q, k, v = make(hq=3, hkv=3)
    gammas = [1 - 2 ** (-5 - h) for h in range(3)]
    expected = d_matrix_form(q, k, v, gammas)
    for mode in ("parallel", "chunk", "recurrent"):
        assert (az.get("retention", chunk_size=4)(q, k, v, causal=True, mode=mode) - expected).abs().max() < 1e-10
        o = az.get("retention", decay=tuple(gammas))(q, k, v, causal=True, mode=mode)
        assert (o - expected).abs().max() < 1e-10


def test_decay_override_one_float_or_one_per_kv_head():
    q, k, v = make(hq=2, hkv=2)
    o = az.get("retention", decay=0.8)(q, k, v, causal=True)
    assert (o - d_matrix_form(q, k, v, [0.8, 0.8])).abs().max() < 1e-10
    assert (az.get("retention", decay=[0.5, 0.99])(q, k, v, causal=True)
            - d_matrix_form(q, k, v, [0.5, 0.99])).abs().max() < 1e-10


def test_gqa_query_heads_of_a_group_share_the_kv_heads_decay():
    q, k, v = make(hq=4, hkv=2)
    o = az.get("retention", decay=(0.7, 0.9))(q, k, v, causal=True)
    for h in range(4):
        alone = az.get("retention", decay=(0.7, 0.9)[h // 2])(q[:, h:h + 1], k[:, h // 2:h // 2 + 1],
                                                              v[:, h // 2:h // 2 + 1], causal=True)
        assert (o[:, h:h + 1] - alone).abs().max() < 1e-10


def test_bad_decays_name_the_argument():
    for bad in (0.0, 1.0, 1.5, -0.1, math.nan, (), (0.5, 1.0)):
        with pytest.raises(ValueError, match=r"parameter 'decay' must be None, a float in \(0, 1\)"):
            az.get("retention", decay=bad)
    for bad in ("0.9", True):
        with pytest.raises(TypeError, match="parameter 'decay' must be"):
            az.get("retention", decay=bad)
    q, k, v = make(hkv=2)
    with pytest.raises(ValueError, match="parameter 'decay' has 3 entries but the call has Hkv=2"):
        az.get("retention", decay=(0.5, 0.6, 0.7))(q, k, v, causal=True)
    with pytest.raises(ValueError, match="parameter 'decay' has 3 entries"):
        az.get("retention", decay=(0.5, 0.6, 0.7)).step(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                                         torch.zeros(2, 2, 4, 3, dtype=F64))


def test_equals_fla_naive_retention_when_installed():
    naive = pytest.importorskip("fla.ops.retention.naive")
    q, k, v = make(b=2, hq=4, hkv=4, s=40, d=8, dv=8, dtype=torch.float32)
    ours = az.get("retention")(q, k, v, causal=True)
    theirs = naive.naive_retention(q, k, v)                           # head-first (B, H, T, D), RetNet's schedule
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_equals_fla_naive_simple_gla_with_states_when_installed():
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    q, k, v = make(b=2, hq=3, hkv=3, s=45, d=8, dv=8, dtype=torch.float32)
    s0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    attn = az.get("retention")
    ours, state = attn(q, k, v, causal=True, initial_state=s0, output_final_state=True)
    g = torch.log(1 - 2.0 ** (-5.0 - torch.arange(3.0))).view(1, 1, 3).expand(2, 45, 3)
    theirs, their_state = naive.naive_chunk_simple_gla(*(t.transpose(1, 2) for t in (q, k, v)), g,
                                                       initial_state=s0.clone(), output_final_state=True)
    assert torch.allclose(ours, theirs.transpose(1, 2), atol=1e-4, rtol=1e-5)
    assert torch.allclose(state, their_state, atol=1e-4, rtol=1e-5)
