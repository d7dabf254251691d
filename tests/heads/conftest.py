"""Tiny random-weight models (no download) and a hook that forces chosen attention patterns."""
from __future__ import annotations

import pytest
import torch

from attnzoo import hf


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    return BertModel(cfg).eval()


@pytest.fixture
def tiny_llama():
    """3 layers, 4 query heads over 2 KV heads (GQA), head_dim 32, eager attention."""
    return _tiny_llama()


@pytest.fixture
def tiny_bert():
    """A 2-layer BERT encoder, 4 heads, eager attention."""
    return _tiny_bert()


def forced(patterns: dict[int, callable], causal: bool = True):
    """A hook that makes head h of a layer attend (almost) only to key `patterns[h](i)` from query i:
    keys become one-hot by position, and each forced head's query points at its target key (a later
    key too when not `causal`, for encoders)."""

    def run(module, query, key, value, attention_mask, scaling, call_next):
        b, hq, s, d = query.shape
        assert s <= d, "forcing needs head_dim >= sequence length"
        keys = torch.eye(d)[:s].expand(b, key.shape[1], s, d).clone()
        q = torch.zeros_like(query)
        big = 60.0 / scaling
        for h, target in patterns.items():
            for i in range(s):
                j = target(i)
                if j is not None and 0 <= j < s and (j <= i or not causal):
                    q[:, h, i, j] = big
        return call_next(q, keys, value, attention_mask)

    return run


def force(model, layer: int, patterns: dict[int, callable], causal: bool = True) -> hf.HookHandle:
    return hf.hook(model, {layer: forced(patterns, causal)})


@pytest.fixture
def force_heads():
    """force_heads(model, layer, {head: target(i)}) -> hook handle forcing those attention patterns."""
    return force


@pytest.fixture
def force_patterns():
    """force_patterns({head: target(i)}) -> the forcing hook itself, to compose into other hooks."""
    return forced
