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


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_the_layer_returns_kivis_dequantized_entries(bits):
    """Over prefill and decode steps, every step attends to exactly: each full group of `group` keys quantized
    per channel on its own, the partial group in full precision, each stored value quantized per token, and the
    step's fresh entries; the bytes held count codes, scales, minimums and the full-precision keys."""
    from attnzoo.kv.quant import _quantized_layer_class

    layer, group = _quantized_layer_class()(bits, 8), 8
    gen = torch.Generator().manual_seed(bits)
    seen_k, seen_v = [], []
    for n in (21, 1, 1, 5, 1, 9):
        k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(2))
        got_k, got_v = layer.update(k, v)
        old_k = torch.cat(seen_k, 2) if seen_k else k[..., :0, :]
        full = old_k.shape[2] // group * group
        want_k = [dequantize(*quantize(old_k[..., a:a + group, :], bits, dim=-2), bits)
                  for a in range(0, full, group)] + [old_k[..., full:, :], k]
        want_v = [dequantize(*quantize(x, bits, dim=-1), bits) for x in seen_v] + [v]
        assert torch.equal(got_k, torch.cat(want_k, 2)) and torch.equal(got_v, torch.cat(want_v, 2))
        seen_k.append(k)
        seen_v.append(v)
    total = sum(x.shape[2] for x in seen_k)
    full = total // group * group
    per_byte = 8 // bits
    codes = 2 * 2 * total * 16 // per_byte                        # keys of full groups + every value, packed
    codes -= 2 * (total - full) * 16 // per_byte                   # the partial key group is not coded
    scales = 2 * (full // group) * 16 * 2 + 2 * total * 2          # key (scale, min) per group and channel; values'
    assert layer.bytes_held() == codes + scales * 4 + 2 * (total - full) * 16 * 4
