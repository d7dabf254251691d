"""Ragged per-head cache: attention over packed entries == the padded, masked definition; a ragged
session == the rectangular one in outputs (float64) while holding fewer bytes; generate uses it."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_tiny import greedy_logits, ids, left_padded, tiny_llama

import attnzoo.kv as kv
from attnzoo.kv import ragged


def _random_packed(gen, batch, heads, lengths, d, bias=False, bits=None):
    lengths = torch.tensor(lengths)
    n = int(lengths.sum())
    keys, values = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen,
                                                                                      dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    return ragged.Packed(keys, values, lengths, b, bits)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), groups=st.sampled_from([1, 3]), sq=st.integers(1, 5),
       tail_extra=st.integers(0, 3), seed=st.integers(0, 2 ** 16), bias=st.booleans(), data=st.data())
def test_ragged_attention_equals_the_padded_masked_definition(batch, heads, groups, sq, tail_extra, seed, bias, data):
    gen = torch.Generator().manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(0, 9), min_size=batch * heads, max_size=batch * heads))
    packed = _random_packed(gen, batch, heads, lengths, 8, bias)
    t = sq + tail_extra
    q = torch.randn(batch, heads * groups, sq, 8, generator=gen, dtype=torch.float64)
    tk = torch.randn(batch, heads, t, 8, generator=gen, dtype=torch.float64)
    tv = torch.randn(batch, heads, t, 8, generator=gen, dtype=torch.float64)
    valid = None if data.draw(st.booleans()) else torch.rand(batch, t, generator=gen) > 0.3  # None: no padding
    want = ragged.padded_attention(q, packed, tk, tv, valid, 0.35)
    for loop_segments in (0, 64):  # per-entry gathers, one product per segment
        got = ragged.ragged_attention(q, packed, tk, tv, valid, 0.35, loop_segments)
        assert got.shape == (batch, heads * groups, sq, 8)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_a_row_with_nothing_to_attend_to_gives_zeros():
    gen = torch.Generator().manual_seed(0)
    packed = _random_packed(gen, 2, 1, [0, 4], 8)
    q = torch.randn(2, 2, 1, 8, dtype=torch.float64)
    tk = tv = torch.randn(2, 1, 1, 8, dtype=torch.float64)
    out = ragged.ragged_attention(q, packed, tk, tv, torch.tensor([[False], [True]]), 1.0)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0


def test_packed_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="lengths sum"):
        ragged.Packed(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="keep must be"):
        ragged.pack(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout must be"):
        kv.get("snapkv", ratio=0.5)(torch.nn.Linear(1, 1), layout="paged")


def test_pack_unpack_round_trip_and_bytes():
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 3, 7, 8, generator=gen), torch.randn(2, 3, 7, 8, generator=gen)
    keep = torch.rand(2, 3, 7, generator=gen) > 0.5
    p = ragged.pack(keys, values, keep)
    k, v, bias = ragged.unpack(p, 2)
    for b in range(2):
        for h in range(3):
            c = int(keep[b, h].sum())
            assert torch.equal(k[b, h, :c], keys[b, h][keep[b, h]]) and (bias[b, h, c:] == -math.inf).all()
    assert p.bytes_held() == int(keep.sum()) * 8 * 4 * 2 + 7 * 4  # entries + (segments + 1) int32 offsets


@pytest.fixture(scope="module")
def llama64():
    return tiny_llama().double()


def _per_head_snapkv():
    # per-(layer, KV head) ratios: the rectangular cache pads every layer to its fullest head
    return kv.get("snapkv", ratio=0.5, window=8).with_budgets([[0.1, 0.8], [0.5, 0.9], [0.0, 0.7]])


@pytest.mark.parametrize("make", [_per_head_snapkv, lambda: kv.get("razor", ratio=0.5, recent=16),
                                  lambda: kv.get("duo_attention", ratio=0.5, recent=16, sinks=4)],
                         ids=["snapkv_per_head", "razor", "duo_attention"])
def test_ragged_session_equals_rectangular_in_float64_while_holding_fewer_bytes(llama64, make):
    x = ids(120)
    press = make()
    rect = greedy_logits(llama64, x, steps=4, press=press, layout="rectangular")
    rag = greedy_logits(llama64, x, steps=4, press=press, layout="ragged")
    for a, b in zip(rect, rag):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
    held = {}
    for layout in ("rectangular", "ragged"):
        with torch.no_grad(), press(llama64, layout=layout) as session:
            llama64(input_ids=x)
            held[layout] = session.stats()
    assert held["ragged"]["entries"] == held["rectangular"]["entries"]
    assert held["ragged"]["bytes"] < held["rectangular"]["bytes"]
    if make is _per_head_snapkv:  # entries x (key + value) x head dim 12 x float64, + 3 int32 offsets per layer
        assert held["ragged"]["bytes"] == held["ragged"]["entries"] * 2 * 12 * 8 + 3 * 3 * 4


def test_generate_uses_the_ragged_cache(llama64):
    x = ids(90)
    press = _per_head_snapkv()
    with press(llama64, layout="rectangular"):
        rect = llama64.generate(x, max_new_tokens=6, do_sample=False)
    with press(llama64, layout="ragged") as session:
        rag = llama64.generate(x, max_new_tokens=6, do_sample=False)
        layers = session.cache.layers
        given = llama64.generate(x, max_new_tokens=6, do_sample=False, past_key_values=kv.ragged_cache(llama64.config))
    assert torch.equal(rect, rag) and torch.equal(rect, given)
    assert type(layers[0]).__name__ == "RaggedLayer" and layers[0].packed is not None
    assert layers[0].keys.shape[2] == 5  # generated tokens after the prefill sit in the full-precision tail


def test_a_ragged_cache_outside_its_session_raises(llama64):
    press = _per_head_snapkv()
    with torch.no_grad(), press(llama64, layout="ragged"):
        cache = llama64(input_ids=ids(40)).past_key_values
    with pytest.raises(RuntimeError, match="active attnzoo.kv press"):
        llama64(input_ids=ids(1), past_key_values=cache)


def test_a_left_padded_batch_decodes_the_same_in_both_layouts(llama64):
    rows = [ids(50, seed=5)[0], ids(70, seed=6)[0]]
    batch, mask = left_padded(rows)
    press = _per_head_snapkv()
    out = {}
    for layout in ("rectangular", "ragged"):
        with press(llama64, layout=layout):
            out[layout] = llama64.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                           output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out["rectangular"].sequences, out["ragged"].sequences)
    for a, b in zip(out["rectangular"].scores, out["ragged"].scores):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
