"""When `backend="auto"` takes the block-sparse Triton kernels: where they were measured faster.

`MEASURED` holds the speed of the `triton` backend relative to FlexAttention used directly on the same mask
(time of Flex / time of ours, forward and forward+backward), per (variant, length class, head-dim class, dtype),
from `benchmarks/gpu_structured.py` on `MEASURED_ON`. `auto` takes triton for a call only when both ratios of its
class exceed MARGIN (a single run's differences below it are within the noise of repeated runs); `explain` shows
the ratios, or that the class was never measured. `backend="triton"` runs any mask variant.
"""
from __future__ import annotations

MEASURED_ON = "NVIDIA H200, torch 2.11, triton 3.6, 2026-11-30, (4, 16, 8192, 128) H = Hkv"
MARGIN = 1.05
# (variant, length class, head-dim class, dtype) -> (fwd, fwd+bwd) speed relative to Flex used directly
MEASURED: dict[tuple[str, str, str, str], tuple[float, float]] = {
    ("sliding_window", "<=16k", "d<=128", "bfloat16"): (0.99, 0.86),
    ("sink_window", "<=16k", "d<=128", "bfloat16"): (1.06, 0.86),
    ("document", "<=16k", "d<=128", "bfloat16"): (1.03, 0.85),
    ("prefix_lm", "<=16k", "d<=128", "bfloat16"): (0.99, 0.92),
    ("block_rag", "<=16k", "d<=128", "bfloat16"): (0.97, 0.88),
    ("dilated_window", "<=16k", "d<=128", "bfloat16"): (0.96, 0.82),
    ("neighborhood_1d", "<=16k", "d<=128", "bfloat16"): (1.01, 0.88),
    ("neighborhood_2d", "<=16k", "d<=128", "bfloat16"): (1.18, 1.03),
}


def length_class(sk: int) -> str:
    for limit, name in ((4096, "<=4k"), (16384, "<=16k"), (65536, "<=64k")):
        if sk <= limit:
            return name
    return ">64k"


def head_dim_class(d: int) -> str:
    return "d<=64" if d <= 64 else "d<=128" if d <= 128 else "d>128"


def shape_class(variant, call, q) -> tuple[str, str, str, str]:
    s = call.shapes
    name = variant.name
    grid = variant.config.get("grid")
    if grid is not None:  # a grid variant's cost depends on its rank (a 1D band or 2D/3D boxes)
        name = f"{name}_{len(grid)}d"
    return (name, length_class(s.sk), head_dim_class(max(s.d, s.dv)), str(q.dtype).removeprefix("torch."))


def auto_why_not(variant, call, q) -> str | None:
    key = shape_class(variant, call, q)
    ratios = MEASURED.get(key)
    if ratios is None:
        return (f"the block-sparse kernels were not measured against flex for {key} "
                "(benchmarks/gpu_structured.py); backend='triton' runs them")
    if min(ratios) <= MARGIN:
        return (f"measured {ratios[0]:.2f}x (fwd) / {ratios[1]:.2f}x (fwd+bwd) Flex's speed for {key} "
                f"({MEASURED_ON}); auto takes them above {MARGIN}x both")
    return None
