"""Content-sparse variants on the GPU: time of one call (selection included) against SDPA's exact causal
attention (cuDNN / flash, PyTorch's choice) on the same shape, at densities 1/4, 1/8, 1/16.

    PYTHONPATH=src python benchmarks/gpu_sparse.py --out gpu_sparse.json [--budget-s 400] [--lengths 8192,32768]
        [--flex] [--profile]

B=1, H=Hkv=16, D=128, bf16, causal; medians of CUDA-event timings after a warm-up call. Each variant runs as a
user calls it (`attn(q, k, v, causal=True)`: `auto` takes the `triton` backend's selected-block kernels,
backends/triton/selected.py); the row also splits that time into the selection (`attn.select`), the forward's
tables (what the call builds: `shared_rows_layout` for SeerAttention's per-query-block selection, else
`selection_layout`) and the kernel alone, and gives the share of the causal tiles the kernel computes (the union
of each query tile's selections: equal to the selection for SeerAttention, larger for MoBA and Quest, which select
per query).

Density 1/n is the share of causal attention's (query block, key block) pairs a selection of top_k 128-key blocks
per query reads: sum_i min(i, top_k) / (n_blocks (n_blocks + 1) / 2), the top_k that comes closest. (A fixed
top_k = n_blocks / n reads about 2/n - 1/n^2 of the causal pairs, because the early queries read every block
before them; `keys_read` gives the share of all keys, as before.) fwd+bwd (the gradient of q, k, v; 3.5x the
forward's FLOPs by convention) at <= 32k. `kernel_bm64_ms`: the SeerAttention rows' kernel on 64-query tiles.
`graph_ms`: the SeerAttention call captured in a CUDA graph by the caller and replayed (its path has no device
sync, so a caller that captures its model, as inference engines do, pays no per-call host work).
Inputs are random: the union (hence MoBA's and Quest's speed) depends on how much nearby queries agree, which
real activations make larger than random ones. Rows that fail (out of memory) are recorded; no row starts after
--budget-s; the JSON is rewritten per row. `--flex` adds the selection as a compiled Flex BlockMask
(`core.selection_flex`), built per call. `--profile` prints torch.profiler's table of one SeerAttention call at
32k (else the longest length), density 1/8.
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
from attnzoo.backends.triton import blocksparse as bs
from attnzoo.backends.triton import selected
from attnzoo.bench.speed import Timing, time_ms


def median_ms(fn, n: int) -> float:
    """Median (upper, for even n) of n CUDA-event timings after one untimed call, by the bench's own timer."""
    _, samples = time_ms(fn, torch.device("cuda"), Timing(repeats=n, min_repeats=n, max_seconds=float("inf")))
    return sorted(samples)[len(samples) // 2]


def causal_share(blocks: int, top_k: int) -> float:
    """Share of causal attention's (query block, key block) pairs that top_k blocks per query block read."""
    return sum(min(i, top_k) for i in range(1, blocks + 1)) / (blocks * (blocks + 1) / 2)


def top_k_for(s: int, density: int, block: int = 128) -> int:
    """The top_k whose causal share is closest to 1 / density."""
    blocks = -(-s // block)
    return min(range(1, blocks + 1), key=lambda t: abs(causal_share(blocks, t) - 1 / density))


def configs(s: int, density: int) -> list[tuple[str, dict]]:
    """MoBA and Quest to 32k: on random inputs their per-query selections union to nearly every causal tile,
    whose bit tables at 128k (17 GB) would measure the tables, not the method."""
    top_k = top_k_for(s, density)
    per_query = [("moba", {"block_size": 128, "top_k": top_k}), ("quest", {"page": 128, "top_k": top_k})]
    return [("seer", {"block_size": 128, "top_k": top_k})] + (per_query if s <= 32768 else [])


def tile_share(lay, s: int) -> float:
    """Tiles the kernel computes / the causal tiles dense attention computes (same tile grid)."""
    nq, nk = -(-s // lay.block_m), -(-s // lay.block_n)
    per_row = lay.block_m // lay.block_n
    causal = sum(min(nk, (i + 1) * per_row) for i in range(nq))
    rows = lay.full_num.shape[0] // nq
    return float((lay.full_num.sum() + lay.part_num.sum()).item()) / (causal * rows)


def captured(fn) -> torch.cuda.CUDAGraph:
    """`fn` captured in a CUDA graph (after warm-up calls on a side stream, as torch.cuda.graphs requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    from attnzoo.core.selection_flex import flex_attend_selected

    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda attn, q, k, v, sel, call: flex_attend_selected(q, k, v, sel, call, flex_attention=compiled)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_sparse.json")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
           "shape": "B1 H16 D128 causal", "date": time.strftime("%Y-%m-%d"), "rows": [], "skipped": []}
    flex = flex_fn() if args.flex else None
    for s in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 16, s, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        do = torch.randn_like(q)
        n = 10 if s <= 32768 else 3
        base = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), n)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        base_fb = None
        if s <= 32768:
            base_fb = median_ms(lambda: torch.autograd.grad(
                F.scaled_dot_product_attention(*leaves, is_causal=True), leaves, do), n)
        for density in (4, 8, 16):
            for name, params in configs(s, density):
                row = {"seq_len": s, "density": f"1/{density}", "variant": name, "params": params, "sdpa_ms": base,
                       "sdpa_fwdbwd_ms": base_fb}
                if time.perf_counter() - t0 > args.budget_s:
                    res["skipped"].append(row)
                    continue
                attn = az.get(name, **params)
                try:
                    row["backend"] = next(r["backend"] for r in attn.explain(q, k, v, causal=True) if r["chosen"])
                    row["ms"] = median_ms(lambda: attn(q, k, v, causal=True), n)
                    row["speedup_vs_sdpa"] = base / row["ms"]
                    call = attn.prepare(q, k, v, True, None, {})
                    sel = attn.select(q, k, call)
                    tables = selected._SelectionTables(sel, call)
                    lay = tables.forward_layout()
                    shared = selected.shared_rows_layout(sel, call, selected.forward_block_m(sel), bs.BLOCK_N)
                    row["tables"] = "per query block" if shared is not None else "per query"
                    row["select_ms"] = median_ms(lambda: attn.select(q, k, call), n)
                    row["layout_ms"] = median_ms(tables.forward_layout, n)
                    row["kernel_ms"] = median_ms(lambda: bs.forward(q, k, v, lay, call.scale), n)
                    row["kernel_speedup_vs_sdpa"] = base / row["kernel_ms"]
                    row["tiles_of_causal"] = tile_share(lay, s)
                    row["causal_share"] = causal_share(-(-s // 128), params["top_k"])
                    row["keys_read"] = sel.density()
                    if name == "seer":   # sync-free: the whole call replays from a CUDA graph (no host work)
                        try:
                            graph = captured(lambda: attn(q, k, v, causal=True))
                            row["graph_ms"] = median_ms(graph.replay, n)
                            row["graph_speedup_vs_sdpa"] = base / row["graph_ms"]
                        except Exception as e:  # noqa: BLE001 - recorded, the row goes on
                            row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                    narrow = selected.shared_rows_layout(sel, call, 64, bs.BLOCK_N)
                    if narrow is not None:
                        row["kernel_bm64_ms"] = median_ms(lambda: bs.forward(q, k, v, narrow, call.scale), n)
                        row["kernel_bm64_speedup_vs_sdpa"] = base / row["kernel_bm64_ms"]
                    if base_fb is not None:
                        row["fwdbwd_ms"] = median_ms(lambda: torch.autograd.grad(
                            attn(*leaves, causal=True), leaves, do), n)
                        row["fwdbwd_speedup_vs_sdpa"] = base_fb / row["fwdbwd_ms"]
                    if flex is not None and s <= 32768:
                        row["flex_ms"] = median_ms(lambda: flex(attn, q, k, v, attn.select(q, k, call), call), n)
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.empty_cache()
                res["rows"].append(row)
                print(json.dumps({n_: (round(x, 4) if isinstance(x, float) else x) for n_, x in row.items()}),
                      flush=True)
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1)
        del q, k, v, do, leaves
        torch.cuda.empty_cache()
    res["elapsed_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.profile:
        lengths = [int(x) for x in args.lengths.split(",")]
        profile(32768 if 32768 in lengths else max(lengths))


def profile(s: int) -> None:
    """torch.profiler's table (CPU and CUDA time per op) of one SeerAttention call at 1/8."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    q, k, v = (torch.randn(1, 16, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    attn = az.get("seer", block_size=128, top_k=top_k_for(s, 8))
    for _ in range(3):
        attn(q, k, v, causal=True)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        attn(q, k, v, causal=True)
        torch.cuda.synchronize()
    for key in ("self_cpu_time_total", "self_cuda_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)


if __name__ == "__main__":
    main()
