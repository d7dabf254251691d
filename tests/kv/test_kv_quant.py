"""kv_quant: round-trip error bounds, bytes actually held, logits close to the full-precision cache."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_tiny import greedy_logits, ids, tiny_llama

import attnzoo.kv as kv
from attnzoo.kv.quant import dequantize, quantize


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([8, 4, 2]), dim=st.sampled_from([-1, -2]), seed=st.integers(0, 2 ** 16),
       scale=st.floats(1e-3, 1e3))
def test_round_trip_error_is_at_most_half_a_step(bits, dim, seed, scale):
    x = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(seed)) * scale
    codes, step, lo = quantize(x, bits, dim)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 8 * bits // 8
    err = (dequantize(codes, step, lo, bits) - x).abs()
    assert (err <= step / 2 * (1 + 1e-4) + 1e-6 * scale).all()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("bits, tolerance", [(8, 0.02), (4, 0.3)])
def test_quantized_cache_stays_close_to_the_full_one(llama, bits, tolerance):
    x = ids(150)
    full = greedy_logits(llama, x, steps=5)
    quant = greedy_logits(llama, x, steps=5, press=kv.get("kv_quant", bits=bits))
    assert torch.equal(full[0], quant[0])  # prefill attends to the fresh keys and values
    scale = full[1].abs().max()
    for a, b in zip(full[1:], quant[1:]):
        assert (a - b).abs().max() / scale < tolerance


def test_bytes_held_shrink_with_the_bit_width(llama):
    x = ids(256)
    held = {}
    for bits in (8, 4):
        with torch.no_grad(), kv.get("kv_quant", bits=bits, group=32)(llama) as session:
            llama(input_ids=x)
            held[bits] = session.stats()
    full = 256 * 2 * 12 * 2 * 4 * 3  # tokens x kv heads x head dim x (k, v) x float32 x layers
    # codes + per-group key scales/minimums + per-token value scales/minimums
    assert held[8]["bytes"] == 3 * (2 * 256 * 2 * 12 + 2 * (256 // 32) * 12 * 4 * 2 + 2 * 256 * 4 * 2)
    assert held[8]["bytes"] < full / 2.5 and held[4]["bytes"] < held[8]["bytes"] * 0.75
    assert held[8]["removed"] == 0.0 and held[8]["entries"] == 256 * 2 * 3
