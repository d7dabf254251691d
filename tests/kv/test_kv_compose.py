"""Composed presses: a pipeline keeps what its parts keep applied in order, stores it quantized when
kv_quant comes last, and counts every byte it holds (codes, scales, minimums, offsets, the tail)."""
from __future__ import annotations

import math

import pytest
import torch
from kv_tiny import greedy_logits, ids, tiny_llama

import attnzoo.kv as kv
from attnzoo.kv import ragged
from attnzoo.kv.base import keep_count


@pytest.fixture(scope="module")
def llama64():
    return tiny_llama().double()


def _run(model, press, x, layout=None):
    with torch.no_grad(), press(model, layout=layout) as session:
        model(input_ids=x)
    return session


def test_pipeline_keeps_what_its_parts_keep_in_order(llama64):
    """snapkv, then knorm among what snapkv kept: knorm is query-free, so its choice can be recomputed
    from the keys snapkv's own session holds."""
    x = ids(100)
    first, second = kv.get("snapkv", ratio=0.5, window=8), kv.get("knorm", ratio=0.75)
    both = _run(llama64, first + second, x)
    alone = _run(llama64, first, x, layout="rectangular")
    n_keep = int(keep_count(torch.tensor(100), 0.75))
    for layer in range(3):
        got = both.kept_tokens(layer)[0]
        keys = alone.cache.layers[layer].keys[0]
        slots = alone._slots[layer]
        for h in range(2):
            valid = slots.bias[0, h] > -math.inf
            norms = keys[h].norm(dim=-1).masked_fill(~valid, math.inf)
            chosen = slots.index[0, h][torch.sort(norms, stable=True).indices[:n_keep]]
            assert got[h].tolist() == sorted(chosen.tolist())


def test_pipeline_with_kv_quant_stores_the_quantized_kept_entries(llama64):
    x = ids(100)
    first = kv.get("snapkv", ratio=0.5, window=8).with_budgets([[0.2, 0.7]] * 3)
    quant = _run(llama64, first + kv.get("kv_quant", bits=4, group=16), x)
    plain = _run(llama64, kv.compose(first), x)
    for layer in range(3):
        p, q = plain.cache.layers[layer].packed, quant.cache.layers[layer].packed
        want = ragged.Packed(p.keys(), p.values(), p.lengths, None, bits=4, group=16)
        assert torch.equal(q.keys(), want.keys()) and torch.equal(q.values(), want.values())
        assert (q.keys() - p.keys()).abs().max() < 0.2 * p.keys().abs().max()
        # bytes: 4-bit key codes + fp16 scale and minimum per channel and group of 16 entries of a head,
        # 4-bit value codes + fp16 scale and minimum per entry, int32 offsets
        groups = int(((p.lengths + 15) // 16).sum())
        n, d = p.n_entries, 12
        assert q.bytes_held() == n * d // 2 + groups * d * 2 * 2 + n * d // 2 + n * 2 * 2 + 3 * 4
    assert quant.stats()["entries"] == plain.stats()["entries"]
    assert quant.stats()["bytes"] < plain.stats()["bytes"] / 5


def test_composed_decoding_stays_close_to_the_unquantized_pipeline(llama64):
    x = ids(120)
    first = kv.get("razor", ratio=0.5, recent=16)
    full = greedy_logits(llama64, x, steps=3, press=kv.compose(first))
    eight = greedy_logits(llama64, x, steps=3, press=first + kv.get("kv_quant", bits=8))
    torch.testing.assert_close(eight[0], full[0], atol=1e-10, rtol=0)  # prefill attends to the fresh entries
    scale = full[1].abs().max()
    for a, b in zip(full[1:], eight[1:]):
        assert (a - b).abs().max() / scale < 0.02


def test_compose_flattens_and_checks_its_parts():
    a, b, q = kv.get("razor", ratio=0.5), kv.get("tova", ratio=0.75), kv.get("kv_quant", bits=2)
    p = a + b + q
    assert [x.name for x in p.parts] == ["razor", "tova", "kv_quant"] and p.quantization() == (2, 32)
    assert p.label == "razor(0.5)+tova(0.75)+kv_quant(int2)" and p.ratio == 0.75 and p.layout == "ragged"
    with pytest.raises(ValueError, match="must come last"):
        kv.compose(q, a)
    with pytest.raises(ValueError, match="read-sparse"):
        kv.compose(kv.get("quest", ratio=0.5), q)
    with pytest.raises(TypeError, match="KV presses"):
        kv.compose(a, "tova")
    with pytest.raises(ValueError, match="needs layout='ragged'"):
        p(torch.nn.Linear(1, 1), layout="rectangular")
