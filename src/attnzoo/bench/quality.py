"""In-model quality: next-token loss of a model whose every attention layer runs a variant.

The model reads held-out real text (never seen by the capture) once unchanged and once per
variant at its default parameters (attnzoo.hf.use in every layer); the report gives the loss,
the perplexity and their change against the unchanged model on the same tokens.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .. import hf
from ..core.info import CAUSAL_SELF
from . import cases


@torch.no_grad()
def next_token_loss(model, ids: torch.Tensor) -> float:
    """Mean cross-entropy of predicting token t+1 from tokens <= t, over one (1, S) sequence."""
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:]).item()


def variant_loss(model, ids: torch.Tensor, name: str, params: dict | None = None) -> float:
    """The loss with `name` replacing attention in every layer; required inputs built generically.
    `ids` must have a length the variant runs at (see cases.fit)."""
    attn = cases.configure(name, ids.shape[1], params)
    if CAUSAL_SELF not in attn.info.patterns:
        raise cases.Unrunnable(f"{name} does not serve causal self-attention (it serves {list(attn.info.patterns)}); "
                               "a causal language model needs it")
    inputs = (lambda q, k: cases.make_inputs(attn, q, k, k)) if any(i.required for i in attn.info.inputs) else None
    with hf.use(model, name, inputs=inputs, **attn.config):
        return next_token_loss(model, ids)


def run(model, ids: torch.Tensor, configs: list, tick: Callable[[], None] = lambda: None) -> dict:
    """{"tokens", "baseline": {loss, ppl}, "rows": [{variant, params, keep_target, tokens, loss, ppl,
    delta_loss, ppl_ratio, delta_ppl, error}]}.

    `configs`: variant names (default parameters) or dicts {"variant", "params", "keep_target"}.
    `delta_loss` = log(ppl / ppl of the unchanged model) (nats per token) and `ppl_ratio` its exp: a
    model given a foreign positional scheme can lose orders of magnitude, which differences hide.
    A variant that runs only at a shorter length (a grid) reads the first tokens of `ids`, and is
    compared with the unchanged model on those same tokens.
    """
    baselines = {ids.shape[1]: next_token_loss(model, ids)}
    tick()
    rows = []
    for c in configs:
        c = {"variant": c, "params": {}, "keep_target": None} if isinstance(c, str) else c
        name, params = c["variant"], c.get("params") or {}
        row = {"variant": name, "params": params, "keep_target": c.get("keep_target"), "tokens": None, "loss": None,
               "ppl": None, "delta_loss": None, "ppl_ratio": None, "delta_ppl": None, "error": None}
        t0 = time.perf_counter()
        try:
            n = cases.fit(name, ids.shape[1])[0]
            if n not in baselines:
                baselines[n] = next_token_loss(model, ids[:, :n])
            loss, base = variant_loss(model, ids[:, :n], name, params), baselines[n]
            row.update(tokens=n, loss=loss, ppl=math.exp(loss), delta_loss=loss - base,
                       ppl_ratio=math.exp(loss - base), delta_ppl=math.exp(loss) - math.exp(base))
        except Exception as e:  # recorded with its reason; the bench goes on
            row["error"] = f"{type(e).__name__}: {e}"
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        tick()
    base = baselines[ids.shape[1]]
    return {"tokens": int(ids.shape[1]), "baseline": {"loss": base, "ppl": math.exp(base)},
            "baselines_by_length": {str(n): loss for n, loss in baselines.items()}, "rows": rows}
