"""HedgehogFeatureMap: it is the `hedgehog` variant's maps (weights reach every form, gradients reach the
weights), its attention weights are the student the distillation fits, and on SmolLM2's real activations a
tiny distillation budget lowers the loss and brings the output closer to softmax attention than the
untrained (identity) maps, on held-out text."""
from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import models
from attnzoo.bench.capture import captured_qkv
from attnzoo.lab.hedgehog import evaluate, windows
from attnzoo.nn.hedgehog import (
    HedgehogFeatureMap,
    distill,
    distillation_loss,
    softmax_weights,
)

F64 = torch.float64


def make(hq=4, hkv=2, s=12, d=4, dv=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, s, d, generator=gen, dtype=F64), torch.randn(1, hkv, s, d, generator=gen, dtype=F64),
            torch.randn(1, hkv, s, dv, generator=gen, dtype=F64))


def test_untrained_maps_are_the_identity_map_of_the_variant():
    q, k, v = make()
    maps = HedgehogFeatureMap(4, 2, 4).double()
    for causal in (True, False):
        assert (maps.attention(q, k, v, causal=causal) - az.get("hedgehog")(q, k, v, causal=causal)).abs().max() < 1e-12


def test_weights_are_the_student_and_gradients_reach_the_maps():
    q, k, v = make()
    maps = HedgehogFeatureMap(4, 2, 4, feature_dim=6).double()
    with torch.no_grad():
        for p in maps.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for causal in (True, False):
        w = maps.weights(q, k, causal)
        assert torch.allclose(w.sum(-1), torch.ones((), dtype=F64)) and (w > 0).sum() > 0
        o = maps.attention(q, k, v, causal=causal, mode="chunk")
        assert (w @ v.repeat_interleave(2, dim=1) - o).abs().max() < 1e-12
    maps.attention(q, k, v, causal=True).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in maps.parameters())
    with pytest.raises(ValueError, match="role must be 'q' or 'k'"):
        maps(q, "v")
    with pytest.raises(ValueError, match=r"x must be \(B, 2, S, 4\) for role 'k'"):
        maps(q, "k")
    with pytest.raises(ValueError, match="heads % kv_heads"):
        HedgehogFeatureMap(3, 2, 4)


def test_distillation_loss_is_the_cross_entropy_to_the_teacher():
    q, k, _ = make()
    teacher = softmax_weights(q, k)
    assert torch.allclose(teacher.sum(-1), torch.ones((), dtype=F64)) and not teacher[..., 0, 1:].any()
    ce = distillation_loss(teacher, teacher)
    entropy = -(teacher * teacher.clamp_min(1e-300).log()).sum(-1).mean()
    assert abs(ce - entropy) < 1e-12 and distillation_loss(HedgehogFeatureMap(4, 2, 4).double().weights(q, k),
                                                           teacher) > ce
    with pytest.raises(ValueError, match="at least one"):
        distill(HedgehogFeatureMap(4, 2, 4), [], steps=1)


def test_distillation_on_smollm2_activations_beats_the_untrained_maps(smollm2, tmp_path):
    layer = 5
    train, _ = captured_qkv(models.DEFAULT_MODEL, 128, [layer], lambda: smollm2, split="train", cache_dir=tmp_path)
    held, _ = captured_qkv(models.DEFAULT_MODEL, 128, [layer], lambda: smollm2, split="heldout", cache_dir=tmp_path)
    q, k, _ = train[layer]
    torch.manual_seed(0)
    maps = HedgehogFeatureMap(q.shape[1], k.shape[1], q.shape[-1], feature_dim=16)
    before = evaluate(maps, *held[layer])
    history = distill(maps, [(q, k)], steps=25, lr=2e-2, progress=False)["loss"]
    after = evaluate(maps, *held[layer])
    assert history[-1] < 0.6 * history[0]
    assert after["teacher_entropy"] < after["distillation_loss"] < 0.6 * before["distillation_loss"]
    assert after["output_error"] < 0.7 * before["output_error"]
    # ... and closer to softmax than plain linear attention (elu + 1) on the same held-out activations
    hq, hk, hv = held[layer]
    exact = softmax_weights(hq, hk) @ hv.repeat_interleave(hq.shape[1] // hk.shape[1], dim=1)
    linear = az.get("linear")(hq, hk, hv, causal=True)
    assert after["output_error"] < ((linear - exact).norm() / exact.norm()).item()


def test_hedgehog_attention_is_a_token_mixer_with_a_decoding_cache():
    from attnzoo.nn import HedgehogAttention

    torch.manual_seed(0)
    m = HedgehogAttention(dim=16, heads=4, kv_heads=2, feature_dim=5, chunk_size=4).double()
    with torch.no_grad():
        for p in m.maps.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 11, 16, dtype=F64)
    y, cache = m(x)
    assert cache.state.shape == (2, 2, 2 * 5, 4 + 1) and m.state_bytes(2, F64) == cache.nbytes
    y1, c1 = m(x[:, :6])
    outs = [y1]
    for t in range(6, 11):                                   # one token at a time: the variant's step
        y_t, c1 = m(x[:, t:t + 1], cache=c1)
        outs.append(y_t)
    assert (torch.cat(outs, 1) - y).abs().max() < 1e-10 and (c1.state - cache.state).abs().max() < 1e-10
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.maps.parameters())
    assert type(m)(**m.config).maps.feature_dim == 5


def test_feature_map_equals_fla_hedgehog_feature_map_when_installed():
    """fla's map is softmax([2 z, -2 z]) with z = x W^T + b shared by the heads: ours with W' = 2 W^T, b' = 2 b."""
    fm = pytest.importorskip("fla.modules.feature_map")
    torch.manual_seed(3)
    theirs = fm.HedgehogFeatureMap(8)
    with torch.no_grad():
        theirs.layer.weight.add_(0.3 * torch.randn(8, 8))
        theirs.layer.bias.add_(0.3 * torch.randn(8))
    maps = HedgehogFeatureMap(2, 2, 8)
    with torch.no_grad():
        for w, b in ((maps.weight_q, maps.bias_q), (maps.weight_k, maps.bias_k)):
            w.copy_(2 * theirs.layer.weight.T.expand(2, 8, 8))
            b.copy_(2 * theirs.layer.bias.expand(2, 8))
    x = torch.randn(1, 2, 5, 8)
    assert torch.allclose(maps(x, "q"), theirs(x), atol=1e-6) and torch.allclose(maps(x, "k"), theirs(x), atol=1e-6)


def test_training_windows_are_consecutive_slices():
    x = torch.randn(1, 3, 10, 2)
    w = windows(x, 4)
    assert w.shape == (2, 3, 4, 2) and torch.equal(w[0], x[0, :, :4]) and torch.equal(w[1], x[0, :, 4:8])
    with pytest.raises(ValueError, match="longer than the 10 captured tokens"):
        windows(x, 11)
