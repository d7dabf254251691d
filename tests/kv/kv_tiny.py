"""Tiny random-weight models for the kv tests: a Qwen3 (QK-norm) and a Llama, built from configs (no download)."""
from __future__ import annotations

import contextlib
import types

import torch


def tiny_qwen3(vocab: int = 256, layers: int = 2, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_llama(vocab: int = 256, layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=72, intermediate_size=144, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


class CharTokenizer:
    """A tokenizer for the 256-token tiny models, for presses that need one (kvzip): one id per character,
    no chat template."""

    chat_template = None
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        out = [ord(c) % 256 for c in text]
        return {"input_ids": torch.tensor([out]) if return_tensors == "pt" else out}


def ids(n: int, vocab: int = 256, seed: int = 1, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=gen)


@torch.no_grad()
def greedy_logits(model, input_ids, steps: int, press=None, layout=None):
    """Prefill logits and `steps` greedy decoding logits, with an explicit DynamicCache (`layout`: the
    press session's)."""
    from transformers import DynamicCache

    from attnzoo.kv.base import with_cache

    cache = with_cache(model, DynamicCache(config=model.config))
    ctx = press(model, layout=layout) if press is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=input_ids, **cache)
        logits = [out.logits]
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, **cache)
            logits.append(out.logits)
    return logits


def left_padded(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch (len(rows), longest) of the rows padded on the left with `pad`, attention mask 1 on the tokens)."""
    n = max(len(r) for r in rows)
    batch = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, n - len(r):], mask[i, n - len(r):] = r, 1
    return batch, mask


def fake_session():
    return types.SimpleNamespace(shared={})


def make_step(query, keys, values=None, *, prefill=True, layer=0, n_layers=1, budget=None, scaling=1.0,
              query_index=None, session=None):
    """A hand-built Step: slots are tokens 0..S-1, all valid; this forward's queries are the last Sq tokens."""
    from attnzoo.kv.base import Step

    b, hkv, s, _ = keys.shape
    sq = query.shape[2]
    qi = torch.arange(s - sq, s) if query_index is None else query_index
    return Step(layer=layer, n_layers=n_layers, module=None, query=query, keys=keys,
                values=keys.clone() if values is None else values,
                index=torch.arange(s).expand(b, hkv, -1).clone(), bias=torch.zeros(b, hkv, s), extra={},
                query_index=qi, query_valid=torch.ones(b, sq, dtype=torch.bool),
                query_position=qi.expand(b, -1), row_length=torch.full((b,), s), budget=budget, scaling=scaling,
                prefill=prefill, session=session or fake_session())


def kept(mask) -> list:
    """Sorted kept slot indices of every (row, head) of a (B, Hkv, S) mask."""
    return [[torch.nonzero(h).flatten().tolist() for h in row] for row in mask]
