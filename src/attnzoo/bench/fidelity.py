"""Fidelity: how far a variant's output is from exact softmax attention on the same q/k/v.

Per (variant configuration, source of q/k/v, layer):
- `rel_err`: ||o - o_exact|| / ||o_exact|| over the layer's whole output;
- `cosine`: mean over (head, query) rows of the cosine between the rows of o and o_exact;
- `mass_kept`: mean over rows of the exact softmax probability mass on the keys the variant
  allows (from its `dense_mask`; variants with one, at lengths where the exact probabilities fit
  in PROBS_MAX_BYTES).
o_exact is exact softmax attention (`full`) in float64 under the same causality. The variant runs
in the bench's dtype on its automatic backend, so `full` shows the floor that dtype sets.
- `full_diff`: ||o - o_full|| / ||o_full|| against `full` run the same way (same dtype, same
  inputs): at most EQUAL_TOL (that dtype's rounding between two kernels) marks a configuration
  whose output is full attention's (`equals_full`), whatever its parameters say;
- `kept`: the share of the keys its mask keeps (`cases.kept_fraction`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.api import get
from ..core.reference import repeat_kv
from . import cases

PROBS_MAX_BYTES = 1 << 30
# full_diff at most this is rounding between two exact kernels, not a different attention.
EQUAL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass
class Reference:
    """Exact attention of one source in one pattern, shared by every variant measured on it."""

    q: torch.Tensor  # (B, Hq, Sq, D), B = captured layers
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    exact: torch.Tensor  # float64 (B, Hq, Sq, Dv)
    probs: torch.Tensor | None  # float32 (B, Hq, Sq, Sk) exact softmax probabilities, or None when too large
    full_out: torch.Tensor | None = None  # `full` in the measured dtype, as the variants run (set by measure)


def reference(q, k, v, causal: bool) -> Reference:
    exact = get("full")(q.double(), k.double(), v.double(), causal=causal, backend="torch")
    b, h, sq, _ = q.shape
    fits = b * h * sq * k.shape[2] * 4 <= PROBS_MAX_BYTES
    return Reference(q, k, v, causal, exact, exact_probs(q, k, causal) if fits else None)


def exact_probs(q, k, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) under causality (bottom-right), one layer at a time, float32."""
    sq, sk = q.shape[2], k.shape[2]
    allowed = get("full").dense_mask(sq, sk, causal=causal, device=q.device)
    kr = repeat_kv(k, q.shape[1])
    out = []
    for b in range(q.shape[0]):
        s = torch.matmul(q[b].double(), kr[b].double().transpose(-1, -2)) * q.shape[-1] ** -0.5
        out.append(torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).float())
    return torch.stack(out)


def relative_error(o: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(B,): ||o - o_exact|| / ||o_exact|| per batch row (layer)."""
    o, exact = o.double(), exact.double()
    return (o - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1).clamp_min(1e-300)


def mean_cosine(o: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(B,): mean over (head, query) of the cosine between output rows."""
    return F.cosine_similarity(o.double(), exact.double(), dim=-1, eps=1e-30).flatten(1).mean(dim=1)


def mass_kept(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,): mean over (head, query) of the exact probability mass on allowed keys."""
    return (probs * mask).sum(dim=-1).double().flatten(1).mean(dim=1)


def allowed_mask(attn, ref: Reference, inputs: dict, q=None, k=None) -> torch.Tensor:
    """The variant's dense mask broadcast to (B, Hq, Sq, Sk); raises when it has none. Content-sparse
    variants' masks are their selections from `q`, `k` (the tensors the measured call used)."""
    from ..core.selection import SelectionVariant

    dense = getattr(attn, "dense_mask", None)
    if dense is None:
        raise cases.Unrunnable(f"{attn.info.name} has no dense_mask")
    b, h, sq, _ = ref.q.shape
    sk = ref.k.shape[2]
    if isinstance(attn, SelectionVariant):
        q, k = (ref.q, ref.k) if q is None else (q, k)
        return dense(sq, sk, causal=ref.causal, q=q, k=k, **inputs).expand(b, h, sq, sk)
    m = dense(sq, sk, causal=ref.causal, heads=h, kv_heads=ref.k.shape[1], batch=b, device=ref.q.device, **inputs)
    return m.expand(b, h, sq, sk)


@torch.no_grad()
def measure(attn, ref: Reference, dtype: torch.dtype, generator: torch.Generator | None = None) -> dict:
    """Metrics of one configured variant against `ref`, per layer and averaged."""
    from ..core.recurrent import RecurrentVariant

    q, k, v = (t.to(dtype) for t in (ref.q, ref.k, ref.v))
    inputs = cases.make_inputs(attn, q, k, v, generator)
    o = attn(q, k, v, causal=ref.causal, **inputs)
    if isinstance(attn, RecurrentVariant):
        # Not an approximation of softmax: fed a softmax model's q/k/v, untrained, its distance to exact
        # attention measures nothing. Say so instead of printing a number that looks like a score.
        return {"rel_err": None, "cosine": None, "full_diff": None, "mass_kept": None, "per_layer": {},
                "mass_note": f"{attn.name} is recurrent ({attn.info.family} family), not softmax over a subset of "
                             f"the keys: error against exact attention is meaningless without training; see "
                             f"speed, memory and state size ({attn.info.state_size})"}
    if ref.full_out is None or ref.full_out.dtype != dtype:
        ref.full_out = get("full")(q, k, v, causal=ref.causal)
    per_layer = {"rel_err": relative_error(o, ref.exact).tolist(), "cosine": mean_cosine(o, ref.exact).tolist(),
                 "full_diff": relative_error(o, ref.full_out).tolist()}
    row = {"mass_note": None}
    if ref.probs is None:
        row["mass_note"] = "exact probabilities too large for this length"
    else:
        try:
            per_layer["mass_kept"] = mass_kept(ref.probs, allowed_mask(attn, ref, inputs, q, k)).tolist()
        except Exception as e:  # a variant whose mask is not a function of positions and inputs alone
            row["mass_note"] = f"no dense mask: {e}"
    for key, values in per_layer.items():
        row[key] = sum(values) / len(values)
    row.setdefault("mass_kept", None)
    row["per_layer"] = per_layer
    return row


def cases_for(name: str, length: int, sweep_points: int, q=None, k=None) -> list[dict]:
    """The default configuration, the budgets keeping each of cases.KEEP_FRACTIONS of the keys
    (`keep_target`), then the rest of the budget sweep (each a dict of explicit parameters)."""
    param = cases.budget_param(name)
    out = [{"params": {}, "default": True, "budget_param": param, "keep_target": None,
            "budget": None if param is None else cases.configure(name, length).config[param]}]
    if param is None:
        return out
    seen = {out[0]["budget"]: out[0]}
    for fraction in cases.KEEP_FRACTIONS:
        found = cases.budget_for(name, length, fraction, q, k)
        if found is None:
            continue
        value = found[0]
        if value in seen and seen[value]["keep_target"] is None:  # the default (or a sweep point) is this budget
            seen[value]["keep_target"] = fraction
        elif value not in seen:
            seen[value] = {"params": {param: value}, "default": False, "budget_param": param, "budget": value,
                           "keep_target": fraction}
            out.append(seen[value])
    if sweep_points > 0:
        for value in cases.sweep_budgets(name, length, sweep_points, q, k):
            if value not in seen:
                seen[value] = {"params": {param: value}, "default": False, "budget_param": param, "budget": value,
                               "keep_target": None}
                out.append(seen[value])
    return out


def run(names: list[str], sources: dict[str, tuple], length: int, dtype: torch.dtype, sweep_points: int,
        seed: int = 0, tick: Callable[[], None] = lambda: None) -> list[dict]:
    """Fidelity rows for every variant, configuration and source of q/k/v ((B, H, S, D) each)."""
    rows = []
    first_q, first_k, _ = next(iter(sources.values()))  # budgets are chosen once, on the first source
    for source, (q, k, v) in sources.items():
        refs: dict[tuple, Reference] = {}  # (pattern, length) -> exact attention, shared by variants
        for name in names:
            try:
                todo = cases_for(name, length, sweep_points, first_q, first_k)
            except Exception as e:  # a variant the bench cannot configure: one row says why
                rows.append({"variant": name, "source": source, "pattern": None, "params": {}, "default": True,
                             "budget_param": None, "budget": None, "error": f"{type(e).__name__}: {e}"})
                tick()
                continue
            for case in todo:
                if q is not first_q and not (case["default"] or case["keep_target"]):
                    continue  # the other sources measure the compared configurations; the sweep runs on the first
                rows.append(_row(name, case, source, q, k, v, refs, dtype, seed))
                tick()
    return rows


def _row(name, case, source, q, k, v, refs, dtype, seed) -> dict:
    pattern = cases.fidelity_pattern(name)
    row = {"variant": name, "source": source, "pattern": pattern, **case, "error": None}
    try:
        causal, sq, sk = cases.pattern_shape(pattern, cases.fit(name, q.shape[2])[0])
        if (pattern, sk) not in refs:
            refs[(pattern, sk)] = reference(q[:, :, sk - sq:sk], k[:, :, :sk], v[:, :, :sk], causal)
        attn = cases.configure(name, sk, case["params"])
        row.update(sq=sq, sk=sk, config=_plain(attn.config))
        row.update(measure(attn, refs[(pattern, sk)], dtype, torch.Generator().manual_seed(seed)))
        row["kept"] = cases.kept_fraction(name, q.shape[2], case["params"], q, k)
        row["equals_full"] = cases.equals_full(name, case["params"], row["kept"])
        if (row["equals_full"] is None and name != "full" and row["full_diff"] is not None
                and row["full_diff"] <= EQUAL_TOL.get(dtype, 1e-5)):
            row["equals_full"] = f"its output equals full attention's (relative difference {row['full_diff']:.1e})"
    except Exception as e:  # recorded with its reason; the bench goes on
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def _plain(config: dict) -> dict:
    """Parameter values as JSON-friendly Python values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
