"""attnzoo kv --compare kvpress: kvpress's presses in the same run and table when kvpress can run here;
a clean skip, with the reason, when it is absent or declares another transformers range."""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import sys
import types

import pytest
import torch
from kv_tiny import tiny_qwen3
from typer.testing import CliRunner

from attnzoo.cli import app
from attnzoo.kv import compare

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def folder(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_qwen3(vocab=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _fake_kvpress(monkeypatch, requires=("transformers>=4.56",)):
    """A stand-in kvpress 9.9: SnapKVPress(compression_ratio) whose context manager drops the first half
    of every layer's cache after the first forward (enough to see it ran and was measured)."""
    module = types.ModuleType("kvpress")

    class SnapKVPress:
        def __init__(self, compression_ratio):
            self.compression_ratio = compression_ratio

        @contextlib.contextmanager
        def __call__(self, model):
            def halve(mod, args, kwargs, output):
                cache = getattr(output, "past_key_values", None)
                for layer in (cache.layers if cache is not None else []):
                    if layer.keys is not None and layer.keys.shape[2] > 64:
                        n = layer.keys.shape[2] // 2
                        layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]
                return output

            handle = model.register_forward_hook(halve, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()

    module.SnapKVPress = SnapKVPress
    monkeypatch.setitem(sys.modules, "kvpress", module)
    real_version, real_requires = importlib.metadata.version, importlib.metadata.requires
    monkeypatch.setattr(compare.metadata, "version", lambda n: "9.9" if n == "kvpress" else real_version(n))
    monkeypatch.setattr(compare.metadata, "requires", lambda n: list(requires) if n == "kvpress" else real_requires(n))


def _raise_not_found(name):
    raise importlib.metadata.PackageNotFoundError(name)


def test_absent_or_incompatible_kvpress_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(compare.metadata, "version", _raise_not_found)
    assert compare.kvpress_presses(["snapkv"], [0.5]) == ([], "kvpress is not installed (pip install kvpress)")
    monkeypatch.undo()
    import transformers

    # a range this installation is outside of, whichever transformers it has (kvpress 0.5.5 pins <5.3)
    outside = f"transformers<{transformers.__version__},>=4.56.0"
    _fake_kvpress(monkeypatch, requires=(outside, "torch"))
    presses, why = compare.kvpress_presses(["snapkv"], [0.5])
    assert presses == [] and f"declares {outside}; this is transformers {transformers.__version__}" in why


def test_the_comparison_runs_with_and_without_kvpress(folder, tmp_path, monkeypatch):
    args = ["kv", "--model", str(folder), "--methods", "snapkv,razor+int4", "--ratios", "0.5", "--lengths", "256",
            "--tasks", "passkey", "--depths", "0.5", "--settings", "query_aware", "--compare", "kvpress"]
    monkeypatch.setattr(compare.metadata, "version", _raise_not_found)
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "without")])
    assert res.exit_code == 0, res.output
    assert "kvpress is not installed" in res.output
    without = json.loads((tmp_path / "without" / "results.json").read_text())
    assert {r["method"] for r in without["summary"]} == {"full", "snapkv", "razor(0.5)+kv_quant(int4)"}
    monkeypatch.undo()
    _fake_kvpress(monkeypatch)
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "with")])
    assert res.exit_code == 0, res.output
    assert "1 kvpress presses" in res.output  # compositions are attnzoo's own: not asked of kvpress
    summary = json.loads((tmp_path / "with" / "results.json").read_text())["summary"]
    rows = {r["method"]: r for r in summary}
    assert set(rows) == {"full", "snapkv", "razor(0.5)+kv_quant(int4)", "kvpress:snapkv"}
    assert 0.3 < rows["kvpress:snapkv"]["bytes_fraction"] < 0.7  # the stand-in halved the cache, measured
    bad = CliRunner().invoke(app, ["kv", "--compare", "other"])
    assert bad.exit_code == 2


def test_compositions_on_the_command_line_are_checked():
    bad = CliRunner().invoke(app, ["kv", "--methods", "razor+nope+int4"])
    assert bad.exit_code == 2 and "unknown" in bad.output


def test_kvpress_forwards_after_compression_continue_the_positions(monkeypatch):
    """As kvpress's own pipeline does: after the stand-in halves the cache, the next forwards get positions
    after the tokens seen, not after the compressed cache's length (RoPE would misplace every query)."""
    from kv_tiny import tiny_llama
    from transformers import DynamicCache

    from attnzoo.kv.base import with_cache

    _fake_kvpress(monkeypatch)
    model = tiny_llama()
    (adapter,), _ = compare.kvpress_presses(["snapkv"], [0.5])
    seen = []
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), adapter(model) as session:
        handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, **with_cache(model, cache))
        assert cache.layers[0].keys.shape[2] == 100  # compressed
        for step in range(2):
            model(input_ids=ids[:, :1], **with_cache(model, cache))
        handle.remove()
    assert [p.tolist() for p in seen[1:]] == [[[200]], [[201]]]
    assert session.stats()["tokens"] == 202 * 3 * 2  # tokens seen x layers x KV heads


def test_a_kvpress_press_that_compresses_on_exit_is_closed_after_the_prefill(monkeypatch):
    """kvpress's KVzipPress scores the context with forwards of its own when its context manager exits, as
    kvpress's pipeline exits it after the prefill; the adapter exits it at the forward after the prefill.
    Its scoring forwards are not counted as tokens seen, and the entries it masks (it removes none) count
    as removed while their bytes stay held."""
    from kv_tiny import tiny_llama
    from transformers import DynamicCache

    from attnzoo.kv.base import with_cache

    _fake_kvpress(monkeypatch)
    events = []

    class KVzipPress:
        def __init__(self, compression_ratio):
            self.compression_ratio = compression_ratio

        @contextlib.contextmanager
        def __call__(self, model):
            yield
            events.append("exit")
            model(input_ids=torch.zeros(1, 5, dtype=torch.long), **with_cache(model, self.cache))  # its scoring
            for _, m in compare.hf.attention_modules(model):
                m.masked_key_indices = (torch.zeros(50, dtype=torch.long),) * 3  # 50 of each layer's entries

    sys.modules["kvpress"].KVzipPress = KVzipPress
    model = tiny_llama()
    (adapter,), _ = compare.kvpress_presses(["kvzip"], [0.5])
    cache = DynamicCache(config=model.config)
    adapter.press.cache = cache
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), adapter(model) as session:
        handle = model.register_forward_pre_hook(lambda m, a, k: events.append(k["input_ids"].shape[1]),
                                                 with_kwargs=True)  # runs after the adapter's own pre-hook
        model(input_ids=ids, **with_cache(model, cache))
        model(input_ids=ids[:, :1], **with_cache(model, cache))
        handle.remove()
        stats = session.stats()
    assert events == [100, "exit", 5, 1]  # prefill, kvpress's exit and its scoring forward, then the question
    assert stats["tokens"] == 101 * 3 * 2 and stats["slots"] == 106 * 3 * 2  # the scoring's 5 are held, not seen
    assert stats["entries"] == stats["slots"] - 3 * 50
    # what kvpress left on the modules is cleared with the run, so it cannot mask a later one
    assert all(m.masked_key_indices is None for _, m in compare.hf.attention_modules(model))
