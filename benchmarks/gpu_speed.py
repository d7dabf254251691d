"""Speed of attnzoo's structured variants on a CUDA GPU against cuDNN SDPA, flash SDPA and compiled
FlexAttention as users call it (create_block_mask from the mask function), in one run.

For each shape (B, H, S, D) and variant: forward and forward+backward time (median of CUDA-event
timings after warm-up, via triton.testing.do_bench), TFLOP/s counting only the unmasked work
(4·B·H·D·pairs forward, 3.5x that for forward+backward: FlashAttention's convention), peak memory, the time to build the block
mask (ours from the variant's structure vs Flex's create_block_mask), and ratios to cuDNN full
attention and to user-built Flex on the same mask. bf16, GQA off (H = Hkv), causal.

    PYTHONPATH=src python benchmarks/gpu_speed.py --out gpu_speed.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attnzoo as az
from attnzoo.backends import flex as az_flex
from attnzoo.bench.speed import BWD_FLOP_FACTOR

SHAPES = [(4, 16, 8192, 128), (1, 16, 32768, 128), (8, 16, 2048, 64)]
VARIANTS = [
    ("sliding_window", {"window": 1024}),
    ("sink_window", {"sinks": 4, "window": 1024}),
    ("document", {}),
    ("prefix_lm", {"prefix": 1024}),
    ("block_rag", {}),
]


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def docs(b, s, n=8):
    cuts = torch.linspace(0, s, n + 1).long()[1:-1]
    ids = torch.zeros(s, dtype=torch.long)
    for c in cuts:
        ids[c:] += 1
    return ids.expand(b, s).contiguous().cuda()


def time_pair(fwd, q, k, v):
    t_f = bench_ms(fwd)
    do = torch.randn_like(q)

    def fb():
        o = fwd()
        torch.autograd.grad(o, (q, k, v), do)

    return t_f, bench_ms(fb), peak_mib(fwd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_speed.json")
    args = ap.parse_args(argv)
    # The user-style baseline: one compiled flex_attention, limit raised so it stays fused on every shape.
    torch._dynamo.config.recompile_limit = 1000
    compiled = torch.compile(flex_attention, dynamic=False)
    rows = []
    for (b, h, s, d) in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
                   for _ in range(3))
        full_pairs = s * s
        causal_pairs = s * (s + 1) // 2
        tflops = lambda pairs, ms, mult=1.0: 4 * b * h * d * pairs * mult / (ms * 1e-3) / 1e12  # noqa: E731
        base = {}
        for name, backend, causal in [("cudnn", SDPBackend.CUDNN_ATTENTION, False), ("cudnn", SDPBackend.CUDNN_ATTENTION, True),
                                      ("flash", SDPBackend.FLASH_ATTENTION, False), ("flash", SDPBackend.FLASH_ATTENTION, True)]:
            def fwd(backend=backend, causal=causal):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            try:
                tf, tfb, mem = time_pair(fwd, q, k, v)
                pairs = causal_pairs if causal else full_pairs
                base[(name, causal)] = (tf, tfb)
                rows.append({"shape": [b, h, s, d], "variant": "full" + ("/causal" if causal else ""), "impl": name,
                             "fwd_ms": tf, "fwdbwd_ms": tfb, "fwd_tflops": tflops(pairs, tf),
                             "fwdbwd_tflops": tflops(pairs, tfb, BWD_FLOP_FACTOR), "peak_mib": mem})
            except Exception as e:
                rows.append({"shape": [b, h, s, d], "variant": "full", "impl": name, "error": f"{type(e).__name__}: {e}"[:300]})
        cudnn_full = base.get(("cudnn", False))
        for vname, params in VARIANTS:
            attn = az.get(vname, **params)
            inputs = {}
            if vname == "document":
                inputs = {"document_ids": docs(b, s)}
            if vname == "block_rag":
                inputs = {"block_ids": docs(b, s)}
            causal = "causal_self" in attn.info.patterns  # prefix_lm is causal by definition
            try:
                mask = attn.dense_mask if s <= 8192 else None
                call = attn.prepare(q, k, v, causal, None, inputs)
                struct = attn.block_structure(call, 128, 128)
                # useful pairs, from the tile structure (exact count would need the dense mask)
                pairs = None
                if mask is not None:
                    m = attn.dense_mask(s, s, causal=causal, batch=b if inputs else 1, device="cuda", **inputs)
                    pairs = float(m.sum()) / (b if m.dim() == 4 else 1)
                    del m
                t0 = time.perf_counter(); torch.cuda.synchronize()
                for _ in range(10):
                    attn.block_structure(call, 128, 128)
                torch.cuda.synchronize(); ours_build = (time.perf_counter() - t0) / 10 * 1e3
                ours = lambda: attn(q, k, v, causal=causal, backend="flex", **inputs)  # noqa: E731
                ours()
                from torch._dynamo.utils import counters
                before = counters["stats"]["unique_graphs"]
                tf, tfb, mem = time_pair(ours, q, k, v)
                recompiled = counters["stats"]["unique_graphs"] - before
                mm = attn.mask_mod_for(s, s, causal=causal, **inputs)
                t0 = time.perf_counter(); torch.cuda.synchronize()
                bm = create_block_mask(mm, b if inputs else None, None, s, s, device="cuda")
                torch.cuda.synchronize(); flex_build = (time.perf_counter() - t0) * 1e3
                t0 = time.perf_counter(); torch.cuda.synchronize()
                bm = create_block_mask(mm, b if inputs else None, None, s, s, device="cuda")
                torch.cuda.synchronize(); flex_build = min(flex_build, (time.perf_counter() - t0) * 1e3)
                user = lambda: compiled(q, k, v, block_mask=bm)  # noqa: E731
                uf, ufb, umem = time_pair(user, q, k, v)
                if pairs is None:
                    pairs = struct.density() * full_pairs  # upper bound from tiles
                row = {"shape": [b, h, s, d], "variant": vname, "params": params, "impl": "attnzoo flex",
                       "fwd_ms": tf, "fwdbwd_ms": tfb, "fwd_tflops": tflops(pairs, tf), "fwdbwd_tflops": tflops(pairs, tfb, BWD_FLOP_FACTOR),
                       "peak_mib": mem, "mask_build_ms": ours_build, "tile_density": struct.density(),
                       "recompiles_on_repeat": recompiled,
                       "user_flex_fwd_ms": uf, "user_flex_fwdbwd_ms": ufb, "user_flex_build_ms": flex_build,
                       "speedup_vs_user_flex_fwd": uf / tf, "speedup_vs_user_flex_fwdbwd": ufb / tfb}
                if cudnn_full:
                    row["fwd_tflops_vs_cudnn_full"] = row["fwd_tflops"] / tflops(full_pairs, cudnn_full[0])
                    row["fwdbwd_tflops_vs_cudnn_full"] = row["fwdbwd_tflops"] / tflops(full_pairs, cudnn_full[1], BWD_FLOP_FACTOR)
                rows.append(row)
            except Exception as e:
                rows.append({"shape": [b, h, s, d], "variant": vname, "impl": "attnzoo flex", "error": f"{type(e).__name__}: {e}"[:400]})
            print(json.dumps(rows[-1]), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
           "date": time.strftime("%Y-%m-%d"), "rows": rows, "flex_stats": dict(az_flex.stats)}
    json.dump(out, open(args.out, "w"), indent=1)
    print(f"{'shape':>18} {'variant':>16} {'impl':>13} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9} {'vs Flex f':>9} {'vs Flex fb':>10} {'build ms':>9} {'Flex build':>10}")
    for r in rows:
        if "error" in r:
            print(r["shape"], r["variant"], r["impl"], r["error"][:120])
            continue
        print(f"{str(r['shape']):>18} {r['variant']:>16} {r['impl']:>13} {r['fwd_ms']:8.3f} {r['fwd_tflops']:9.1f} "
              f"{r['fwdbwd_ms']:8.3f} {r['fwdbwd_tflops']:9.1f} {r.get('speedup_vs_user_flex_fwd', float('nan')):9.2f} "
              f"{r.get('speedup_vs_user_flex_fwdbwd', float('nan')):10.2f} {r.get('mask_build_ms', float('nan')):9.3f} "
              f"{r.get('user_flex_build_ms', float('nan')):10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
