"""Offline profiling on real text for presses that decide per head or per layer ahead of time.

Everything here runs the model on prose from the standard library (`models.stdlib_text("train")`;
evaluation haystacks come from the held-out split) and reads the real post-RoPE queries and keys
through `attnzoo.hf` hooks. Results are cached per model object for the life of the process.
"""
from __future__ import annotations

import hashlib
import json
import math
import weakref
from pathlib import Path

import torch

from .. import hf, models

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached(model, key, compute):
    """`compute()` once per (model, key)."""
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = compute()
    return per_model[key]


def fingerprint(model) -> str:
    """A short hash of the model's config and a sample of its weights: what a disk cache is keyed by."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for p in params[:: max(1, len(params) // 8)]:
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def disk_cached(model, name: str, config: dict, compute) -> torch.Tensor:
    """`compute()` once per (model, name, config), kept in memory and on disk (under
    `models.cache_dir()/kv_profiles`, keyed by the model's `fingerprint` and `config`), so a later
    process reads the same tensor back instead of profiling again."""
    path = disk_path(model, name, config)

    def load_or_compute():
        if path.exists():
            return torch.load(path)
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        torch.save(value, partial)
        partial.replace(path)  # atomic: a concurrent reader never sees half a file
        return value

    return cached(model, (name, path.name), load_or_compute)


def disk_path(model, name: str, config: dict) -> Path:
    """Where `disk_cached` keeps (model, name, config)'s tensor."""
    key = hashlib.sha256(json.dumps({"model": fingerprint(model), **config}, sort_keys=True).encode()).hexdigest()[:20]
    return models.cache_dir() / "kv_profiles" / f"{name}-{key}.pt"


def text_ids(model, tokenizer, n_tokens: int, offset: int = 0) -> torch.Tensor:
    """(1, n_tokens) ids of real text. Without a tokenizer (e.g. a tiny random-weight test model) the
    text's UTF-8 bytes, folded into the vocabulary, serve as ids."""
    if tokenizer is not None:
        return models.real_token_ids(tokenizer, n_tokens, "train", offset)
    raw = models.stdlib_text("train").encode("utf-8")[offset: offset + n_tokens]
    return (torch.tensor(list(raw)) % model.config.vocab_size).unsqueeze(0)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def run_with(model, input_ids: torch.Tensor, per_layer) -> None:
    """One forward (no cache) calling `per_layer(layer, query, key, value, scaling)` inside every attention layer."""

    def make(layer):
        def grab(module, query, key, value, attention_mask, scaling, call_next):
            per_layer(layer, query, key, value, float(scaling if scaling is not None else query.shape[-1] ** -0.5))
            return call_next(query, key, value, attention_mask)

        return grab

    with hf.hook(model, {i: make(i) for i, _ in hf.attention_modules(model)}):
        model(input_ids=input_ids.to(_device(model)), use_cache=False)


def causal_probs(query, key, scaling, rows: slice) -> torch.Tensor:
    """(B, Hq, q, S) causal attention probabilities of the query rows `rows` (GQA by repetition)."""
    groups = query.shape[1] // key.shape[1]
    q = query[:, :, rows].float()
    k = key.float().repeat_interleave(groups, dim=1)
    s = key.shape[2]
    pos = torch.arange(s, device=q.device)[rows]
    logits = (q @ k.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(torch.arange(s, device=q.device).view(1, -1) > pos.view(-1, 1), -math.inf)
    return torch.softmax(logits, dim=-1)


def needle_copy_scores(model, tokenizer, samples: int = 4, length: int = 512, needle: int = 12) -> torch.Tensor:
    """(layers, Hkv) retrieval scores by needle copying (the Retrieval Head paper's test, teacher-forced):
    a run of random real tokens is hidden in real text and repeated at its end; a query head scores a
    hit when, while the copy is produced, its strongest attention lands on the needle token being
    copied. A KV head's score is the best of its query heads (it must keep its cache if any does)."""

    def compute():
        n_layers = hf.layer_count(model)
        hits = None
        gen = torch.Generator().manual_seed(0)
        for i in range(samples):
            hay = text_ids(model, tokenizer, length, offset=i * 3 * length)[0]
            pool = text_ids(model, tokenizer, 4 * length, offset=(samples + i) * 3 * length)[0]
            span = pool[torch.randperm(len(pool), generator=gen)[:needle]]
            at = int((0.15 + 0.7 * torch.rand(1, generator=gen)) * length)
            ids = torch.cat([hay[:at], span, hay[at:], span]).unsqueeze(0)
            src = torch.arange(at, at + needle)                  # needle tokens
            qry = torch.arange(ids.shape[1] - needle - 1, ids.shape[1] - 1)  # queries that produce the copy
            found = {}

            def score(layer, query, key, value, scaling):
                p = causal_probs(query, key, scaling, slice(int(qry[0]), int(qry[-1]) + 1))  # (1, Hq, n, S)
                found[layer] = (p[0].argmax(-1) == src.to(p.device)).float().mean(-1).cpu()  # (Hq,)

            run_with(model, ids, score)
            per_sample = torch.stack([found[j] for j in range(n_layers)])
            hits = per_sample if hits is None else hits + per_sample
        hits = hits / samples
        kv_heads = model.config.num_key_value_heads
        return hits.view(n_layers, kv_heads, -1).amax(-1)

    return cached(model, ("needle_copy", samples, length, needle), compute)


def repeat_scores(model, tokenizer, length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(induction, echo) scores, each (layers, Hq), on a real-text segment shown twice (RazorAttention's
    probe): in the second copy, the attention each head puts on the token after the earlier occurrence
    of the current token (induction) and on the earlier occurrence itself (echo)."""

    def compute():
        seg = text_ids(model, tokenizer, length, offset=7 * length)[0]
        ids = torch.cat([seg, seg]).unsqueeze(0)
        induction, echo = {}, {}
        q_pos = torch.arange(length + 1, 2 * length)

        def score(layer, query, key, value, scaling):
            p = causal_probs(query, key, scaling, slice(length + 1, 2 * length))[0]  # (Hq, n, S)
            rows = torch.arange(len(q_pos), device=p.device)
            induction[layer] = p[:, rows, (q_pos - length + 1).to(p.device)].mean(-1).cpu()
            echo[layer] = p[:, rows, (q_pos - length).to(p.device)].mean(-1).cpu()

        run_with(model, ids, score)
        n = hf.layer_count(model)
        return torch.stack([induction[i] for i in range(n)]), torch.stack([echo[i] for i in range(n)])

    return cached(model, ("repeat", length), compute)


def window_coverage(model, tokenizer, fractions: tuple[float, ...], sinks: int, length: int = 1024,
                    queries: int = 64) -> torch.Tensor:
    """(layers, Hkv, len(fractions)) attention mass that `sinks` initial tokens plus a recent window of
    `fraction * length` tokens capture, for the last `queries` queries of real text, averaged over
    those queries and the query heads of each KV group (MoA's profile, with attention mass standing
    in for its gradient-weighted influence)."""

    def compute():
        ids = text_ids(model, tokenizer, length, offset=11 * length)
        out = {}

        def score(layer, query, key, value, scaling):
            p = causal_probs(query, key, scaling, slice(length - queries, length))[0]  # (Hq, n, S)
            q_pos = torch.arange(length - queries, length, device=p.device).view(-1, 1)
            k_pos = torch.arange(length, device=p.device).view(1, -1)
            cov = []
            for f in fractions:
                window = max(1, round(f * length))
                inside = (k_pos < sinks) | (k_pos > q_pos - window)
                cov.append((p * inside).sum(-1).mean(-1))
            hk = key.shape[1]
            out[layer] = torch.stack(cov, -1).view(hk, -1, len(fractions)).mean(1).cpu()

        run_with(model, ids, score)
        return torch.stack([out[i] for i in range(hf.layer_count(model))])

    return cached(model, ("coverage", fractions, sinks, length, queries), compute)


def decode_attention(model, tokenizer, length: int = 512, queries: int = 16) -> list[torch.Tensor]:
    """Per layer, (Hq, queries, length) attention probabilities of the last `queries` queries of real
    text: the stand-in for decoding queries that HyLRA's layer policy is profiled on."""

    def compute():
        ids = text_ids(model, tokenizer, length, offset=13 * length)
        out = {}

        def score(layer, query, key, value, scaling):
            out[layer] = causal_probs(query, key, scaling, slice(length - queries, length))[0].cpu()

        run_with(model, ids, score)
        return [out[i] for i in range(hf.layer_count(model))]

    return cached(model, ("decode_attention", length, queries), compute)


def full_heads(scores: torch.Tensor, n_full: int) -> torch.Tensor:
    """(layers, Hkv) bool: the `n_full` highest-scoring heads (ties to the lower layer and head)."""
    flat = scores.flatten().double()
    order = torch.sort(flat, descending=True, stable=True).indices[:n_full]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape)
