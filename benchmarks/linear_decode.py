"""O(1) decoding: time per token of every linear variant's `step` from 1k to 64k tokens of context, against
exact softmax decoding with a KV cache that grows with the context, in the same run (see
attnzoo.bench.decode for the method). Prints the table and the ratios, writes JSON.

    python benchmarks/linear_decode.py [--device cuda] [--out linear_decode.json] [--contexts 1024 4096 ...]
                                       [--budget-s 150] [--heads 8] [--variants gla titans ...]

Points (variant, context) not reached within --budget-s are listed as such (the default keeps a CUDA run of
every variant under 3 minutes; a CPU run to 64k needs a larger budget or fewer heads).

CPU: float32, one thread (--threads). CUDA: bfloat16 inputs (states accumulate in
float32). Geometry: B1, 8 heads (query = KV), head dim 64.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from attnzoo.bench import decode


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per point (default 20 CPU, 50 CUDA)")
    ap.add_argument("--variants", nargs="+", default=None, help="default: every recurrent variant")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="stop prefilling new points after this many seconds (points not reached are listed)")
    ap.add_argument("--out", default="linear_decode.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # one decode step is a few small matmuls: threads only add synchronisation (and, on a busy machine,
        # spin-waits that cost milliseconds)
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = args.steps or (50 if device.type == "cuda" else 20)
    contexts = sorted(args.contexts)
    geo = decode.Geometry(heads=args.heads, head_dim=args.head_dim)
    names = args.variants or decode.recurrent_variants()
    gen = torch.Generator(device=device).manual_seed(0)
    rows: dict[str, dict] = {}
    t0 = time.time()
    deadline = time.monotonic() + args.budget_s
    with tqdm(total=(len(names) + 1) * len(contexts), desc="decode", unit="point") as bar:
        rows["full"] = {"by_context": decode.full_decode(contexts, geo, dtype, device, steps, gen, bar.update)}
        for name in names:
            bar.set_postfix_str(name)
            start = bar.n
            try:
                rows[name] = {"params": decode.DECODE_PARAMS.get(name, {}),
                              "by_context": decode.recurrent_decode(name, contexts, geo, dtype, device, steps, gen,
                                                                    bar.update, deadline)}
                missed = [n for n in contexts if n not in rows[name]["by_context"]]
                if missed:
                    rows[name]["not_reached"] = missed
                    bar.update(len(missed))
            except Exception as e:  # a variant that cannot decode here is reported, not fatal
                rows[name] = {"error": f"{type(e).__name__}: {e}"}
                bar.update(start + len(contexts) - bar.n)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "dtype": str(dtype), "geometry": vars(geo), "contexts": contexts, "steps": steps,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
              "ratios": decode.ratios(rows, contexts), "seconds": round(time.time() - t0, 1)}
    show(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']} s)")
    return result


def show(result: dict) -> None:
    contexts, ratios = result["contexts"], result["ratios"]
    table = Table(title=f"decode µs/token, {result['device']} {result['dtype']}")
    table.add_column("variant")
    for n in contexts:
        table.add_column(f"{n // 1024}k" if n % 1024 == 0 else str(n), justify="right")
    table.add_column(f"{contexts[-1]}/{contexts[0]} time", justify="right")
    table.add_column("state growth", justify="right")
    table.add_column(f"full / variant at {contexts[-1]}", justify="right")
    for name, row in result["rows"].items():
        if "error" in row:
            table.add_row(name, *["-"] * len(contexts), row["error"][:40], "", "")
            continue
        if name not in ratios:  # the time budget ended first
            table.add_row(name, *(f"{row['by_context'][n]['us_per_token']:.0f}" if n in row["by_context"] else
                                  "(time)" for n in contexts), "", "", "")
            continue
        r = ratios[name]
        speed = r.get("speedup_vs_full", {}).get(contexts[-1])
        table.add_row(name, *(f"{row['by_context'][n]['us_per_token']:.0f}" for n in contexts),
                      f"{r['growth']:.2f}x", f"{r['state_growth']:.2f}x", "" if speed is None else f"{speed:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
