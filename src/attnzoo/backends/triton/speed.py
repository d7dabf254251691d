"""When `backend="auto"` takes the block-sparse Triton kernels: where they were measured faster.

`FASTER` holds measured speedups of the `triton` backend over the backend `auto` would otherwise pick (flex on
CUDA), forward and forward+backward, per (variant, shape class, dtype), from `benchmarks/gpu_structured.py` on
the device named in `MEASURED_ON`. `auto` takes triton for a call only when both ratios of its class exceed 1;
`explain` shows the ratio or that the class was never measured. `backend="triton"` runs any mask variant.
"""
from __future__ import annotations

MEASURED_ON = ""
# (variant, length class, head-dim class, dtype) -> (fwd speedup, fwd+bwd speedup) over flex
FASTER: dict[tuple[str, str, str, str], tuple[float, float]] = {}


def length_class(sk: int) -> str:
    for limit, name in ((4096, "<=4k"), (16384, "<=16k"), (65536, "<=64k")):
        if sk <= limit:
            return name
    return ">64k"


def head_dim_class(d: int) -> str:
    return "d<=64" if d <= 64 else "d<=128" if d <= 128 else "d>128"


def shape_class(variant, call, q) -> tuple[str, str, str, str]:
    s = call.shapes
    return (variant.name, length_class(s.sk), head_dim_class(max(s.d, s.dv)), str(q.dtype).removeprefix("torch."))


def auto_why_not(variant, call, q) -> str | None:
    key = shape_class(variant, call, q)
    ratios = FASTER.get(key)
    if ratios is None:
        return (f"the block-sparse kernels were not measured faster than flex for {key} "
                "(benchmarks/gpu_structured.py); backend='triton' runs them")
    if min(ratios) <= 1.0:
        return f"measured {ratios[0]:.2f}x (fwd) / {ratios[1]:.2f}x (fwd+bwd) flex's speed for {key} on {MEASURED_ON}"
    return None
