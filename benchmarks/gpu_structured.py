"""Structured (mask) variants on one CUDA GPU: attnzoo's block-sparse Triton kernels against cuDNN SDPA and against
FlexAttention used directly, in one run.

For every structured variant at (B, H, S, D) = (4,16,8192,128), (8,16,2048,64), (1,16,32768,128),
(1,16,131072,128), bf16, H = Hkv, rows per (shape, variant):

- TFLOP/s on useful pairs: 2 (D + Dv) FLOPs per allowed (query, key) pair forward, 3.5x that forward+backward
  (FlashAttention's convention: backward = 2.5 forwards); pairs counted exactly from the mask's tile bits;
- attnzoo `backend="triton"` (the call as users make it: per-call work included, tables cached) and Flex used
  directly: `torch.compile(flex_attention)` with a plain hand-written mask_mod and one `create_block_mask` per
  shape (built once, as users do; its build time is reported apart), forward and forward+backward;
- ratios to cuDNN SDPA causal attention (its TFLOP/s on causal pairs, same shape) and to Flex;
- peak memory above the inputs (forward+backward) for both;
- the time to build the kernel tables (forward and backward layouts, as on every change of the ids) against Flex's
  create_block_mask;
- correctness per variant on a small shape: FlashAttention's rule, the error of our bf16 output and gradients
  vs float64 over SDPA's error in bf16 with the dense mask (<= 2 passes).

Plus the per-call host time of a cached configuration (calls issued back to back on a tiny shape, where the host
is the bottleneck) against the raw kernel launch. Rows run in priority order until --budget-s; the rest are
recorded as skipped. Times: median of CUDA-event timings (triton.testing.do_bench). Needs torch, triton, attnzoo:

    PYTHONPATH=src python benchmarks/gpu_structured.py --out $OUT/gpu_structured.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.bench.speed import BWD_FLOP_FACTOR, peak_mib

SHAPES = [(4, 16, 8192, 128), (8, 16, 2048, 64), (1, 16, 32768, 128), (1, 16, 131072, 128)]
WINDOW = 1024


def useful_tflops(pairs: float, batch_heads: int, d: int, dv: int, ms: float, mode: str) -> float:
    """TFLOP/s of `pairs` allowed (query, key) pairs per (batch, head): 2 (D + Dv) FLOPs each forward."""
    flops = pairs * batch_heads * 2 * (d + dv) * (BWD_FLOP_FACTOR if mode == "fwd+bwd" else 1.0)
    return flops / (ms * 1e-3) / 1e12


def _grid2d(s: int) -> tuple[int, int]:
    h = 2 ** (int(math.log2(s)) // 2)
    return h, s // h


def _doc_ids(b: int, s: int, device) -> torch.Tensor:
    """Uneven packed documents (about 8 a row), sorted ids."""
    g = torch.Generator().manual_seed(s)
    cuts = torch.sort(torch.randint(1, s, (7,), generator=g)).values
    ids = torch.zeros(s, dtype=torch.long)
    for c in cuts:
        ids[c:] += 1
    return ids.expand(b, s).contiguous().to(device)


# ---- the variants: attnzoo configuration and Flex's plain mask_mod, written here by hand --------------------------


def variants(s: int, b: int, device):
    """(row name, variant name, params, inputs, causal, hand-written mask_mod) for sequence length s."""
    w = WINDOW
    docs = _doc_ids(b, s, device)
    gh, gw = _grid2d(s)
    k2 = 21
    k1 = 2 * w - 1  # 1D neighborhood of about the sliding window's width

    def causal(q, kv):
        return kv <= q

    def sliding(b_, h, q, kv):
        return causal(q, kv) & (q - kv <= w)

    def sinks(b_, h, q, kv):
        return causal(q, kv) & ((q - kv <= w) | (kv < 4))

    def document(b_, h, q, kv):
        return causal(q, kv) & (docs[b_, q] == docs[b_, kv])

    def prefix(b_, h, q, kv):
        return (kv <= q) | (kv < s // 4)

    last = docs[:, -1:]

    def block_rag(b_, h, q, kv):  # passages see themselves; the final block (the question) sees everything
        return causal(q, kv) & ((docs[b_, q] == docs[b_, kv]) | (docs[b_, q] == last[b_, 0]))

    def dilated(b_, h, q, kv):
        d = q - kv
        return (d >= 0) & (d <= (w // 4) * 4) & (d % 4 == 0)

    def nat1d(b_, h, q, kv):
        start = torch.clamp(q - k1 // 2, 0, s - k1)
        return (kv >= start) & (kv < start + k1)

    def nat2d(b_, h, q, kv):
        qy, qx, ky, kx = q // gw, q % gw, kv // gw, kv % gw
        sy = torch.clamp(qy - k2 // 2, 0, gh - k2)
        sx = torch.clamp(qx - k2 // 2, 0, gw - k2)
        return (ky >= sy) & (ky < sy + k2) & (kx >= sx) & (kx < sx + k2)

    return [
        ("sliding_window", "sliding_window", {"window": w}, {}, True, sliding),
        ("sink_window", "sink_window", {"sinks": 4, "window": w}, {}, True, sinks),
        ("document", "document", {}, {"document_ids": docs}, True, document),
        ("prefix_lm", "prefix_lm", {"prefix": s // 4}, {}, False, prefix),
        ("block_rag", "block_rag", {}, {"block_ids": docs}, True, block_rag),
        ("dilated_window", "dilated_window", {"window": w // 4, "dilation": 4}, {}, True, dilated),
        ("neighborhood_1d", "neighborhood", {"grid": (s,), "kernel_size": k1}, {}, False, nat1d),
        ("neighborhood_2d", "neighborhood", {"grid": (gh, gw), "kernel_size": k2}, {}, False, nat2d),
    ]


# ---- measuring ------------------------------------------------------------------------------------------------------


def bench_ms(fn, long: bool = False) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5 if long else 20, rep=30 if long else 80, return_mode="median"))


def fwd_bwd(fn, leaves, do):
    def run():
        out = fn()
        torch.autograd.grad(out, leaves, do)
    return run


def cudnn_causal_ms(q, k, v, do, long: bool) -> tuple[float, float]:
    """(forward, forward+backward) ms of cuDNN's causal SDPA on q, k, v: the baseline of every row."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cudnn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return bench_ms(cudnn, long), bench_ms(fwd_bwd(cudnn, (q, k, v), do), long)


def layout_pairs(lay, s: int, batch: int, heads: int) -> float:
    """Allowed (query, key) pairs per (batch, head), exactly, from the kernel's tables."""
    from attnzoo.backends.triton.blocksparse import Layout  # noqa: F401

    bm, bn = lay.block_m, lay.block_n
    nq = -(-s // bm)
    valid_rows = torch.clamp(s - torch.arange(nq, device=lay.full_num.device) * bm, max=bm)
    full = lay.full_num.view(-1, nq).double() * valid_rows * bn  # per (b', h') row set
    rows_b = batch if lay.b_step else 1
    rows_h = heads if lay.h_step else 1
    full_pairs = full.sum() * (batch // rows_b) * (heads // rows_h)
    part = 0.0
    for c0 in range(0, lay.bits.shape[0], 4096):
        w = lay.bits[c0:c0 + 4096]
        part += float(((w.unsqueeze(-1) >> torch.arange(32, device=w.device)) & 1).sum())
    part *= (batch // rows_b) * (heads // rows_h)
    return (float(full_pairs) + part) / (batch * heads)


def fa_rule(name, params, causal, device, s_small=1024) -> dict:
    """Our bf16 error (output, dq, dk, dv) vs float64 over SDPA's bf16 error with the dense mask."""
    if name == "neighborhood":
        params = dict(params, grid=(32, 32) if len(params["grid"]) == 2 else (s_small,),
                      kernel_size=min(params["kernel_size"], 15 if len(params["grid"]) == 2 else 255))
    if name == "prefix_lm":
        params = {"prefix": 200}
    if "window" in params:  # a window shorter than the small shape, so tiles of every kind occur
        params = dict(params, window=min(params["window"], 100))
    attn = az.get(name, **params)
    b, h, hkv, d = 2, 4, 2, 64
    inputs = {}
    if name in ("document", "block_rag"):
        inputs = {"document_ids" if name == "document" else "block_ids": _doc_ids(b, s_small, device)}
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(b, n, s_small, d, device=device, dtype=torch.float64, generator=g) for n in (h, hkv, hkv))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attn.reference(*leaves, causal=causal, **inputs)
    do = torch.randn_like(ref)
    ref = [ref, *torch.autograd.grad(ref, leaves, do)]
    mask = attn.dense_mask(s_small, s_small, causal=causal, heads=h, kv_heads=hkv, batch=b, device=device, **inputs)
    mask = mask.expand(b, h, s_small, s_small)
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    o = F.scaled_dot_product_attention(low[0], low[1].repeat_interleave(h // hkv, 1),
                                       low[2].repeat_interleave(h // hkv, 1), attn_mask=mask)
    o = torch.where(mask.any(-1, keepdim=True), o, 0)
    base = [o, *torch.autograd.grad(o, low, do.bfloat16())]
    ours_l = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = attn(*ours_l, causal=causal, backend="triton", **inputs)
    ours = [out, *torch.autograd.grad(out, ours_l, do.bfloat16())]
    ratios = {}
    for n, a, b_, r in zip(("o", "dq", "dk", "dv"), ours, base, ref):
        ratios[n] = (a.double() - r).abs().max().item() / max((b_.double() - r).abs().max().item(), 1e-12)
    return {"fa_ratio": max(ratios.values()), "fa_ratios": ratios, "fa_pass": max(ratios.values()) <= 2.0}


def host_overhead(device) -> dict:
    """Per-call host time of a cached config: tiny shape, calls issued back to back, then one sync."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnzoo.backends.triton import blocksparse as bs

    attn = az.get("sliding_window", window=64)
    q, k, v = (torch.randn(1, 2, 256, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    call = attn.prepare(q, k, v, True, None, {})
    lay = bs.layout_for(attn, call, bs.BLOCK_M, bs.BLOCK_N, "forward")
    compiled = torch.compile(flex_attention, dynamic=False)
    bm = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki <= 64), None, None, 256, 256, device=device)
    def descriptors():  # tensor descriptors whatever the size (by default calls this small read through pointers)
        bs.OPTIONS["tma_min_rows"] = 0
        try:
            return bs.forward(q, k, v, lay, call.scale)
        finally:
            bs.OPTIONS["tma_min_rows"] = 2**19

    fns = {"attnzoo_call": lambda: attn(q, k, v, causal=True, backend="triton"),
           "raw_kernel_launch": lambda: bs.forward(q, k, v, lay, call.scale),
           "raw_kernel_launch_descriptors": descriptors,
           "flex_direct_call": lambda: compiled(q, k, v, block_mask=bm)}
    out = {}
    for name, fn in fns.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        out[name + "_us"] = (time.perf_counter() - t0) / n * 1e6
    out["attnzoo_overhead_over_launch_us"] = out["attnzoo_call_us"] - out["raw_kernel_launch_us"]
    return out


# forward (and dQ) tile, K/V through tensor descriptors, warp specialisation: the forward kernel's options
# (warp specialisation failed to compile on the H200 with Triton 3.6 in every case,
# results/gpu_structured_sweep_h200.json)
SWEEP = [("128x64", False, False), ("128x64", True, False), ("128x128", True, False)]


def sweep(shapes, names, device) -> list[dict]:
    """Our kernels alone (tables cached) under each of SWEEP's options, forward and forward+backward, on causal
    attention (sliding_window with window = S, the same pairs as cuDNN's causal row) and the named rows."""
    from attnzoo.backends.triton import blocksparse as bs

    rows = []
    for b, h, s, d in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        do = torch.randn_like(q)
        long = s >= 32768
        cf, cfb = cudnn_causal_ms(q, k, v, do, long)
        pairs_c = s * (s + 1) / 2
        base = (useful_tflops(pairs_c, b * h, d, d, cf, "fwd"), useful_tflops(pairs_c, b * h, d, d, cfb, "fwd+bwd"))
        rows.append({"shape": [b, h, s, d], "variant": "cudnn causal", "fwd_tflops": base[0], "fwdbwd_tflops": base[1]})
        print(json.dumps(rows[-1]), flush=True)
        cases = [("causal", "sliding_window", {"window": s}, {}, True)]
        cases += [(r, n, p, i, c) for r, n, p, i, c, _ in variants(s, b, device) if r in names]
        first = {}
        for tile, tma, ws in SWEEP:
            bs.BLOCK_M, bs.BLOCK_N = (int(x) for x in tile.split("x"))
            bs.OPTIONS.update(tma=tma, tma_min_rows=0, warp_specialize=ws)
            for row_name, name, params, inputs, causal in cases:
                row = {"shape": [b, h, s, d], "variant": row_name, "tile": tile, "tma": tma, "warp_specialize": ws}
                try:
                    attn = az.get(name, **params)
                    call = attn.prepare(q, k, v, causal, None, inputs)
                    lay = bs.layout_for(attn, call, bs.BLOCK_M, bs.BLOCK_N, "forward")
                    pairs = layout_pairs(lay, s, b, h)
                    def fwd(attn=attn, call=call):  # the backend's forward (a dilated window runs its classes)
                        with torch.no_grad():
                            return bs.run(attn, q, k, v, call)

                    out = fwd()
                    ref = first.setdefault(row_name, out)
                    row["max_diff_vs_first_option"] = (out.float() - ref.float()).abs().max().item()
                    ours = lambda: attn(q, k, v, causal=causal, backend="triton", **inputs)  # noqa: E731
                    tf, tfb = bench_ms(fwd, long), bench_ms(fwd_bwd(ours, (q, k, v), do), long)
                    row.update(fwd_ms=tf, fwdbwd_ms=tfb, fwd_tflops=useful_tflops(pairs, b * h, d, d, tf, "fwd"),
                               fwdbwd_tflops=useful_tflops(pairs, b * h, d, d, tfb, "fwd+bwd"))
                    row["fwd_vs_cudnn_causal"] = row["fwd_tflops"] / base[0]
                    row["fwdbwd_vs_cudnn_causal"] = row["fwdbwd_tflops"] / base[1]
                except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                    row["error"] = f"{type(e).__name__}: {e}"[:400]
                rows.append(row)
                print(json.dumps(row), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    bs.BLOCK_M, bs.BLOCK_N = 128, 64
    bs.OPTIONS.update(tma=True, tma_min_rows=2**19, warp_specialize=False)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_structured.json"))
    ap.add_argument("--shapes", default=None, help="e.g. 4x16x8192x128,8x16x2048x64 (default: all four)")
    ap.add_argument("--variants", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no row after this many seconds")
    ap.add_argument("--no-flex", action="store_true", help="skip Flex used directly")
    ap.add_argument("--no-host", action="store_true", help="skip the per-call host time measurement")
    ap.add_argument("--tile", default=None, help="forward/dQ tile of the triton tables, e.g. 128x128 (default: "
                                                 "the module's BLOCK_M x BLOCK_N)")
    ap.add_argument("--sweep", action="store_true", help="only the forward options' sweep (SWEEP) over --shapes "
                                                           "and --variants, kernels alone")
    args = ap.parse_args(argv)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnzoo.backends.triton import blocksparse as bs

    if args.tile:
        bs.BLOCK_M, bs.BLOCK_N = (int(x) for x in args.tile.split("x"))
    t_start = time.perf_counter()
    device = torch.device("cuda")
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    if args.sweep:
        names = args.variants.split(",") if args.variants else ["sliding_window", "document", "prefix_lm"]
        rows = sweep(shapes, names, device)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"), "sweep": rows,
                       "total_s": time.perf_counter() - t_start}, f, indent=1)
        return 0
    torch._dynamo.config.recompile_limit = 1000
    compiled = torch.compile(flex_attention, dynamic=False)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "dtype": "bfloat16", "date": time.strftime("%Y-%m-%d"),
              "flops": "2 (D + Dv) per allowed pair forward; 3.5x forward+backward", "rows": [], "skipped": [],
              "correctness": {}, "tile": [bs.BLOCK_M, bs.BLOCK_N], "bwd_tile": [bs.BWD_BLOCK_M, bs.BWD_BLOCK_N]}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    try:
        if not args.no_host:
            result["host_overhead"] = host_overhead(device)
            print("host", json.dumps(result["host_overhead"]), flush=True)
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        result["host_overhead"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    for (b, h, s, d) in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        do = torch.randn_like(q)
        long = s >= 32768
        shape = [b, h, s, d]
        try:
            cf, cfb = cudnn_causal_ms(q, k, v, do, long)
            causal_pairs = s * (s + 1) / 2
            base = {"fwd": useful_tflops(causal_pairs, b * h, d, d, cf, "fwd"),
                    "fwd+bwd": useful_tflops(causal_pairs, b * h, d, d, cfb, "fwd+bwd")}
            result["rows"].append({"shape": shape, "variant": "full/causal", "impl": "cudnn", "fwd_ms": cf,
                                   "fwdbwd_ms": cfb, "fwd_tflops": base["fwd"], "fwdbwd_tflops": base["fwd+bwd"]})
            print(json.dumps(result["rows"][-1]), flush=True)
        except Exception as e:  # noqa: BLE001
            base = None
            result["rows"].append({"shape": shape, "variant": "full/causal", "impl": "cudnn",
                                   "error": f"{type(e).__name__}: {e}"[:300]})
        for row_name, name, params, inputs, causal, mask_mod in variants(s, b, device):
            if args.variants and row_name not in args.variants.split(","):
                continue
            if time.perf_counter() - t_start > args.budget_s:
                result["skipped"].append({"shape": shape, "variant": row_name, "why": "time budget"})
                continue
            row = {"shape": shape, "variant": row_name, "params": {k_: list(v_) if isinstance(v_, tuple) else v_
                                                                  for k_, v_ in params.items()}, "causal": causal}
            try:
                attn = az.get(name, **params)
                if row_name not in result["correctness"]:
                    result["correctness"][row_name] = fa_rule(name, params, causal, device)
                ours = lambda: attn(q, k, v, causal=causal, backend="triton", **inputs)  # noqa: E731
                t0 = time.perf_counter()
                ours().sum().backward()  # compiles and builds the tables
                torch.cuda.synchronize()
                row["first_call_s"] = time.perf_counter() - t0
                call = attn.prepare(q, k, v, causal, None, inputs)
                lay = bs.layout_for(attn, call, bs.BLOCK_M, bs.BLOCK_N, "forward")
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for variant_, call_ in bs.table_calls(attn, call):  # a dilated window's: its classes' bands
                    bs.build_layout(variant_, call_, bs.BLOCK_M, bs.BLOCK_N, "forward")
                    bs.build_layout(variant_, call_, bs.BWD_BLOCK_M, bs.BWD_BLOCK_N, "transposed")
                torch.cuda.synchronize()
                row["triton_build_ms"] = (time.perf_counter() - t0) * 1e3  # both layouts, as when the ids change
                pairs = layout_pairs(lay, s, b, h)
                row["density"] = pairs / (s * s)
                tf, tfb = bench_ms(ours, long), bench_ms(fwd_bwd(ours, (q, k, v), do), long)
                row.update(fwd_ms=tf, fwdbwd_ms=tfb, fwd_tflops=useful_tflops(pairs, b * h, d, d, tf, "fwd"),
                           fwdbwd_tflops=useful_tflops(pairs, b * h, d, d, tfb, "fwd+bwd"),
                           peak_mib=peak_mib(fwd_bwd(ours, (q, k, v), do), device))
                if base:
                    row["fwd_vs_cudnn_causal"] = row["fwd_tflops"] / base["fwd"]
                    row["fwdbwd_vs_cudnn_causal"] = row["fwdbwd_tflops"] / base["fwd+bwd"]
                if not args.no_flex:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    bm = create_block_mask(mask_mod, b if inputs else None, None, s, s, device=device,
                                           _compile=s >= 32768)
                    torch.cuda.synchronize()
                    row["flex_build_ms"] = (time.perf_counter() - t0) * 1e3
                    flex = lambda: compiled(q, k, v, block_mask=bm)  # noqa: E731
                    ff, ffb = bench_ms(flex, long), bench_ms(fwd_bwd(flex, (q, k, v), do), long)
                    row.update(flex_fwd_ms=ff, flex_fwdbwd_ms=ffb, flex_peak_mib=peak_mib(fwd_bwd(flex, (q, k, v), do), device),
                               fwd_vs_flex=ff / tf, fwdbwd_vs_flex=ffb / tfb)
                    del bm
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
        del q, k, v, do
        torch.cuda.empty_cache()
    result["total_s"] = time.perf_counter() - t_start
    save()
    print_table(result)
    return 0


def print_table(result) -> None:
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  bf16  {result['date']}")
    print(f"{'shape':>18} {'variant':>16} {'fwd TF':>7} {'f+b TF':>7} {'fwd/cuDNN':>9} {'f+b/cuDNN':>9} "
          f"{'fwd/Flex':>8} {'f+b/Flex':>8} {'peak MiB':>9} {'Flex MiB':>9} {'FA rule':>7}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{str(r['shape']):>18} {r['variant']:>16}  error: {r['error'][:90]}")
            continue
        fa = result["correctness"].get(r["variant"], {}).get("fa_ratio", float("nan"))

        def f(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if key in r else "-"

        print(f"{str(r['shape']):>18} {r['variant']:>16} {f('fwd_tflops', '{:.0f}'):>7} {f('fwdbwd_tflops', '{:.0f}'):>7} "
              f"{f('fwd_vs_cudnn_causal'):>9} {f('fwdbwd_vs_cudnn_causal'):>9} {f('fwd_vs_flex'):>8} "
              f"{f('fwdbwd_vs_flex'):>8} {f('peak_mib', '{:.0f}'):>9} {f('flex_peak_mib', '{:.0f}'):>9} {fa:7.2f}")
    if result.get("host_overhead"):
        print("per-call host time (us):", json.dumps(result["host_overhead"]))
    if result["skipped"]:
        print(f"skipped (time budget): {len(result['skipped'])} rows")


if __name__ == "__main__":
    sys.exit(main())
