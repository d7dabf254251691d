"""attnzoo.kv with the model on a GPU: every method compresses (or reads sparsely) there, keeps its
bookkeeping on the model's device and, at ratio 0, reproduces the model exactly. Skips without CUDA."""
from __future__ import annotations

import pytest
import torch
from kv_tiny import CharTokenizer, greedy_logits, ids, tiny_llama

import attnzoo.kv as kv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = [m.name for m in kv.methods() if not m.needs_tokenizer]  # the tiny model has no tokenizer (head_roles)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama().cuda()


def _press(name: str, ratio: float) -> kv.KVPress:
    if name == "kv_quant":
        return kv.get(name, bits=4)
    options = {"attention_gate": {"steps": 5}, "quest": {"dense_layers": 1}}.get(name, {})  # 3-layer model
    return kv.get(name, ratio=ratio, **options)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_runs_on_the_gpu_and_holds_its_ratio(llama, name):
    press = _press(name, 0.5)
    x = ids(240).cuda()
    with press(llama) as session:
        out = llama.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        stats = session.stats()
        layer = session.cache.layers[0]
    assert out.shape == (1, 246) and out.device.type == "cuda"
    assert layer.keys.device.type == "cuda"
    if press.kind == "evict":
        assert 0.35 <= stats["removed"] <= 0.6, stats
    elif press.kind == "read":
        assert stats["removed"] == 0.0 and abs(stats["read_fraction"] - 0.5) < 0.12, stats
    else:  # quantized: the same bytes as the same press on the CPU copy of the model (same seed)
        with _press(name, 0.5)(cpu_model := tiny_llama()) as cpu_session:
            cpu_model.generate(x.cpu(), max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert cpu_session.stats()["bytes"] == stats["bytes"]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "kv_quant"])
def test_ratio_zero_is_exact_on_the_gpu(llama, name):
    x = ids(90).cuda()
    base = greedy_logits(llama, x, steps=3)
    ours = greedy_logits(llama, x, steps=3, press=_press(name, 0.0))
    assert all(torch.equal(a, b) for a, b in zip(base, ours))


def test_kvzip_keeps_on_the_gpu_what_it_keeps_on_the_cpu():
    """The probe's positions, masks and scores on the model's device: the same kept tokens as on the CPU
    (float64 weights on both), through generate."""
    x = ids(120)
    kept = []
    for device in ("cpu", "cuda"):
        model = tiny_llama().double().to(device)
        with kv.get("kvzip", ratio=0.6)(model, CharTokenizer()) as session:
            out = model.generate(x.to(device), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape == (1, 124)
        kept.append([[t.tolist() for t in session.kept_tokens(layer)[0]] for layer in range(3)])
    assert kept[0] == kept[1]
