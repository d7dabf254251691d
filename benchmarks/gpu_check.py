"""Correctness of every variant on a CUDA GPU, by FlashAttention's rule, for each fast path.

For each registered variant, each CAB pattern it claims, head dims 64 and 128 (and 48/80/96/192/256
for a few), fp16 and bf16, and each backend it has on CUDA: the fast path's max error against the
float64 reference must be <= 2x the error of a low-precision baseline computing the same thing
(PyTorch SDPA with the variant's dense mask where the variant is a pure mask; the variant's own
definition fed low-precision inputs otherwise), both against float64. Gradients (dq, dk, dv) are
checked the same way where the backend supports backward. Also counts recompilations of a
repeated flex call (must be 0). Writes JSON; prints a table.

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.bench.cases import Unrunnable, configure, make_inputs, pattern_shape

ODD_HEAD_DIMS = (48, 80, 96, 192, 256)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def baseline(attn, q, k, v, causal, dtype, inputs, ref):
    """Low-precision baseline output for FlashAttention's rule."""
    pure_mask = isinstance(attn, az.SoftmaxVariant) and not attn.has_score and attn.normalization == "softmax"
    if pure_mask:
        b, hq, sq, _ = q.shape
        mask = attn.dense_mask(sq, k.shape[2], causal=causal, heads=hq, kv_heads=k.shape[1], batch=b,
                               device=q.device, **inputs)
        mask = mask if mask.dim() == 4 else mask.unsqueeze(0)
        g = hq // k.shape[1]
        low = F.scaled_dot_product_attention(q.to(dtype), k.repeat_interleave(g, 1).to(dtype),
                                             v.repeat_interleave(g, 1).to(dtype), attn_mask=mask)
        return torch.where(mask.any(-1, keepdim=True), low, torch.zeros_like(low)), "sdpa"
    low_inputs = {n: t.to(dtype) if t.is_floating_point() else t for n, t in inputs.items()}
    return attn.reference(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, **low_inputs), "reference-in-dtype"


def check_one(name, pattern, d, dtype, backend, length, grads):
    attn = configure(name, length)
    causal, sq, sk = pattern_shape(pattern, length)
    g = torch.Generator(device="cuda").manual_seed(hash((name, pattern, d)) % 2**31)
    q = torch.randn(2, 8, sq, d, device="cuda", dtype=torch.float64, generator=g)
    k = torch.randn(2, 2, sk, d, device="cuda", dtype=torch.float64, generator=g)
    v = torch.randn(2, 2, sk, d, device="cuda", dtype=torch.float64, generator=g)
    inputs = make_inputs(attn, q, k, v)
    row = {"variant": name, "pattern": pattern, "d": d, "dtype": str(dtype).split(".")[-1], "backend": backend}
    qd, kd, vd = (t.clone().requires_grad_(grads) for t in (q, k, v))
    ref = attn.reference(qd, kd, vd, causal=causal, **inputs)
    base, base_kind = baseline(attn, q, k, v, causal, dtype, inputs, ref)
    ql, kl, vl = (t.to(dtype).requires_grad_(grads) for t in (q, k, v))
    low_inputs = {n: t.to(dtype) if t.is_floating_point() else t for n, t in inputs.items()}
    out = attn(ql, kl, vl, causal=causal, backend=backend, **low_inputs)
    row.update(err=max_err(out, ref), base_err=max_err(base, ref), baseline=base_kind, finite=bool(torch.isfinite(out).all()))
    row["ok"] = row["finite"] and row["err"] <= 2 * row["base_err"] + 1e-6
    if grads:
        do = torch.randn_like(ref)
        ref_g = torch.autograd.grad(ref, (qd, kd, vd), do)
        our_g = torch.autograd.grad(out, (ql, kl, vl), do.to(dtype))
        qb, kb, vb = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        if base_kind == "sdpa":
            b_out, _ = baseline(attn, qb, kb, vb, causal, dtype, inputs, ref)
        else:
            b_out = attn.reference(qb, kb, vb, causal=causal, **low_inputs)
        base_g = torch.autograd.grad(b_out, (qb, kb, vb), do.to(b_out.dtype))
        row["grad_err"] = max(max_err(a, r) for a, r in zip(our_g, ref_g))
        row["grad_base_err"] = max(max_err(a, r) for a, r in zip(base_g, ref_g))
        row["ok"] = row["ok"] and row["grad_err"] <= 2 * row["grad_base_err"] + 1e-5
    return row


def recompiles_on_repeat(name, length) -> int:
    from torch._dynamo.utils import counters

    attn = configure(name, length)
    q = torch.randn(1, 8, length, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, length, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    inputs = make_inputs(attn, q, k, v)
    attn(q, k, v, causal=True, backend="flex", **inputs)
    before = counters["stats"]["unique_graphs"]
    attn(q.clone(), k.clone(), v.clone(), causal=True, backend="flex", **inputs)
    return counters["stats"]["unique_graphs"] - before


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--variants", default=None)
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new checks after this long")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    names = args.variants.split(",") if args.variants else [i.name for i in az.variants()]
    rows, t0 = [], time.time()
    for name in names:
        info = next(i for i in az.variants() if i.name == name)
        dims = (64, 128) + (ODD_HEAD_DIMS if name in ("full", "sliding_window", "document") else ())
        for backend in [b for b in info.backends if b in ("flex", "torch", "sdpa", "triton")]:
            for pattern in info.patterns:
                for d in dims if pattern == "causal_self" else (64,):
                    for dtype in (torch.bfloat16, torch.float16) if (pattern, d) == ("causal_self", 64) else (torch.bfloat16,):
                        if time.time() - t0 > args.budget_s:
                            break
                        grads = pattern == "causal_self" and dtype == torch.bfloat16 and d in (64, 128)
                        try:
                            rows.append(check_one(name, pattern, d, dtype, backend, args.length, grads))
                        except Unrunnable as e:
                            rows.append({"variant": name, "pattern": pattern, "backend": backend, "skipped": str(e)})
                        except Exception as e:
                            rows.append({"variant": name, "pattern": pattern, "d": d, "backend": backend,
                                         "dtype": str(dtype), "ok": False, "error": f"{type(e).__name__}: {e}"[:400],
                                         "trace": traceback.format_exc()[-1500:]})
    recompiles = {}
    for name in ("sliding_window", "document", "sink_window"):
        try:
            recompiles[name] = recompiles_on_repeat(name, 4096)
        except Exception as e:
            recompiles[name] = f"{type(e).__name__}: {e}"[:300]
    ok = sum(1 for r in rows if r.get("ok"))
    bad = [r for r in rows if r.get("ok") is False]
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": len(rows), "ok": ok,
               "failed": len(bad), "recompiles_on_repeat": recompiles, "seconds": round(time.time() - t0, 1)}
    json.dump({"summary": summary, "rows": rows}, open(args.out, "w"), indent=1)
    for r in bad[:40]:
        print("FAIL", {k: r.get(k) for k in ("variant", "pattern", "d", "dtype", "backend", "err", "base_err",
                                            "grad_err", "grad_base_err", "error")})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
