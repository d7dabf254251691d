"""The fast decoding paths give what the general ones give: uniform per-head budgets in the ragged
layout (batched products over views) == the padded, masked definition; quantized entries dequantized
by broadcasting == the per-entry gathers; a decoding step that builds no Step == one that does."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_tiny import ids, tiny_llama

import attnzoo.kv as kv
from attnzoo.kv import quant, ragged
from attnzoo.kv.base import with_cache


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), groups=st.sampled_from([1, 3]), sq=st.integers(1, 4),
       n=st.integers(0, 12), tail_extra=st.integers(0, 3), bias=st.booleans(), padded=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_uniform_ragged_attention_equals_the_padded_masked_definition(batch, heads, groups, sq, n, tail_extra, bias,
                                                                      padded, seed):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    total = batch * heads * n
    packed = ragged.Packed(torch.randn(total, 8, **f64), torch.randn(total, 8, **f64),
                           torch.full((batch * heads,), n), torch.randn(total, **f64) if bias else None)
    assert packed.uniform == n
    t = sq + tail_extra
    q = torch.randn(batch, heads * groups, sq, 8, **f64)
    tk, tv = torch.randn(batch, heads, t, 8, **f64), torch.randn(batch, heads, t, 8, **f64)
    valid = torch.rand(batch, t, generator=gen) > 0.3 if padded else None
    got = ragged.ragged_attention(q, packed, tk, tv, valid, 0.35)
    want = ragged.padded_attention(q, packed, tk, tv, valid, 0.35)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("bits", quant.BITS)
@pytest.mark.parametrize("n", [8, 13, 3])  # whole groups, whole groups + a partial one, one partial group
def test_uniform_quantized_keys_equal_the_per_entry_gathers(bits, n):
    gen = torch.Generator().manual_seed(bits + n)
    lengths = torch.full((4,), n)
    keys, values = torch.randn(4 * n, 16, generator=gen), torch.randn(4 * n, 16, generator=gen)
    packed = ragged.Packed(keys, values, lengths, bits=bits, group=4)
    codes, scale, lo = packed._keys
    groups, _ = ragged.key_groups(lengths, 4)  # the general layout, written out per entry
    want = quant.unpack_codes(codes, bits).float() * scale.float()[groups] + lo.float()[groups]
    assert torch.equal(packed.keys(), want)
    v_codes, v_scale, v_lo = packed._values
    assert torch.equal(packed.values(), quant.unpack_codes(v_codes, bits).float() * v_scale.float() + v_lo.float())
    assert (packed.keys() - keys).abs().max() <= 0.51 * scale.float().max() + 1e-6


@pytest.mark.parametrize("bits", quant.BITS)
def test_codes_pack_in_planes_and_dequantize_into_any_strides(bits):
    per = 8 // bits
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (3, 5, 16), generator=gen, dtype=torch.uint8)
    packed = quant.pack_codes(codes, bits)
    assert packed.shape == (3, 5, 16 // per) and torch.equal(quant.unpack_codes(packed, bits), codes)
    width = 16 // per
    for i in range(per):  # byte j holds codes j, j + width, j + 2 * width...
        assert torch.equal((packed >> (bits * i)) & (2 ** bits - 1), codes[..., i * width:(i + 1) * width])
    scale, lo = torch.rand(3, 5, 1, generator=gen), torch.randn(3, 5, 1, generator=gen)
    want = codes.float() * scale + lo
    out = torch.zeros(3, 7, 16)[:, 1:6]  # a strided view of a larger tensor
    quant.dequantize_into(out, packed, scale, lo, bits)
    assert torch.equal(out, want) and torch.equal(quant.dequantize(packed, scale, lo, bits), want)


def _with_a_step_every_forward(press):
    """The same press, but with `keep` overridden for decoding: its session builds a Step (slot
    bookkeeping, masks) on every forward, the path every step took before decoding skipped it."""

    class EveryForward(type(press)):
        stages = ("prefill", "decode")

        def keep(self, step):
            return super().keep(step) if step.prefill else None

    return EveryForward(**press.config)


@torch.no_grad()
def _decode(model, press, steps=4):
    """Prefill logits, `steps` one-token decoding logits, then a two-token forward's; and the session's stats and
    kept tokens after all of them."""
    from transformers import DynamicCache

    cache = with_cache(model, DynamicCache(config=model.config))
    with press(model) as session:
        out = model(input_ids=ids(60), **cache)
        logits = [out.logits]
        for _ in range(steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), **cache)
            logits.append(out.logits)
        logits.append(model(input_ids=ids(2, seed=3), **cache).logits)  # not one token: a Step, bookkeeping caught up
        out = model(input_ids=out.logits[:, -1:].argmax(-1), **cache)
        logits.append(out.logits)
        return logits, session.stats(), [session.kept_tokens(layer) for layer in range(3)]


@pytest.mark.parametrize("press", [kv.get("snapkv", ratio=0.5, window=8), kv.get("kv_quant", bits=4, group=8)],
                         ids=["snapkv", "kv_quant"])
def test_decoding_without_a_step_equals_decoding_with_one(press):
    model = tiny_llama().double()
    fast, fast_stats, fast_kept = _decode(model, press)
    slow, slow_stats, slow_kept = _decode(model, _with_a_step_every_forward(press))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert fast_stats == slow_stats
    for a, b in zip(fast_kept, slow_kept):
        assert [[t.tolist() for t in row] for row in a] == [[t.tolist() for t in row] for row in b]
