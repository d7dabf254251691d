"""What the bench runs for each registered variant, derived from what the variant declares.

A variant added to the zoo shows up in the bench with no change here: its budget parameter is
declared (`Variant.budget_param`) or found by name, its sweep values come from its default and
the sequence length, a `grid` parameter is fitted to the length, and its extra inputs are built
from `info.inputs` (shape strings, dtypes). What cannot be built raises `Unrunnable`, which the
bench records with its reason instead of stopping.

Budgets are compared at the same share of the keys, never at defaults: a parameter fixed in tokens
(window=1024) keeps everything at 512 tokens and would rank a copy of full attention first.
`budget_for(name, length, fraction)` picks the value whose mask keeps the share of the (query, key)
pairs exact attention uses closest to `fraction` (KEEP_FRACTIONS), measured on the mask itself
(`kept_fraction`); `equals_full` says when a configuration is full attention in disguise.
"""
from __future__ import annotations

import math

import torch

from ..core.api import get, variant_class
from ..core.info import ALL_PATTERNS, CAUSAL_CROSS, CAUSAL_SELF, NONCAUSAL_CROSS, NONCAUSAL_SELF

# Names that, in this order, mark the parameter trading cost for fidelity when none is declared.
BUDGET_NAMES = ("window", "top_k", "k", "block_count", "density", "rank", "sinks", "kernel_size")
SWEEP_POINTS = 5
# Shares of the keys (of the (query, key) pairs exact causal attention uses) at which budgeted
# variants are compared; the leaderboard ranks each share apart.
KEEP_FRACTIONS = (1 / 4, 1 / 8)
# Shares of the keys the error-vs-budget sweep adds, in this order, for variants whose keys can be counted.
SWEEP_FRACTIONS = (1 / 2, 1 / 16, 1 / 32, 1 / 64)
# Past this many queries, kept_fraction counts the mask on this many evenly spaced query rows.
COUNT_ROWS = 2048
SAMPLE_ROWS = 256
# Head layout the masks are counted with (SmolLM2's: per-head masks differ per head).
COUNT_HEADS = (9, 3)
# Cross patterns: a chunk of the last Sq = length / CROSS_FRACTION queries against all keys.
CROSS_FRACTION = 4
# Generic inputs: packed sequences become this many contiguous documents; a dimension no size
# names (e.g. the number of position embeddings) gets this many entries.
DOCUMENTS = 4
FREE_DIM = 16
# Order in which fidelity picks the pattern it measures: real q/k/v come from causal self-attention.
FIDELITY_ORDER = (CAUSAL_SELF, NONCAUSAL_SELF, CAUSAL_CROSS, NONCAUSAL_CROSS)


class Unrunnable(ValueError):
    """The bench cannot build a call of this variant generically; the message says why."""


# ---- budget parameter and its sweep ------------------------------------------------------------


def budget_param(name: str) -> str | None:
    """The parameter a variant declares as its budget, else the first numeric one named in BUDGET_NAMES."""
    cls = variant_class(name)
    if cls.budget_param:
        return cls.budget_param
    defaults = {p.name: p.default for p in cls.params}
    for candidate in BUDGET_NAMES:
        value = defaults.get(candidate)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return candidate
    return None


def sweep_values(name: str, length: int, points: int = SWEEP_POINTS) -> list:
    """Values of the budget parameter to sweep at `length`, each accepted by the variant, ascending."""
    param = budget_param(name)
    if param is None:
        return []
    cls = variant_class(name)
    default = cls.class_info().param(param).default
    if cls.budget_sweep:
        candidates = list(cls.budget_sweep)
    elif isinstance(default, float):
        candidates = _float_candidates(name, param, default, points)
    else:
        candidates = _int_candidates(default, length, points)
    valid = {_nearest_valid(name, param, c, length) for c in candidates}
    return sorted(v for v in valid if v is not None)


def _int_candidates(default: int, length: int, points: int) -> list[int]:
    """Geometric steps of 4 down from min(length, 16 x default): sizes beyond the length change nothing."""
    top = max(1, min(length, max(default, 1) * 16))
    return [default] + [max(1, top // 4**j) for j in range(points)]


def _float_candidates(name: str, param: str, default: float, points: int) -> list[float]:
    if _accepts(name, param, 1.0) and not _accepts(name, param, 1.5):  # a fraction in (0, 1]
        return [default] + [2.0 ** -j for j in range(1, points)]
    return [default * 4.0 ** j for j in range(-(points // 2), points - points // 2)]


def _accepts(name: str, param: str, value) -> bool:
    try:
        get(name, **{param: value})
    except (TypeError, ValueError):
        return False
    return True


def _nearest_valid(name: str, param: str, value, length: int):
    """`value`, or a neighbour the variant accepts (e.g. odd kernel sizes), or None."""
    tries = [value] if isinstance(value, float) else [value, value + 1, value - 1]
    for v in tries:
        try:
            configure(name, length, {param: v})
        except (TypeError, ValueError):
            continue
        return v
    return None


# ---- configuring a variant for a length ------------------------------------------------------


def fit(name: str, length: int) -> tuple[int, dict]:
    """(length, parameters) at which `name` runs near `length`.

    Variants with a `grid` parameter need Sq = Sk = prod(grid) and often sides that their windows
    divide: they get the grid of near-equal sides (2 when the default names none) that the variant
    accepts with the largest product <= `length`, and that product as their length.
    """
    defaults = {p.name: p.default for p in variant_class(name).params}
    if "grid" not in defaults:
        return length, {}
    dims = len(defaults["grid"]) if isinstance(defaults["grid"], (tuple, list)) else 2
    for grid in _grids(length, dims):
        try:
            get(name, grid=grid)
        except (TypeError, ValueError):
            continue
        return math.prod(grid), {"grid": grid}
    raise Unrunnable(f"{name}: no grid of {dims} sides with at most {length} tokens is accepted at its defaults")


def _grids(length: int, dims: int):
    """The near-equal factorisation of `length`, then cubes (squares) of decreasing side."""
    exact = _near_equal_factors(length, dims)
    if exact and min(exact) > 1:
        yield tuple(exact)
    side = int(round(length ** (1 / dims)))
    while side > 1 and side**dims > length:
        side -= 1
    for s in range(side, max(side // 2, 1) - 1, -1):
        yield (s,) * dims


def _near_equal_factors(n: int, dims: int) -> list[int] | None:
    sides = []
    for left in range(dims, 1, -1):
        target = round(n ** (1 / left))
        side = next((s for d in range(n) for s in (target - d, target + d) if 1 < s <= n and n % s == 0), None)
        if side is None:
            return None
        sides.append(side)
        n //= side
    return sides + [n]


def configure(name: str, length: int, params: dict | None = None):
    """The configured variant for sequences of `length` (a fitted length, see `fit`): defaults, grid, `params`."""
    return get(name, **{**fit(name, length)[1], **(params or {})})


# ---- patterns ------------------------------------------------------------------------------------


def pattern_shape(pattern: str, length: int) -> tuple[bool, int, int]:
    """(causal, Sq, Sk) of a CAB pattern at `length`: self is Sq = Sk; cross is a chunk of the last queries."""
    if pattern not in ALL_PATTERNS:
        raise ValueError(f"pattern must be one of {list(ALL_PATTERNS)}, got {pattern!r}")
    causal = pattern.startswith("causal")
    sq = length if pattern.endswith("self") else max(1, length // CROSS_FRACTION)
    return causal, sq, length


def fidelity_pattern(name: str) -> str | None:
    patterns = variant_class(name).class_info().patterns
    return next((p for p in FIDELITY_ORDER if p in patterns), None)


# ---- extra inputs ------------------------------------------------------------------------------


def make_inputs(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """The required inputs of `attn.info.inputs` for this call, built generically from their declarations.

    long: ids over key positions become DOCUMENTS contiguous documents (query ids follow the
    bottom-right alignment), positions become aranges, lengths the key length; float: small random
    values (negative for log-space gates); bool: all True. Raises Unrunnable when it cannot.
    """
    sizes = {"B": q.shape[0], "H": q.shape[1], "Hkv": k.shape[1], "Sq": q.shape[2], "Sk": k.shape[2],
             "D": q.shape[3], "Dv": v.shape[3]}
    out = {}
    for spec in attn.info.inputs:
        if spec.required:
            out[spec.name] = _make_input(attn, spec, sizes, q.device, generator)
    return out


def describe_inputs(attn) -> dict[str, str]:
    """How the bench fills each required input of `attn`, for the results."""
    return {s.name: f"{s.dtype} {s.shape}: {_rule(s)}" for s in attn.info.inputs if s.required}


def _rule(spec) -> str:
    if spec.dtype == "bool":
        return "all True"
    if spec.dtype == "long":
        return {"positions": "aranges", "lengths": "the key length"}.get(_long_kind(spec),
                                                                       f"{DOCUMENTS} contiguous documents")
    return "small negative random values (log-space)" if _is_log(spec) else "0.1 x standard normal"


def _make_input(attn, spec, sizes: dict, device, generator) -> torch.Tensor:
    first = spec.shape.split("|")[0]
    dims = [d.strip() for d in first.strip().strip("()").split(",") if d.strip()]
    config = getattr(attn, "config", {})
    shape = [sizes[d] if d in sizes else int(d) if d.isdigit() else _int_or_free(config.get(d)) for d in dims]
    t = _fill(spec, shape, dims, sizes, device, generator)
    try:
        wanted = tuple(attn.input_shape(spec, sizes, t))
    except Exception as e:  # the variant's own resolution of its shape failed
        raise Unrunnable(f"{attn.info.name}: cannot build input {spec.name!r} {spec.shape}: {e}") from None
    if wanted != tuple(t.shape):
        if len(wanted) != len(dims):
            raise Unrunnable(f"{attn.info.name}: input {spec.name!r} {spec.shape} wants shape {wanted}, which the "
                             "bench cannot derive from its declaration")
        t = _fill(spec, list(wanted), dims, sizes, device, generator)
    return t


def _int_or_free(value) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else FREE_DIM


def _long_kind(spec) -> str:
    name = spec.name.lower()
    if "pos" in name:
        return "positions"
    if "len" in name:
        return "lengths"
    return "ids"


def _is_log(spec) -> bool:
    return "log" in spec.name.lower() or "log" in spec.doc.lower()


def _fill(spec, shape: list[int], dims: list[str], sizes: dict, device, generator) -> torch.Tensor:
    if spec.dtype == "bool":
        return torch.ones(shape, dtype=torch.bool, device=device)
    if spec.dtype == "long":
        return _long_input(spec, shape, dims[-1] if dims else "", sizes, device)
    x = torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)
    return -(0.1 * x).abs() if _is_log(spec) else 0.1 * x


def _long_input(spec, shape: list[int], last: str, sizes: dict, device) -> torch.Tensor:
    kind = _long_kind(spec)
    if kind == "lengths" or not shape:
        return torch.full(shape, sizes["Sk"], dtype=torch.long, device=device)
    n = shape[-1]
    offset = sizes["Sk"] - sizes["Sq"] if last == "Sq" else 0  # queries are the last Sq key positions
    pos = torch.arange(n, device=device) + offset
    row = pos if kind == "positions" else pos * DOCUMENTS // max(sizes["Sk"], 1)
    return row.expand(*shape).contiguous()



# ---- budgets relative to the length ------------------------------------------------------------------

_kept_memo: dict = {}
_budget_memo: dict = {}


def kept_fraction(name: str, length: int, params: dict | None = None, q=None, k=None) -> float | None:
    """Share of the (query, key) pairs that exact attention uses in `name`'s fidelity pattern at
    `length` which the configured variant keeps: its mask's allowed pairs over the pairs causality
    allows, averaged over batch and heads (SmolLM2's 9 query / 3 kv heads). 1.0 for variants with
    no mask (score modifiers); for content-sparse variants, counted on their selection from `q`, `k`
    (B, H, Sq, D) when given (else Gaussian). None where the variant has no mask to count (linear
    attention, pooled heads) or at lengths it cannot serve."""
    key = (name, length, _freeze_params(params), None if q is None else (id(q), tuple(q.shape)))
    if key not in _kept_memo:
        try:
            _kept_memo[key] = _kept(name, length, params or {}, q, k)
        except (Unrunnable, TypeError, ValueError):
            _kept_memo[key] = None
    return _kept_memo[key]


def _freeze_params(params: dict | None) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (params or {}).items()))


def _kept(name: str, length: int, params: dict, q, k) -> float | None:
    from ..core.selection import SelectionVariant
    from ..core.variant import SoftmaxVariant

    pattern = fidelity_pattern(name)
    if pattern is None:
        return None
    n, _ = fit(name, length)
    causal, sq, sk = pattern_shape(pattern, n)
    attn = configure(name, n, params)
    hq, hkv = COUNT_HEADS
    if isinstance(attn, SelectionVariant):
        if q is None or k is None or q.shape[2] < sk or sq > COUNT_ROWS:
            g = torch.Generator().manual_seed(0)
            q, k = torch.randn(1, hq, sq, 64, generator=g), torch.randn(1, hkv, sk, 64, generator=g)
        else:
            q, k = q[:, :, sk - sq:sk], k[:, :, :sk]
        m = attn.dense_mask(sq, sk, causal=causal, q=q, k=k, **make_inputs(attn, q, k, k))
        visible = _visible(causal, torch.arange(sq) + sk - sq, sk).sum() * m.shape[0] * m.shape[1]
        return float(m.sum()) / float(visible)
    if not isinstance(attn, SoftmaxVariant):
        return None  # not one softmax over a subset of the keys (pooled heads, linear attention)
    if not attn.has_mask:
        return 1.0
    one = torch.empty(1)
    dq, dk = one.expand(1, hq, sq, 8), one.expand(1, hkv, sk, 8)
    call = attn.prepare(dq, dk, dk, causal, None, make_inputs(attn, dq, dk, dk))
    rows = torch.arange(sq) if sq <= COUNT_ROWS else torch.linspace(0, sq - 1, SAMPLE_ROWS).round().long()
    q_pos = rows + sk - sq
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.arange(hq).view(1, -1, 1, 1)
    allowed = 0
    for chunk in q_pos.split(max(1, (1 << 22) // (sk * hq))):
        m = attn.full_mask(call, b, h, chunk.view(1, 1, -1, 1), torch.arange(sk).view(1, 1, 1, -1))
        allowed += hq * chunk.numel() * sk if m is None else int(torch.broadcast_to(m, (1, hq, chunk.numel(), sk)).sum())
    return allowed / float(_visible(causal, q_pos, sk).sum() * hq)


def _visible(causal: bool, q_pos: torch.Tensor, sk: int) -> torch.Tensor:
    return (q_pos + 1).clamp(max=sk) if causal else torch.full_like(q_pos, sk)


def budget_for(name: str, length: int, fraction: float, q=None, k=None) -> tuple | None:
    """(value, kept share) of `name`'s budget parameter keeping the share of the keys closest to
    `fraction` at `length` (nearest on a log scale; ties to the smaller budget), or None when the
    variant has no budget parameter or its keys cannot be counted. Values are searched on a ladder
    of factors of sqrt(2) over [1, length] (fractions for float parameters), each accepted by the
    variant, assuming more budget never keeps fewer keys."""
    key = (name, length, fraction, None if q is None else id(q))
    if key in _budget_memo:
        return _budget_memo[key]
    param = budget_param(name)
    result = None
    if param is not None and kept_fraction(name, length, {}, q, k) is not None:
        ladder = _ladder(name, param, fit(name, length)[0])
        lo, hi = 0, len(ladder) - 1
        kept = {}

        def at(i):
            if i not in kept:
                kept[i] = kept_fraction(name, length, {param: ladder[i]}, q, k)
            return kept[i]

        # smallest ladder index keeping >= fraction (bisection; kept is non-decreasing in the budget)
        while lo < hi:
            mid = (lo + hi) // 2
            f = at(mid)
            if f is not None and f >= fraction:
                hi = mid
            else:
                lo = mid + 1
        best = None
        for i in (lo - 1, lo):
            if 0 <= i < len(ladder) and at(i):
                d = abs(math.log(at(i) / fraction))
                if best is None or d < best[0] - 1e-12:
                    best = (d, ladder[i], at(i))
        if best is not None:
            result = (best[1], best[2])
    _budget_memo[key] = result
    return result


def _ladder(name: str, param: str, length: int) -> list:
    default = variant_class(name).class_info().param(param).default
    if isinstance(default, float):
        raw = [2.0 ** (-i / 2) for i in range(0, 2 * max(1, int(math.log2(length))) + 1)]
    else:
        raw = sorted({max(1, round(2 ** (i / 2))) for i in range(0, 2 * int(math.log2(max(length, 2))) + 2)} | {0})
    values = {_nearest_valid(name, param, v, length) for v in raw}
    return sorted(v for v in values if v is not None)


def equals_full(name: str, params: dict, kept: float | None) -> str | None:
    """Why this configuration is exact full attention at this length (its mask keeps every pair the
    exact causal attention uses, and it modifies no score), or None. Outputs equal to full's are
    detected on the outputs themselves (fidelity's `full_diff`)."""
    from ..core.variant import SoftmaxVariant

    cls = variant_class(name)
    plain = (issubclass(cls, SoftmaxVariant) and not cls.has_score and not cls.carries
             and cls.normalization == "softmax" and cls.forward_torch is SoftmaxVariant.forward_torch
             and cls._reference is SoftmaxVariant._reference)
    if kept is not None and kept >= 1.0 and plain and name != "full":
        return "its mask keeps every pair at this length"
    return None


def sweep_budgets(name: str, length: int, points: int, q=None, k=None) -> list:
    """Budget values for the error-vs-budget sweep: the declared `budget_sweep`; else, where the keys
    can be counted, the budgets keeping SWEEP_FRACTIONS[:points] of them (so no point is a copy of
    full attention or an empty mask); else `sweep_values`."""
    if points <= 0 or budget_param(name) is None:
        return []
    if variant_class(name).budget_sweep or kept_fraction(name, length, {}, q, k) is None:
        return sweep_values(name, length, points)
    found = (budget_for(name, length, f, q, k) for f in SWEEP_FRACTIONS[:points])
    return sorted({b[0] for b in found if b is not None})
