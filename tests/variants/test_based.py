"""`based` beyond the shared contract (test_linear_family.py): the Taylor feature map equals the kernel
1 + s + s^2/2, the state size, the sliding-window half of Based built from `sliding_window`, and fla's
naive references (optional)."""
from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.variants.linear.based.naive import taylor_features

F64 = torch.float64


def make(b=2, hq=4, hkv=2, s=19, d=4, dv=3, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(t.to(dtype) for t in (torch.randn(b, hq, s, d, generator=gen, dtype=F64),
                                       torch.randn(b, hkv, s, d, generator=gen, dtype=F64),
                                       torch.randn(b, hkv, s, dv, generator=gen, dtype=F64)))


def test_feature_map_inner_products_are_the_second_order_taylor_kernel():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 16, generator=gen, dtype=F64), torch.randn(50, 16, generator=gen, dtype=F64)
    s = (x * y).sum(-1) / 16 ** 0.5
    fx, fy = taylor_features(x, 16 ** -0.5), taylor_features(y, 16 ** -0.5)
    assert fx.shape == (50, 1 + 16 + 256)                              # the paper's 273 features at d = 16
    assert ((fx * fy).sum(-1) - (1 + s + s ** 2 / 2)).abs().max() < 1e-12


def test_kernel_form_written_per_pair():
    q, k, v = make(hq=2, hkv=2, s=11)
    expected = torch.zeros(2, 2, 11, 3, dtype=F64)
    for t in range(11):
        s = (q[:, :, t:t + 1] * k[:, :, :t + 1]).sum(-1) / 2          # scale = D**-0.5 = 1/2
        w = 1 + s + s ** 2 / 2
        expected[:, :, t] = (w.unsqueeze(-1) * v[:, :, :t + 1]).sum(2) / w.sum(-1, keepdim=True)
    for mode in ("parallel", "chunk", "recurrent"):
        assert (az.get("based", chunk_size=4)(q, k, v, causal=True, mode=mode) - expected).abs().max() < 1e-10


def test_state_size_is_one_plus_d_plus_d_squared():
    attn = az.get("based")
    assert attn.init_state(2, 3, 16, 64).shape == (2, 3, 273, 65)
    assert az.get("based", normalize=False).init_state(2, 3, 16, 64).shape == (2, 3, 273, 64)
    with pytest.raises(ValueError, match=r"state must be \(B, Hkv, 1 \+ D \+ D\^2, Dv \+ 1\)"):
        q, k, v = make(s=3)
        attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.zeros(2, 2, 4, 4, dtype=F64))
    with pytest.raises(TypeError, match="parameter 'normalize' must be bool"):
        az.get("based", normalize="yes")


def test_the_sliding_window_half_of_based_is_built_with_sliding_window():
    """Based's stack puts causal softmax attention over the last w tokens in separate layers:
    az.get('sliding_window', window=w - 1, right=0) with causal=True admits exactly w keys."""
    w = 4
    window = az.get("sliding_window", window=w - 1, right=0)
    mask = window.dense_mask(10, 10, causal=True)
    assert mask.sum(-1).tolist() == [min(i + 1, w) for i in range(10)]
    q, k, v = make(hq=2, hkv=2, s=10)
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(~mask, -torch.inf)
    assert (window(q, k, v, causal=True) - scores.softmax(-1) @ v).abs().max() < 1e-12


@pytest.mark.parametrize("use_norm", [True, False])
def test_equals_fla_naive_parallel_based_when_installed(use_norm):
    naive = pytest.importorskip("fla.ops.based.naive")
    q, k, v = make(b=2, hq=2, hkv=2, s=40, d=16, dv=8, dtype=torch.float32)
    ours = az.get("based", normalize=use_norm)(q, k, v, causal=True)
    theirs = naive.naive_parallel_based(q, k, v, use_norm=use_norm)   # (B, H, T, D); 1e-6 added to its denominator
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_feature_map_equals_fla_taylor_feature_map_when_installed():
    fm = pytest.importorskip("fla.modules.feature_map")
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 16, generator=gen), torch.randn(30, 16, generator=gen)
    theirs = fm.TaylorFeatureMap(16)
    ours = (taylor_features(x, 16 ** -0.5) * taylor_features(y, 16 ** -0.5)).sum(-1)
    assert torch.allclose(ours, (theirs(x) * theirs(y)).sum(-1), atol=1e-5, rtol=1e-5)
