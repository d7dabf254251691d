"""The one-call API: az.attention, az.get, az.variants."""
from __future__ import annotations

from .registry import variant_class, variants  # noqa: F401  (re-exported)
from .info import did_you_mean
from .variant import Variant, _freeze


def get(name: str, **params) -> Variant:
    """A configured variant, reusable: it keeps its compiled kernels and block masks between calls."""
    try:
        key = _freeze(params)
        hash(key)
    except TypeError:
        return variant_class(name)(**params)
    return _cached(name, key, params)


_CACHE: dict = {}


def _cached(name: str, key, params: dict) -> Variant:
    v = _CACHE.get((name, key))
    if v is None:
        v = variant_class(name)(**params)
        if len(_CACHE) > 512:
            _CACHE.clear()
        _CACHE[(name, key)] = v
    return v


def attention(q, k, v, variant: str = "full", *, causal: bool = False, scale: float | None = None,
              backend: str = "auto", **kwargs):
    """Attention of any registered variant in SDPA layout.

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); keyword arguments are the variant's
    parameters (see `az.get(name).info.params`), extra input tensors (`info.inputs`) and, for the
    recurrent family, its call options (`mode`, `initial_state`, `output_final_state`, `cu_seqlens`).
    """
    cls = variant_class(variant)
    param_names = {p.name for p in cls.params}
    # call options: how to run rather than what to compute (the recurrent family's mode, states...)
    input_names = {i.name for i in cls.inputs} | set(getattr(cls, "call_options", ()))
    unknown = sorted(set(kwargs) - param_names - input_names)
    if unknown:
        what = f"parameter or input {unknown[0]!r}" if len(unknown) == 1 else f"parameters or inputs {unknown}"
        raise TypeError(f"{variant}: unknown {what}{did_you_mean(unknown, param_names | input_names)}; "
                        f"parameters: {sorted(param_names) or 'none'}, inputs: {sorted(input_names) or 'none'}")
    params = {k_: v_ for k_, v_ in kwargs.items() if k_ in param_names}
    inputs = {k_: v_ for k_, v_ in kwargs.items() if k_ not in param_names}
    return get(variant, **params)(q, k, v, causal=causal, scale=scale, backend=backend, **inputs)
