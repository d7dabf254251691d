"""attnzoo.kv plumbing: a QK-norm architecture (tiny Qwen3), padded batches, generate, clear errors."""
from __future__ import annotations

import pytest
import torch
from kv_tiny import greedy_logits, ids, left_padded, tiny_qwen3

import attnzoo.kv as kv
from attnzoo import hf
from attnzoo.kv import base


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen3()


def test_qwen3_shapes_after_prefill_and_during_decoding(qwen):
    x = ids(101)
    press = kv.get("snapkv", ratio=0.75, window=16)
    with torch.no_grad(), press(qwen) as session:
        out = qwen(input_ids=x)
        cache = out.past_key_values
        assert cache is session.cache
        keep = 101 - round(101 * 0.75)
        for layer in cache.layers:
            assert layer.keys.shape == (1, 2, keep, 16) and layer.values.shape == (1, 2, keep, 16)
        token = out.logits[:, -1:].argmax(-1)
        out = qwen(input_ids=token, past_key_values=cache)  # positions continue from 101, not from the cache length
        assert cache.layers[0].keys.shape[2] == keep + 1
        assert session._forward is None and session._seen == 102
    assert torch.isfinite(out.logits).all()


def test_decoding_after_compression_matches_attention_over_the_kept_tokens(qwen):
    """The next token's logits equal a run where the decoding query sees exactly the kept entries."""
    x = ids(60)
    press = kv.get("streaming_llm", ratio=0.5)
    with torch.no_grad():
        full = qwen(input_ids=x, use_cache=True).past_key_values
        keep = torch.tensor(list(range(4)) + list(range(34, 60)))
        from transformers import DynamicCache

        manual = DynamicCache(config=qwen.config)
        for i, layer in enumerate(full.layers):
            manual.update(layer.keys[:, :, keep], layer.values[:, :, keep], i)
        token = torch.tensor([[7]])
        expected = qwen(input_ids=token, past_key_values=manual, position_ids=torch.tensor([[60]])).logits
        with press(qwen):
            cache = qwen(input_ids=x).past_key_values
            got = qwen(input_ids=token, past_key_values=cache).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_ratio_zero_is_exact_with_generate(qwen):
    x = ids(50)
    plain = qwen.generate(x, max_new_tokens=8, do_sample=False)
    with kv.get("h2o", ratio=0.0)(qwen):
        ours = qwen.generate(x, max_new_tokens=8, do_sample=False)
    assert torch.equal(plain, ours)


@pytest.mark.parametrize("name", ["snapkv", "streaming_llm", "knorm", "h2o", "tova", "pyramidkv"])
def test_left_padded_batch_keeps_the_same_tokens_per_row_as_each_row_alone(qwen, name):
    rows = [ids(30, seed=5)[0], ids(45, seed=6)[0]]
    batch, mask = left_padded(rows)
    press = kv.get(name, ratio=0.6, **({"window": 8} if name in ("snapkv", "pyramidkv") else {}))
    with press(qwen) as session:
        qwen.generate(batch, attention_mask=mask, max_new_tokens=1, do_sample=False)
        together = [session.kept_tokens(layer) for layer in range(2)]
    for i, r in enumerate(rows):
        with press(qwen) as session:
            qwen.generate(r.unsqueeze(0), max_new_tokens=1, do_sample=False)
            for layer in range(2):
                alone = session.kept_tokens(layer)[0]
                assert [t.tolist() for t in together[layer][i]] == [t.tolist() for t in alone]


def test_left_padded_generation_with_compression_runs_and_rows_decode_like_alone(qwen):
    rows = [ids(30, seed=5)[0], ids(45, seed=6)[0]]
    batch, mask = left_padded(rows)
    press = kv.get("streaming_llm", ratio=0.5)
    with press(qwen):
        out = qwen.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
        alone = [qwen.generate(r.unsqueeze(0), max_new_tokens=12, do_sample=False) for r in rows]
    for i, r in enumerate(rows):
        assert torch.equal(out[i, 45:], alone[i][0, len(r):])


def test_kept_tokens_and_stats_report_what_the_cache_holds(qwen):
    with kv.get("knorm", ratio=0.5)(qwen) as session:
        qwen.generate(ids(40), max_new_tokens=1, do_sample=False)
        stats = session.stats()
        assert stats["entries"] == stats["slots"] == 20 * 2 * 2
        assert stats["removed"] == 0.5 and stats["bytes"] == 20 * 2 * 2 * 16 * 2 * 4
        assert all(len(t) == 20 for t in session.kept_tokens(1)[0])


def test_generate_compresses_the_cache_the_model_reads(qwen):
    """generate() passes its cache as `cache=` since transformers 5.24: the press must compress that
    cache (bytes held drop, and the decoded continuation reads only the kept entries)."""
    x = ids(64)
    with torch.no_grad():
        plain = qwen(input_ids=x).logits
        with kv.get("streaming_llm", ratio=0.75)(qwen) as session:
            out = qwen.generate(x, max_new_tokens=4, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
            stats = session.stats()
        keep = 64 - round(64 * 0.75)
        assert stats["entries"] == keep * 2 * 2  # streaming_llm holds its budget while decoding
        assert stats["bytes"] == keep * 2 * 2 * 16 * 2 * 4
        # The first generated token comes from prefill (uncompressed attention); the second reads the kept cache.
        assert torch.allclose(out.logits[0], plain[:, -1], atol=1e-5)
        token = out.sequences[:, 64:65]
        full_next = qwen(input_ids=torch.cat([x, token], 1)).logits[:, -1]
        assert not torch.allclose(out.logits[1], full_next, atol=1e-4)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_passed_under_either_name_is_the_one_compressed(qwen, name):
    from transformers import DynamicCache

    cache = DynamicCache(config=qwen.config)
    with kv.get("knorm", ratio=0.5)(qwen) as session:
        qwen(input_ids=ids(40), **{name: cache})
        assert session.cache is cache
        assert cache.layers[0].keys.shape[2] == 20


def test_a_press_whose_cache_the_model_does_not_read_raises(qwen):
    """If transformers routes another cache to the layers (an API change), compressing ours would do
    nothing: the session must fail loudly, naming the transformers version and the supported range."""
    import transformers
    from transformers import DynamicCache

    def swap_cache(module, args, kwargs):  # runs after the press's own pre-hook
        for name in ("cache", "past_key_values"):
            if name in kwargs:
                kwargs[name] = DynamicCache(config=qwen.config)
        return args, kwargs

    with kv.get("streaming_llm", ratio=0.5)(qwen):
        handle = qwen.register_forward_pre_hook(swap_cache, with_kwargs=True)
        try:
            with pytest.raises(base.CacheNotRead, match=rf"transformers {transformers.__version__}.*>=4\.56"):
                qwen.generate(ids(30), max_new_tokens=2, do_sample=False)
        finally:
            handle.remove()


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, True, "0.5", None])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match=r"snapkv: parameter 'ratio' must be a number in \[0, 1\)"):
        kv.get("snapkv", ratio=ratio)


def test_unknown_method_and_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="unknown KV-cache method 'nope'; known KV-cache methods: .*snapkv"):
        kv.get("nope")
    with pytest.raises(ValueError, match="parameter 'kernel' must be an odd int >= 1, got 4"):
        kv.get("snapkv", kernel=4)
    with pytest.raises(ValueError, match="kv_quant removes no entries"):
        kv.get("kv_quant", ratio=0.5)
    with pytest.raises(ValueError, match="parameter 'bits' must be 8, 4 or 2, got 3"):
        kv.get("kv_quant", bits=3)
    with pytest.raises(TypeError):
        kv.get("snapkv", window_size=64)


def test_a_model_without_supported_attention_is_refused():
    with pytest.raises(hf.UnsupportedModel, match="AttentionInterface"):
        with kv.get("snapkv", ratio=0.5)(torch.nn.Linear(2, 2)):
            pass


def test_missing_cache_api_names_the_supported_transformers_range(monkeypatch, qwen):
    import transformers.cache_utils as cu

    monkeypatch.delattr(cu, "DynamicLayer")
    with pytest.raises(base.UnsupportedTransformers, match=r"transformers >=4\.56"):
        with kv.get("snapkv", ratio=0.5)(qwen):
            pass


def test_static_and_sliding_window_caches_are_refused(qwen):
    from transformers import DynamicCache, StaticCache

    with kv.get("snapkv", ratio=0.5)(qwen):
        with pytest.raises(TypeError, match="compresses transformers' DynamicCache; got StaticCache"):
            qwen(input_ids=ids(10), past_key_values=StaticCache(config=qwen.config, max_cache_len=32))
    sliding = tiny_qwen3()
    sliding.config.layer_types = ["sliding_attention", "sliding_attention"]
    sliding.config.sliding_window = 8
    with kv.get("snapkv", ratio=0.5)(sliding):
        with pytest.raises(TypeError, match="DynamicSlidingWindowLayer"):
            sliding(input_ids=ids(10), past_key_values=DynamicCache(config=sliding.config))


def test_ratio_zero_logits_on_qwen3_for_the_decode_path(qwen):
    x = ids(33)
    base_logits = greedy_logits(qwen, x, steps=3)
    ours = greedy_logits(qwen, x, steps=3, press=kv.get("duo_attention", ratio=0.0))
    assert all(torch.equal(a, b) for a, b in zip(base_logits, ours))


def test_the_declared_transformers_range_is_the_one_checked_and_installed():
    """pyproject.toml's range, the range the runtime check enforces, and the installed release agree."""
    import re
    from pathlib import Path

    import transformers
    from packaging.specifiers import SpecifierSet

    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    declared = re.search(r'"transformers([^"]+)"', pyproject).group(1)
    assert declared == hf.SUPPORTED_TRANSFORMERS == base.SUPPORTED_TRANSFORMERS
    assert transformers.__version__ in SpecifierSet(declared)


def test_a_transformers_outside_the_declared_range_is_refused(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    with pytest.raises(ImportError, match=r"supports transformers >=4\.56,<6; this is 6\.0\.0"):
        hf._require_transformers()
