"""TitansMemory and MegaAttention: token mixers whose variant inputs are learned. A sequence fed as a prefix and
then token by token through the cache (the variant's O(1) step) equals one pass; gradients reach the learned
inputs; bad configuration is refused."""
from __future__ import annotations

import pytest
import torch

from attnzoo.nn import MegaAttention, StateCache, TitansMemory


def _pieces_equal_one_pass(module, x):
    whole, cache = module(x)
    outs, piece_cache = [], None
    y, piece_cache = module(x[:, :7], cache=piece_cache)
    outs.append(y)
    for t in range(7, x.shape[1]):   # one decoded token at a time: the step path
        y, piece_cache = module(x[:, t:t + 1], cache=piece_cache)
        outs.append(y)
    assert isinstance(piece_cache, StateCache) and piece_cache.length == x.shape[1]
    assert (torch.cat(outs, 1) - whole).abs().max() < 1e-10
    assert (piece_cache.state - cache.state).abs().max() < 1e-10


@pytest.mark.parametrize("module", [
    lambda: TitansMemory(16, 4, kv_heads=2, mini_batch=3),
    lambda: MegaAttention(16, 2, ema_dim=3, chunk=5),
], ids=["titans", "mega"])
def test_prefix_then_decoding_equals_one_pass_and_gradients_reach_the_learned_inputs(module):
    torch.manual_seed(0)
    m = module().double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    with torch.no_grad():
        _pieces_equal_one_pass(m, x)
    y, _ = m(x)
    y.square().sum().backward()
    learned = [m.hyper.weight] if isinstance(m, TitansMemory) else [m.alpha_logit, m.delta_logit, m.beta, m.eta]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)


def test_titans_memory_inputs_are_in_range_and_start_where_documented():
    m = TitansMemory(8, 2, max_lr=0.5)
    inputs = m.memory_inputs(torch.zeros(1, 3, 8))
    assert inputs["theta"].shape == (1, 2, 3)
    assert torch.allclose(inputs["theta"], torch.full((1, 2, 3), 0.5 * torch.sigmoid(torch.tensor(-2.0)).item()))
    assert torch.allclose(inputs["eta"], torch.sigmoid(torch.tensor(2.0)).expand(1, 2, 3))
    assert torch.allclose(inputs["alpha"], torch.sigmoid(torch.tensor(-4.0)).expand(1, 2, 3))
    assert TitansMemory(**m.config).config == m.config
    with pytest.raises(ValueError, match="max_lr"):
        TitansMemory(8, 2, max_lr=0.0)


def test_mega_attention_is_single_head_per_head_and_rebuilds_from_its_config():
    m = MegaAttention(8, 2, ema_dim=3, chunk=4)
    ema = m.ema_inputs()
    assert ema["ema_alpha"].shape == (2, 4, 3) and bool(((ema["ema_alpha"] > 0) & (ema["ema_alpha"] < 1)).all())
    assert MegaAttention(**m.config).config == m.config
    with pytest.raises(TypeError, match="kv_heads"):
        MegaAttention(8, 2, kv_heads=1)
