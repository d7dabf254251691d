"""When `backend="auto"` takes the block-sparse Triton kernels: where they were measured faster.

`MEASURED` holds the speed of the `triton` backend relative to FlexAttention used directly on the same mask
(time of Flex / time of ours, forward and forward+backward), per (variant, length class, head-dim class, dtype),
from `benchmarks/gpu_structured.py` on `MEASURED_ON`. `auto` takes triton for a call when the ratio that applies
exceeds MARGIN (a single run's differences below it are within the noise of repeated runs): forward+backward when
the call records gradients for q, else forward; `explain` shows the ratios, or that the class was never measured.
A dilated window with per-head lattices is its own class (it runs on the general tables, not as residue classes).
`backend="triton"` runs any mask variant.
"""
from __future__ import annotations

import torch

MEASURED_ON = ("NVIDIA H200, torch 2.11, triton 3.6, 2026-11-30, (4,16,8192,128), (8,16,2048,64), (1,16,32768,128), "
               "(1,16,131072,128), H = Hkv (results/gpu_structured_h200.json)")
MARGIN = 1.05
# (variant, length class, head-dim class, dtype) -> (fwd, fwd+bwd) speed relative to Flex used directly
MEASURED: dict[tuple[str, str, str, str], tuple[float, float]] = {
    ('sliding_window', '<=16k', 'd<=128', 'bfloat16'): (1.06, 0.87),
    ('sink_window', '<=16k', 'd<=128', 'bfloat16'): (1.11, 0.90),
    ('document', '<=16k', 'd<=128', 'bfloat16'): (1.08, 0.85),
    ('prefix_lm', '<=16k', 'd<=128', 'bfloat16'): (1.09, 0.92),
    ('block_rag', '<=16k', 'd<=128', 'bfloat16'): (1.04, 0.91),
    ('dilated_window', '<=16k', 'd<=128', 'bfloat16'): (1.57, 1.88),
    ('neighborhood_1d', '<=16k', 'd<=128', 'bfloat16'): (1.10, 0.90),
    ('neighborhood_2d', '<=16k', 'd<=128', 'bfloat16'): (1.24, 1.04),
    ('sliding_window', '<=4k', 'd<=64', 'bfloat16'): (0.68, 0.66),
    ('sink_window', '<=4k', 'd<=64', 'bfloat16'): (0.74, 0.75),
    ('document', '<=4k', 'd<=64', 'bfloat16'): (1.27, 0.63),
    ('prefix_lm', '<=4k', 'd<=64', 'bfloat16'): (0.56, 0.66),
    ('block_rag', '<=4k', 'd<=64', 'bfloat16'): (0.71, 0.62),
    ('dilated_window', '<=4k', 'd<=64', 'bfloat16'): (1.23, 0.78),
    ('neighborhood_1d', '<=4k', 'd<=64', 'bfloat16'): (0.56, 0.67),
    ('neighborhood_2d', '<=4k', 'd<=64', 'bfloat16'): (1.09, 0.98),
    ('sliding_window', '<=64k', 'd<=128', 'bfloat16'): (1.00, 0.86),
    ('sink_window', '<=64k', 'd<=128', 'bfloat16'): (1.05, 1.11),
    ('document', '<=64k', 'd<=128', 'bfloat16'): (1.14, 0.91),
    ('prefix_lm', '<=64k', 'd<=128', 'bfloat16'): (1.17, 0.96),
    ('block_rag', '<=64k', 'd<=128', 'bfloat16'): (1.02, 0.91),
    ('dilated_window', '<=64k', 'd<=128', 'bfloat16'): (1.63, 1.87),
    ('neighborhood_1d', '<=64k', 'd<=128', 'bfloat16'): (1.12, 0.87),
    ('neighborhood_2d', '<=64k', 'd<=128', 'bfloat16'): (1.59, 1.34),
    ('sliding_window', '>64k', 'd<=128', 'bfloat16'): (1.06, 0.91),
    ('sink_window', '>64k', 'd<=128', 'bfloat16'): (1.13, 1.14),
    ('document', '>64k', 'd<=128', 'bfloat16'): (1.16, 0.99),
    ('prefix_lm', '>64k', 'd<=128', 'bfloat16'): (1.22, 0.96),
    ('block_rag', '>64k', 'd<=128', 'bfloat16'): (1.15, 0.97),
    ('dilated_window', '>64k', 'd<=128', 'bfloat16'): (2.21, 1.87),
    ('neighborhood_1d', '>64k', 'd<=128', 'bfloat16'): (1.11, 0.94),
    ('neighborhood_2d', '>64k', 'd<=128', 'bfloat16'): (1.71, 1.46),
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
    if getattr(variant, "lattice", None) is not None:
        from .blocksparse import _lattice

        if _lattice(variant, call) is None:
            name = f"{name}_per_head"
    return (name, length_class(s.sk), head_dim_class(max(s.d, s.dv)), str(q.dtype).removeprefix("torch."))


def auto_why_not(variant, call, q) -> str | None:
    key = shape_class(variant, call, q)
    ratios = MEASURED.get(key)
    if ratios is None:
        return (f"the block-sparse kernels were not measured against flex for {key} "
                "(benchmarks/gpu_structured.py); backend='triton' runs them")
    training = torch.is_grad_enabled() and q.requires_grad
    if ratios[1 if training else 0] <= MARGIN:
        return (f"measured {ratios[0]:.2f}x (fwd) / {ratios[1]:.2f}x (fwd+bwd) Flex's speed for {key} "
                f"({MEASURED_ON}); auto takes them above {MARGIN}x ({'fwd+bwd' if training else 'fwd'}: "
                f"{'this call records gradients' if training else 'no gradients recorded'})")
    return None
