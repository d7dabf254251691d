"""Content-sparse variants on the GPU: time of one call (selection included) against SDPA's exact causal
attention (cuDNN / flash, PyTorch's choice) on the same shape, at densities 1/4, 1/8, 1/16.

    PYTHONPATH=src python benchmarks/gpu_sparse.py --out gpu_sparse.json [--budget-s 200]

B=1, H=Hkv=16, D=128, bf16, causal; medians of CUDA-event timings after a warm-up call. The variants run
on attnzoo's `torch` path (per-(batch, head) block-sparse gather, `core.selection.attend_selected`).
Rows that fail (out of memory) are recorded; no row starts after --budget-s; JSON rewritten per row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.bench.speed import Timing, time_ms


def median_ms(fn, n: int) -> float:
    """Median (upper, for even n) of n CUDA-event timings after one untimed call, by the bench's own timer."""
    _, samples = time_ms(fn, torch.device("cuda"), Timing(repeats=n, min_repeats=n, max_seconds=float("inf")))
    return sorted(samples)[len(samples) // 2]


def configs(s: int, density: int) -> list[tuple[str, dict]]:
    blocks = s // 128
    return [("moba", {"block_size": 128, "top_k": max(1, blocks // density)}),
            ("quest", {"page": 128, "top_k": max(1, blocks // density)})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_sparse.json")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
           "shape": "B1 H16 D128 causal", "rows": [], "skipped": []}
    for s in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 16, s, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        n = 10 if s <= 32768 else 3
        base = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), n)
        for density in (4, 8, 16):
            for name, params in configs(s, density):
                row = {"seq_len": s, "density": f"1/{density}", "variant": name, "params": params, "sdpa_ms": base}
                if time.perf_counter() - t0 > args.budget_s:
                    res["skipped"].append(row)
                    continue
                attn = az.get(name, **params)
                try:
                    row["ms"] = median_ms(lambda: attn(q, k, v, causal=True), n)
                    row["speedup_vs_sdpa"] = base / row["ms"]
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.empty_cache()
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1)
        del q, k, v
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
