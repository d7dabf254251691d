"""Building the Triton block-sparse kernel tables against FlexAttention's create_block_mask, for the same masks.

For every structured variant row of benchmarks/gpu_structured.py (`variants()`, imported from there: the same
parameters and the same plain hand-written mask_mods) and shape (B, H, S) in --shapes, two builds are measured:

- ours: the forward (128 x 64 tiles) and backward (64 x 128 tiles) layouts, built as when the ids change
  (`build_layout` twice, what gpu_structured.py times; for a dilated window, of the band its residue classes run);
- Flex: `create_block_mask(mask_mod, B or None, None, S, S)` (eager, as gpu_structured.py builds it below 32k).

Each is timed (median of --repeats warm runs, synchronised on CUDA) and its torch ops are COUNTED (aten ops
dispatched, a TorchDispatchMode counter). On a GPU host each op costs a launch (about 10 us on the H200's host), so
the op count is the proxy for the GPU build time measured on a CPU; the CPU times are printed too. Prints a table
(ops and ms of both, their ratios) and writes JSON:

    PYTHONPATH=src python benchmarks/table_build.py                          # CPU, 2k and 8k
    PYTHONPATH=src python benchmarks/table_build.py --device cuda --out $OUT/table_build.json

Each layout carries only the lists its kernels read (`build_layout(..., lists="forward")` for the forward layout,
"transposed" for the dK/dV one), as the backend builds them; --both-lists builds both directions in each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the rows, parameters and mask_mods of the GPU run:
from gpu_structured import variants

import attnzoo as az
from attnzoo.backends.triton import blocksparse as bs
from attnzoo.bench.decode import time_steps
from attnzoo.bench.speed import sync

SHAPES = [(4, 16, 8192), (8, 16, 2048)]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched: views (no kernel on a GPU, a few us of host time) apart from the others
    (a kernel launch each, about 10 us of host time on the H200's host)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def measure(fn, device, repeats: int) -> dict:
    """Median ms of `repeats` warm runs, the non-view ops and the views one run dispatches (the most frequent
    non-view ops listed)."""
    fn()
    sync(device)
    counter = OpCounter()
    with counter:
        fn()
    sync(device)
    median_ms = time_steps(fn, repeats, device, warmup=1)["median_us"] / 1e3
    return {"ms": median_ms, "ops": sum(counter.ops.values()), "views": counter.views,
            "top_ops": dict(counter.ops.most_common(8))}


def ours_builder(name: str, params: dict, inputs: dict, causal: bool, b: int, h: int, s: int, device,
                 read_only: bool = False):
    """Both layouts of the call, built from scratch (what a change of the ids costs); `read_only`: each with only
    the lists its kernels read (forward lists of the forward layout, transposed lists of the dK/dV one)."""
    attn = az.get(name, **params)
    q = torch.empty(1, 1, 1, 1, device=device, dtype=torch.bfloat16).expand(b, h, s, 64)  # shapes only
    call = attn.prepare(q, q, q, causal, None, inputs)
    parts = bs.table_calls(attn, call)  # a dilated window's: its residue classes' bands

    def build():
        return [(bs.build_layout(v, c, bs.BLOCK_M, bs.BLOCK_N, "forward" if read_only else "both"),
                 bs.build_layout(v, c, bs.BWD_BLOCK_M, bs.BWD_BLOCK_N, "transposed" if read_only else "both"))
                for v, c in parts]
    return build


def flex_builder(mask_mod, inputs: dict, b: int, s: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return lambda: create_block_mask(mask_mod, b if inputs else None, None, s, s, device=device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=None, help="BxHxS list, e.g. 4x16x8192,8x16x2048 (default: these two)")
    ap.add_argument("--variants", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-flex", action="store_true", help="time only our build")
    ap.add_argument("--both-lists", action="store_true", help="build both directions' lists in each layout (the "
                                                              "backend builds only the ones its kernels read)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "table_build.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    try:
        from tqdm import tqdm
    except ImportError:  # the GPU host may lack it
        def tqdm(x, **_):
            return x
    result = {"device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
              "lists": "both directions" if args.both_lists else "read only", "rows": []}
    jobs = [(shape, row) for shape in shapes for row in variants(shape[2], shape[0], device)
            if not args.variants or row[0] in args.variants.split(",")]
    for (b, h, s), (row_name, name, params, inputs, causal, mask_mod) in tqdm(jobs, desc="builds", unit="row"):
        row = {"shape": [b, h, s], "variant": row_name}
        row["ours"] = measure(ours_builder(name, params, inputs, causal, b, h, s, device, not args.both_lists), device,
                              args.repeats)
        if not args.no_flex:
            row["flex"] = measure(flex_builder(mask_mod, inputs, b, s, device), device, args.repeats)
            row["ops_ratio"] = row["ours"]["ops"] / row["flex"]["ops"]
            row["ms_ratio"] = row["ours"]["ms"] / row["flex"]["ms"]
        result["rows"].append(row)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{result['device']}  torch {result['torch']}  {result['date']}  (median of {args.repeats}; our lists: "
          f"{result['lists']})")
    print("ops: aten ops other than views (one kernel launch each on a GPU); views: view ops (no kernel)")
    print(f"{'shape':>14} {'variant':>16} {'ours ops':>8} {'Flex ops':>8} {'ops ratio':>9} {'ours views':>10} "
          f"{'Flex views':>10} {'ours ms':>8} {'Flex ms':>8} {'ms ratio':>8}")
    for r in result["rows"]:
        f = r.get("flex", {})
        print(f"{'x'.join(map(str, r['shape'])):>14} {r['variant']:>16} {r['ours']['ops']:>8} {f.get('ops', '-'):>8} "
              f"{r.get('ops_ratio', float('nan')):>9.2f} {r['ours']['views']:>10} {f.get('views', '-'):>10} "
              f"{r['ours']['ms']:>8.2f} {f.get('ms', float('nan')):>8.2f} {r.get('ms_ratio', float('nan')):>8.2f}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
