"""Mask composition: and_masks / or_masks / inside_documents equal their dense definitions, build their
block structure from the parts' intervals, and refuse what they cannot compose."""
from __future__ import annotations

import pytest
import torch
from harness import PATTERN_SHAPES, assert_exact, qkv

import attnzoo as az
from attnzoo import and_masks, inside_documents, or_masks
from attnzoo.core.reference import masked_softmax_attention


def positions(sq, sk):
    return torch.arange(sq).view(-1, 1) + sk - sq, torch.arange(sk).view(1, -1)


@pytest.mark.parametrize("pattern", list(PATTERN_SHAPES))
def test_or_of_two_windows_equals_the_mask_written_plainly(pattern):
    causal, sq, sk = PATTERN_SHAPES[pattern]
    q, k, v = qkv(1, 4, 2, sq, sk, 8)
    composed = or_masks(az.get("sliding_window", window=9, right=0), az.get("sliding_window", window=3, right=2))
    i, j = positions(sq, sk)
    plain = ((j >= i - 9) & (j <= i)) | ((j >= i - 3) & (j <= i + 2))
    if causal:
        plain &= j <= i
    assert torch.equal(composed.dense_mask(sq, sk, causal=causal), plain)
    expected = masked_softmax_attention(q, k, v, 8 ** -0.5, plain)
    assert (composed.reference(q, k, v, causal=causal) - expected).abs().max() < 1e-10
    assert_exact(composed, q, k, v, causal)


def test_sliding_window_inside_documents_equals_its_definition():
    q, k, v = qkv(2, 4, 2, 70, 70, 8)
    ids = torch.tensor([[0] * 20 + [1] * 33 + [2] * 17, [0] * 5 + [1] * 60 + [2] * 5])
    attn = inside_documents(az.get("sliding_window", window=6))
    i, j = positions(70, 70)
    plain = (ids.unsqueeze(2) == ids.unsqueeze(1)).unsqueeze(1) & (j >= i - 6) & (j <= i)
    expected = masked_softmax_attention(q, k, v, 8 ** -0.5, plain)
    assert (attn(q, k, v, causal=True, document_ids=ids) - expected).abs().max() < 1e-10
    assert (attn.reference(q, k, v, causal=True, document_ids=ids) - expected).abs().max() < 1e-10
    assert {i.name for i in attn.info.inputs} == {"document_ids", "q_document_ids"}


def test_and_of_intervals_skips_the_same_tiles_as_a_hand_written_mask():
    """The composition's block structure comes from the parts' intervals (no mask evaluation), and equals
    the structure of the dense mask."""
    from attnzoo.core import blocks

    attn = and_masks(az.get("sliding_window", window=40), az.get("prefix_lm", prefix=16))
    call = attn.prepare(*qkv(1, 1, 1, 200, 200, 4), False, None, {})
    assert attn.kv_intervals(call, torch.arange(200)) is not None
    struct = attn.block_structure(call, 32, 32)
    dense = attn.dense_mask(200, 200)
    expected = blocks.from_mask_rows(lambda a, b: dense[a:b].view(1, 1, b - a, 200), 200, 200, 32, 32)
    assert torch.equal(struct.any, expected.any)
    assert (struct.full <= expected.full).all()


def test_or_with_a_per_head_part_and_gqa():
    q, k, v = qkv(1, 4, 2, 50, 50, 8)
    attn = or_masks(az.get("dilated_window", window=8, dilation=2), az.get("sliding_window", window=2))
    assert_exact(attn, q, k, v, True)
    m = attn.dense_mask(50, 50, causal=True, heads=4, kv_heads=2)
    assert m.shape == (4, 50, 50)


def test_flex_can_run_a_composition_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv(1, 2, 1, 128, 128, 16, dtype=torch.float32)
    attn = or_masks(az.get("sliding_window", window=16), az.get("prefix_lm", prefix=4))
    out = attn(q, k, v, backend="flex")
    assert (out.double() - attn.reference(q.double(), k.double(), v.double())).abs().max() < 1e-4


def test_composition_errors():
    with pytest.raises(ValueError, match="at least two"):
        and_masks(az.get("sliding_window"))
    with pytest.raises(TypeError, match="part 1 .*alibi.* must be a configured mask variant"):
        and_masks(az.get("sliding_window"), az.get("alibi"))
    with pytest.raises(TypeError, match="part 0"):
        or_masks("sliding_window", az.get("sliding_window"))
    class CausalOnly(az.SoftmaxVariant):
        name, has_mask, patterns = "causal_only", True, ("causal_self",)

        def mask(self, call, b, h, q_pos, kv_pos):
            return kv_pos >= 0

    with pytest.raises(ValueError, match="no pattern in common"):
        and_masks(CausalOnly(), az.get("prefix_lm"))
    q, k, v = qkv(1, 2, 1, 10, 10, 4)
    with pytest.raises(TypeError, match="missing required input 'document_ids'"):
        inside_documents(az.get("sliding_window", window=2))(q, k, v, causal=True)


@pytest.mark.parametrize("pattern", list(PATTERN_SHAPES))
def test_sink_window_is_the_composition_of_sinks_and_a_window(pattern):
    from attnzoo.variants.masks.local import Sinks

    causal, sq, sk = PATTERN_SHAPES[pattern]
    q, k, v = qkv(1, 4, 2, sq, sk, 8)
    named = az.get("sink_window", sinks=3, window=7)
    composed = or_masks(Sinks(sinks=3), az.get("sliding_window", window=7))
    assert torch.equal(named.dense_mask(sq, sk, causal=causal), composed.dense_mask(sq, sk, causal=causal))
    i, j = positions(sq, sk)
    plain = (j < 3) | ((j >= i - 7) & (j <= i + 7))
    assert torch.equal(named.dense_mask(sq, sk, causal=False), plain)
    assert torch.equal(named(q, k, v, causal=causal), composed(q, k, v, causal=causal))
