"""Shared checks for exact variants: fast path == reference, FlashAttention's low-precision rule."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

PATTERN_SHAPES = {
    # pattern -> (causal, Sq, Sk); lengths are deliberately not multiples of any block size
    "causal_self": (True, 77, 77),
    "causal_cross": (True, 19, 83),
    "noncausal_self": (False, 61, 61),
    "noncausal_cross": (False, 45, 70),
}


def qkv(b, hq, hkv, sq, sk, d, dv=None, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, sk, dv, generator=g, dtype=torch.float64).to(dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_exact(attn, q, k, v, causal, backend="torch", tol=1e-10, **inputs):
    out = attn(q, k, v, causal=causal, backend=backend, **inputs)
    ref = attn.reference(q, k, v, causal=causal, **inputs)
    assert out.shape == ref.shape == (*q.shape[:3], v.shape[-1])
    assert torch.isfinite(out).all()
    err = max_err(out, ref)
    assert err <= tol, f"{attn!r} {backend} causal={causal} q{tuple(q.shape)} k{tuple(k.shape)}: err {err:.3e}"
    return err


def sdpa_error(attn, q, k, v, causal, dtype, **inputs) -> float:
    """Error of PyTorch's own SDPA in `dtype` computing the same masked attention, vs float64."""
    mask = attn.dense_mask(q.shape[2], k.shape[2], causal=causal, heads=q.shape[1], kv_heads=k.shape[1],
                           batch=q.shape[0], **{n: t for n, t in inputs.items()})
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    ref = attn.reference(q, k, v, causal=causal, **inputs)
    g = q.shape[1] // k.shape[1]
    low = F.scaled_dot_product_attention(
        q.to(dtype), k.repeat_interleave(g, 1).to(dtype), v.repeat_interleave(g, 1).to(dtype), attn_mask=mask
    )
    low = torch.where(mask.any(-1, keepdim=True), low, torch.zeros_like(low))  # SDPA gives NaN on empty rows
    return max_err(low, ref)


def assert_fa_rule(attn, q, k, v, causal, dtype, backend="torch", **inputs):
    """FlashAttention's rule: fast-path error in dtype <= 2x SDPA's error in dtype, both vs float64."""
    ref = attn.reference(q, k, v, causal=causal, **inputs)
    out = attn(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, backend=backend, **inputs)
    assert out.dtype == dtype
    ours = max_err(out, ref)
    base = sdpa_error(attn, q, k, v, causal, dtype, **inputs)
    assert ours <= 2 * base + 1e-6, f"{attn!r} {dtype}: ours {ours:.3e} > 2 x sdpa {base:.3e}"
    return ours, base


def reference_error(attn, q, k, v, causal, dtype, **inputs) -> float:
    """Error of the variant's own dense definition fed `dtype` tensors, vs float64.

    The low-precision baseline for variants SDPA cannot express (score modifiers, non-softmax
    weights). It is stricter than FlashAttention's (PyTorch attention computed in fp16/bf16): the
    reference rounds its inputs and its output to `dtype` but computes in float32.
    """
    ref = attn.reference(q, k, v, causal=causal, **inputs)
    low = {n: t.to(dtype) if t.is_floating_point() else t for n, t in inputs.items()}
    return max_err(attn.reference(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, **low), ref)


def assert_reference_rule(attn, q, k, v, causal, dtype, backend="torch", **inputs):
    """FlashAttention's rule against the variant's own definition: fast-path error in dtype <= 2x
    the error of that definition run on dtype inputs (`reference_error`), both vs float64."""
    ref = attn.reference(q, k, v, causal=causal, **inputs)
    low = {n: t.to(dtype) if t.is_floating_point() else t for n, t in inputs.items()}
    out = attn(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, backend=backend, **low)
    assert out.dtype == dtype
    ours = max_err(out, ref)
    base = reference_error(attn, q, k, v, causal, dtype, **inputs)
    assert ours <= 2 * base + 1e-6, f"{attn!r} {dtype}: ours {ours:.3e} > 2 x reference-in-dtype {base:.3e}"
    return ours, base


# The end of the block-sparse kernels' interpreter scripts: a failing backward kernel must fall back (right
# gradients; the script defines `check`, `worst`, `bs` and FALLBACK_CASES, a list of its cases), then every error
# within tolerance.
BACKWARD_FALLBACK_AND_REPORT = """
def boom(*a, **k):
    raise RuntimeError("simulated")
bs.backward = boom
warnings.simplefilter("ignore", RuntimeWarning)
for i, case in enumerate(FALLBACK_CASES):
    check(f"float32.fallback.{i}", *case)
print("WORST", worst)
bad = {k: v for k, v in worst.items() if v > (1e-5 if k.startswith("float32") else 1.5e-2)}
assert not bad, bad
"""


# Triton's CPU interpreter runs our kernels from 3.9 on (the `triton-interpreter` extra); 3.6, which torch 2.11's
# CUDA wheels pin, fails inside the interpreter on runtime loop bounds ("only 0-dimensional arrays can be converted
# to Python scalars") although the same kernels compile and pass on the GPU.
INTERPRETER_MIN = (3, 9)


def run_under_triton_interpreter(script: str, **env: str) -> str:
    """Runs `script` in a fresh Python with TRITON_INTERPRET=1 (Triton's CPU interpreter: kernels on CPU tensors),
    asserts it succeeded and printed its WORST errors line, and returns its stdout. Skips below INTERPRETER_MIN."""
    import pytest
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < INTERPRETER_MIN:
        pytest.skip(f"Triton's CPU interpreter needs triton >= {'.'.join(map(str, INTERPRETER_MIN))} "
                    f"(pip install 'attnzoo[triton-interpreter]'); this is {triton.__version__}")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1500,
                         env=dict(os.environ, TRITON_INTERPRET="1", **env))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "WORST" in out.stdout
    return out.stdout
