"""The `sdpa` backend: PyTorch's scaled_dot_product_attention where it expresses a variant exactly.

Only variants with no mask beyond causality and no score modifier: a mask tensor would be
Sq x Sk, which no fast path may build. Bottom-right causal (Sq < Sk): on CUDA PyTorch's
`causal_lower_right` bias, which the flash and memory-efficient kernels take without a mask
tensor; on CPU that bias would be materialised (an Sq x Sk mask, and keys repeated per query
head), so there the call is the CPU flash kernel twice, merged by log-sum-exp: keys before the
first query unmasked, the last Sq keys with the kernel's causal flag (torch_blockwise's fused path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.variant import Call
from . import torch_blockwise


def can_run(variant, call: Call) -> str | None:
    """None if SDPA serves this call exactly, else the reason it cannot."""
    if not getattr(variant, "sdpa_capable", lambda: False)():
        return f"{variant.name} has a mask or score modifier that SDPA cannot take without an Sq x Sk mask tensor"
    return None


def sdpa(variant, q, k, v, call: Call) -> torch.Tensor:
    s = call.shapes
    if call.causal and s.sq != s.sk:
        if torch_blockwise.fused_why_not(variant, call, q) is None:  # CPU
            return torch_blockwise.softmax_fused(variant, q, k, v, call)
        from torch.nn.attention.bias import causal_lower_right

        k = k.repeat_interleave(s.group, dim=1) if s.group > 1 else k
        v = v.repeat_interleave(s.group, dim=1) if s.group > 1 else v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(s.sq, s.sk), scale=call.scale)
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=call.causal, scale=call.scale, enable_gqa=s.group > 1
    )
