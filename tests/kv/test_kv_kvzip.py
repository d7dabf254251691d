"""kvzip: the prefill also runs the model on "repeat the context" + the context, in the same forward; an entry's
score is the largest attention any reconstruction query of its KV group gives it. Checked against that definition
written plainly (the model run on context + probe with eager attention, float64), and the session's probe
plumbing: the context's logits and cache are the model's own, the probe's entries never stay, positions go on
from the context, batches equal their rows, and pipelines give the probe to the probing part only."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from kv_tiny import CharTokenizer, ids, left_padded, tiny_llama

import attnzoo.kv as kv
from attnzoo.kv.base import keep_count, with_cache
from attnzoo.kv.scorers import chat_turn


TOK = CharTokenizer()


@pytest.fixture(scope="module")
def llama64():
    return tiny_llama().double()


@pytest.fixture(scope="module")
def eager64(llama64):
    """The same weights with eager attention, which returns its probabilities (the definition's)."""
    model = copy.deepcopy(llama64)
    model.set_attn_implementation("eager")
    return model


def _prefill(model, press, x, layout=None, mask=None):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), press(model, TOK, layout=layout) as session:
        out = model(input_ids=x, attention_mask=mask, **with_cache(model, cache))
    return session, out, cache


def definition_scores(eager, context: list[int], request: list[int], sinks: int) -> list[torch.Tensor]:
    """Per layer (Hkv, L): max over the reconstruction queries and each KV group's query heads of their
    attention to each context token, in the model run on context + request + context; sinks score inf."""
    full = torch.tensor([context + request + context])
    with torch.no_grad():
        att = eager(input_ids=full, output_attentions=True).attentions
    n, hkv = len(context), eager.config.num_key_value_heads
    out = []
    for a in att:  # (1, Hq, T, T)
        p = a[0, :, n:, :n].amax(1)  # (Hq, L)
        s = p.view(hkv, -1, n).amax(1)
        s[:, :sinks] = math.inf
        out.append(s)
    return out


@pytest.mark.parametrize("ratio, head_budgets, small_blocks", [(0.5, True, False), (0.75, True, True),
                                                               (0.6, False, False)])
def test_kvzip_keeps_the_top_scores_of_its_definition(llama64, eager64, ratio, head_budgets, small_blocks,
                                                      monkeypatch):
    if small_blocks:  # the reconstruction queries scored 16 at a time: the running max over blocks
        monkeypatch.setattr(type(kv.get("kvzip")), "block_logits", {"cpu": 1})
    x = ids(90, seed=3)
    press = kv.get("kvzip", ratio=ratio, head_budgets=head_budgets)
    session, _, _ = _prefill(llama64, press, x)
    request = TOK(press.request)["input_ids"] + chat_turn(TOK)[1]
    scores = definition_scores(eager64, x[0].tolist(), request, sinks=4)
    n_keep = int(keep_count(torch.tensor(90), ratio))
    for layer, s in enumerate(scores):
        if head_budgets:  # the layer's heads ranked together
            flat = torch.sort(s.reshape(-1), descending=True, stable=True).indices[:n_keep * s.shape[0]]
            chosen = [sorted((flat[flat // 90 == h] % 90).tolist()) for h in range(s.shape[0])]
        else:
            chosen = [sorted(torch.sort(s[h], descending=True, stable=True).indices[:n_keep].tolist())
                      for h in range(s.shape[0])]
        got = [t.tolist() for t in session.kept_tokens(layer)[0]]
        assert got == chosen, layer
        assert sum(len(c) for c in got) == n_keep * s.shape[0]
    if head_budgets:  # the heads' shares differ: that is what ragged storage is for
        assert len({len(t) for layer in range(3) for t in session.kept_tokens(layer)[0]}) > 1


@pytest.mark.parametrize("layout", ["rectangular", "ragged"])
def test_probe_leaves_the_contexts_logits_and_cache_as_the_models_own(llama64, layout):
    """The probe follows the context, so causality leaves the context's logits and keys as without it; its
    own entries leave the cache; kept entries are the model's keys and values for those tokens."""
    from transformers import DynamicCache

    x = ids(75, seed=4)
    plain = DynamicCache(config=llama64.config)
    with torch.no_grad():
        base = llama64(input_ids=x, **with_cache(llama64, plain)).logits
    session, out, cache = _prefill(llama64, kv.get("kvzip", ratio=0.5), x, layout=layout)
    assert out.logits.shape == base.shape
    torch.testing.assert_close(out.logits, base, rtol=0, atol=1e-10)
    for layer in range(3):
        kept = session.kept_tokens(layer)[0]
        if layout == "ragged":
            from attnzoo.kv import ragged

            keys, values, _ = ragged.unpack(cache.layers[layer].packed, 1)
        else:
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
        for h, tokens in enumerate(kept):
            assert int(tokens.max()) < 75
            torch.testing.assert_close(keys[0, h, :len(tokens)], plain.layers[layer].keys[0, h, tokens], rtol=0,
                                       atol=1e-12)
            torch.testing.assert_close(values[0, h, :len(tokens)], plain.layers[layer].values[0, h, tokens], rtol=0,
                                       atol=1e-12)
    assert session.stats()["removed"] == pytest.approx(0.5, abs=0.02)


def test_decoding_after_kvzip_goes_on_from_the_context(llama64):
    """After the prefill the next token sits at position L (not L + probe): a step's logits equal the model's
    attention over the kept entries alone, computed by a dense run with the dropped tokens masked."""
    x = ids(60, seed=5)
    session, out, cache = _prefill(llama64, kv.get("kvzip", ratio=0.5, head_budgets=False), x, layout="rectangular")
    token = out.logits[:, -1:].argmax(-1)
    with torch.no_grad(), session:
        step = llama64(input_ids=token, **with_cache(llama64, cache)).logits
    # dense reference: the uncompressed model with a 4D mask hiding, per layer and head, the evicted tokens
    kept = [session.kept_tokens(layer)[0] for layer in range(3)]
    from attnzoo import hf

    def masked(layer):
        def run(module, query, key, value, attention_mask, scaling, call_next):
            if query.shape[2] != 1:
                return call_next(query, key, value, attention_mask)
            allowed = torch.zeros(1, key.shape[1], 1, key.shape[2], dtype=torch.bool)
            for h, t in enumerate(kept[layer]):
                allowed[0, h, 0, t] = True
            allowed[..., -1] = True  # the new token itself
            bias = torch.zeros_like(allowed, dtype=query.dtype).masked_fill(~allowed, -math.inf)
            bias = bias.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            return call_next(query, key, value, bias)

        return run

    from transformers import DynamicCache

    full = DynamicCache(config=llama64.config)
    with torch.no_grad(), hf.hook(llama64, {i: masked(i) for i in range(3)}):
        llama64(input_ids=x, **with_cache(llama64, full))
        ref = llama64(input_ids=token, **with_cache(llama64, full)).logits
    torch.testing.assert_close(step, ref, rtol=0, atol=1e-9)


def test_a_left_padded_batch_keeps_what_each_row_keeps_alone(llama64):
    rows = [ids(70, seed=6)[0], ids(52, seed=7)[0]]
    x, mask = left_padded(rows)
    press = kv.get("kvzip", ratio=0.6)
    batch, _, _ = _prefill(llama64, press, x, mask=mask)
    for i, r in enumerate(rows):
        alone, _, _ = _prefill(llama64, press, r.unsqueeze(0))
        for layer in range(3):
            got = [t.tolist() for t in batch.kept_tokens(layer)[i]]
            assert got == [t.tolist() for t in alone.kept_tokens(layer)[0]], (i, layer)


def test_generate_and_logits_to_keep_see_the_context_only(llama64):
    x = ids(50, seed=8)
    press = kv.get("kvzip", ratio=0.5)
    with torch.no_grad():
        want = llama64(input_ids=x).logits
        with press(llama64, TOK):
            last = llama64(input_ids=x, logits_to_keep=3).logits
        with press(llama64, TOK) as session:
            out = llama64.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(last, want[:, -3:], rtol=0, atol=1e-10)
    assert out.shape[1] == 54 and int(out[0, 50]) == int(want[0, -1].argmax())  # first token: the context's logits
    assert session._seen == 53  # context, then three decoded tokens fed back (the probe is not counted)


def test_pipeline_gives_the_probe_to_kvzip_and_the_context_to_the_rest(llama64, monkeypatch):
    """kvzip, then snapkv among what it kept: snapkv sees the context's queries and kvzip's kept slots only."""
    from attnzoo.kv.scorers import SnapKVPress

    seen = []
    original = SnapKVPress.keep
    monkeypatch.setattr(SnapKVPress, "keep", lambda self, step: seen.append(step) or original(self, step))
    x = ids(80, seed=9)
    first, second = kv.get("kvzip", ratio=0.5), kv.get("snapkv", ratio=0.75, window=8)
    both, _, _ = _prefill(llama64, first + second, x)
    alone, _, _ = _prefill(llama64, first, x)
    assert len(seen) == 3
    for layer, step in enumerate(seen):
        assert step.query.shape[2] == 80 and int(step.query_index[-1]) == 79
        assert int(step.index[step.valid].max()) < 80 and int(step.valid.sum(-1).max()) <= 80
        for kept_both, kept_first in zip(both.kept_tokens(layer)[0], alone.kept_tokens(layer)[0]):
            assert set(kept_both.tolist()) <= set(kept_first.tolist())
    assert both.stats()["removed"] == pytest.approx(0.75, abs=0.02)
    quantized, _, _ = _prefill(llama64, first + kv.get("kv_quant", bits=4), x)
    assert quantized.stats()["bytes"] < 0.2 * alone.stats()["bytes"]


def test_kvzip_errors(llama64):
    with pytest.raises(ValueError, match="tokenizer"):
        with kv.get("kvzip", ratio=0.5)(llama64):
            pass
    with pytest.raises(ValueError, match="request"):
        kv.get("kvzip", ratio=0.5, request="  ")
    with pytest.raises(TypeError, match="head_budgets"):
        kv.get("kvzip", ratio=0.5, head_budgets=1)
    with pytest.raises(ValueError, match="probe"):
        kv.compose(kv.get("kvzip", ratio=0.5), kv.get("kvzip", ratio=0.6))
    embeds = llama64.get_input_embeddings()(ids(20))
    with pytest.raises(ValueError, match="input_ids"), torch.no_grad(), kv.get("kvzip", ratio=0.5)(llama64, TOK):
        llama64(inputs_embeds=embeds)
    with pytest.raises(RuntimeError, match="prefill"):
        kv.get("kvzip", ratio=0.5).score(type("S", (), {"probe": None})())


def test_kvzip_at_ratio_zero_runs_no_probe(llama64):
    x = ids(40, seed=10)
    with torch.no_grad():
        want = llama64(input_ids=x).logits
        with kv.get("kvzip", ratio=0.0)(llama64, TOK) as session:
            got = llama64(input_ids=x).logits
    assert torch.equal(got, want) and session.stats()["removed"] == 0.0


def test_chat_turn_splits_smollm2s_template(tok):
    """The request is closed as a user turn and the repeat is the assistant's, as KVzip asks."""
    before, after = chat_turn(tok)
    text = tok.decode(after)
    assert "assistant" in text and tok.decode(before).strip().endswith("user")
