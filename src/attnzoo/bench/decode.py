"""Decoding cost per token against context length: every recurrent (linear-family) variant's `step`
after a real prefill, against exact softmax decoding over a KV cache that grows with the context,
measured in the same run.

For each context length n (1k ... 64k by default) a variant's state is the one its chunk form returns
after n random tokens (fed in pieces with the state carried, which equals one pass: tests/variants), then
`steps` decode steps are timed one by one (CUDA: synchronised per step); the fastest (`us_per_token`,
robust to other processes on a shared machine) and the median are reported. `full` decodes one query
against n cached keys and values with PyTorch's SDPA, appending the new key and value to the cache as a
growing cache does. Required extra inputs (GLA's gates, SSE's router...) are filled as `attnzoo bench`
fills them (bench.cases.make_inputs).

The structural claim behind the timing: a recurrent state has the same size after any number of tokens
(`state_elements` in the results; RAT's grows by one row per chunk: it attends across chunk summaries).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..core.api import get, variants
from ..core.recurrent import RecurrentVariant
from .cases import make_inputs

# Parameters a variant needs to carry a state between calls at all (lln moment-matches its temperatures per
# call unless they are fixed).
DECODE_PARAMS = {"lln": {"alpha": 1.0, "beta": 1.0}}


def decoder(name: str):
    """`name` configured for decoding: its defaults, or DECODE_PARAMS where those cannot carry a state."""
    return get(name, **DECODE_PARAMS.get(name, {}))


@dataclass
class Geometry:
    batch: int = 1
    heads: int = 8          # query heads = KV heads (Mega needs them equal)
    head_dim: int = 64


def recurrent_variants() -> list[str]:
    """Every registered variant with a recurrent state (the linear family's RecurrentVariants)."""
    return [i.name for i in variants(family="linear") if isinstance(get(i.name), RecurrentVariant)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _qkv(geo: Geometry, s: int, dtype, device, gen: torch.Generator):
    shape = (geo.batch, geo.heads, s, geo.head_dim)
    return tuple(torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3))


def step_inputs(attn, q_t, k_t, v_t) -> dict:
    """The required inputs of one decode step: a one-token call's inputs, per-token ones at that token."""
    one = make_inputs(attn, q_t.unsqueeze(2), k_t.unsqueeze(2), v_t.unsqueeze(2))
    per_token = attn.per_token_inputs()
    return {n: t[:, :, 0] if n in per_token else t for n, t in one.items()}


class OutOfTime(Exception):
    """The run's time budget ended before this point."""


def prefill(attn, state, tokens: int, geo: Geometry, dtype, device, gen, piece: int = 2048,
            deadline: float = float("inf")):
    """The state after `tokens` more random tokens, fed through the chunk form in pieces; OutOfTime once
    time.monotonic() passes `deadline`."""
    done = 0
    while done < tokens:
        if time.monotonic() > deadline:
            raise OutOfTime
        n = min(piece, tokens - done)
        q, k, v = _qkv(geo, n, dtype, device, gen)
        # the torch chunk form: no kernel compilation inside a timed run's budget (prefill is not what is timed)
        _, state = attn(q, k, v, causal=True, initial_state=state, output_final_state=True, backend="torch",
                        **make_inputs(attn, q, k, v))
        done += n
    return state


def time_steps(fn, steps: int, device: torch.device, warmup: int = 3) -> dict:
    """{"us_per_token": fastest, "median_us": median} microseconds of `fn()` over `steps` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"us_per_token": min(times) * 1e6, "median_us": statistics.median(times) * 1e6}


def recurrent_decode(name: str, contexts: list[int], geo: Geometry, dtype, device, steps: int, gen,
                     on_context=None, deadline: float = float("inf")) -> dict:
    """{context: {"us_per_token", "median_us", "state_elements"}} for one recurrent variant; the contexts
    reached before `deadline` (time.monotonic())."""
    attn = decoder(name)
    state = attn.init_state(geo.batch, geo.heads, geo.head_dim, geo.head_dim, dtype=torch.float32, device=device)
    out, seen = {}, 0
    for n in contexts:
        try:
            state = prefill(attn, state, n - seen, geo, dtype, device, gen, deadline=deadline)
        except OutOfTime:
            break
        seen = n
        q_t, k_t, v_t = (x[:, :, 0] for x in _qkv(geo, 1, dtype, device, gen))
        extra = step_inputs(attn, q_t, k_t, v_t)
        # Every timed step starts from the prefilled state (the state at context n), so all steps cost the same.
        out[n] = {**time_steps(partial(attn.step, q_t, k_t, v_t, state, **extra), steps, device),
                  "state_elements": state.numel()}
        if on_context:
            on_context()
    return out


def cached_decode(q_t, k_t, v_t, k_cache, v_cache):
    """One softmax decoding step: the new key and value appended to the cache, one query over all of it
    (it sees every cached key: causal)."""
    return F.scaled_dot_product_attention(q_t, torch.cat([k_cache, k_t], 2), torch.cat([v_cache, v_t], 2))


def full_decode(contexts: list[int], geo: Geometry, dtype, device, steps: int, gen, on_context=None) -> dict:
    """Exact softmax decoding: one query against the n cached keys/values plus the new one (cache grown by cat),
    by PyTorch's SDPA called directly (as the recurrent steps are: no dispatch in either)."""
    out = {}
    for n in contexts:
        _, k_cache, v_cache = _qkv(geo, n, dtype, device, gen)
        q_t, k_t, v_t = (x[:, :, :1] for x in _qkv(geo, 1, dtype, device, gen))

        out[n] = {**time_steps(partial(cached_decode, q_t, k_t, v_t, k_cache, v_cache), steps, device),
                  "state_elements": 2 * k_cache.numel()}
        if on_context:
            on_context()
    return out


def ratios(rows: dict[str, dict], contexts: list[int]) -> dict[str, dict]:
    """Per variant: time at the longest context over time at the shortest (1 = flat), and full's time over
    the variant's at each context (how much faster than softmax decoding)."""
    lo, hi = contexts[0], contexts[-1]
    full = rows.get("full", {}).get("by_context")
    out = {}
    for name, row in rows.items():
        by = row.get("by_context")
        if not by or any(n not in by for n in contexts):
            continue
        entry = {"growth": by[hi]["us_per_token"] / by[lo]["us_per_token"],
                 "state_growth": by[hi]["state_elements"] / by[lo]["state_elements"]}
        if full and name != "full":
            entry["speedup_vs_full"] = {n: full[n]["us_per_token"] / by[n]["us_per_token"] for n in contexts}
        out[name] = entry
    return out
