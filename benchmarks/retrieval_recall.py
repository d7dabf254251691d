"""RetrievalAttention's premise on SmolLM2's real q/k (attnzoo.bench.capture, cached): a stock nearest-neighbour
index over the keys (faiss HNSW, inner product) finds the exact top-k keys of an attention query less often
than those of a query drawn like the keys, because LLM queries lie out of the keys' distribution.

Per layer, for the last --queries positions (causal, no static sinks or window: the index alone), the recall
of retrieval_attention's HNSW search against the exact top-k and the exact attention mass both selections keep,
at several search breadths (ef_search); the same recall with keys as the queries (in distribution).

    python benchmarks/retrieval_recall.py [--length 512] [--top-k 32] [--out DIR]

Writes retrieval_recall.json to --out and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import attnzoo as az  # noqa: E402
from attnzoo import models  # noqa: E402
from attnzoo.bench import capture  # noqa: E402


def recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    rows = zip(found.reshape(-1, found.shape[-1]).tolist(), exact.reshape(-1, exact.shape[-1]).tolist())
    return sum(len((set(a) & set(b)) - {-1}) for a, b in rows) / max(1, int((exact >= 0).sum()))


def mass(q, k, mask) -> float:
    """Mean exact causal softmax mass on the selected keys (queries are the last positions)."""
    sq, sk = q.shape[2], k.shape[2]
    scores = q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    visible = torch.arange(sk).view(1, -1) <= (torch.arange(sq) + sk - sq).view(-1, 1)
    p = torch.softmax(scores.masked_fill(~visible, -torch.inf), -1)
    return float((p * mask).sum(-1).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--layers", default="0,10,19,29")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--ef", default="16,64,256")
    p.add_argument("--out", type=Path, default=Path("results/retrieval_recall"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")]
    qkv, info = capture.captured_qkv("smollm2", args.length, layers, lambda: models.load_causal_lm())
    common = {"top_k": args.top_k, "sinks": 0, "window": 0}
    rows = []
    for layer in layers:
        q, k, _ = (t.double() for t in qkv[layer])
        q = q[:, :, -args.queries:]
        keys_as_queries = k[:, :, -args.queries:].repeat_interleave(q.shape[1] // k.shape[1], 1)
        exact = az.get("retrieval_attention", index="exact", **common)
        exact_sel = exact.selection(q, k, causal=True).indices
        exact_mass = mass(q, k, exact.dense_mask(q.shape[2], k.shape[2], causal=True, q=q, k=k))
        for ef in (int(x) for x in args.ef.split(",")):
            hnsw = az.get("retrieval_attention", ef_search=ef, **common)
            rows.append({
                "layer": layer, "ef_search": ef,
                "recall": recall(hnsw.selection(q, k, causal=True).indices, exact_sel),
                "recall_keys_as_queries": recall(hnsw.selection(keys_as_queries, k, causal=True).indices,
                                                 exact.selection(keys_as_queries, k, causal=True).indices),
                "mass_hnsw": mass(q, k, hnsw.dense_mask(q.shape[2], k.shape[2], causal=True, q=q, k=k)),
                "mass_exact": exact_mass})
    table = Table(title=f"HNSW recall of the exact top-{args.top_k} keys, SmolLM2, {args.length} tokens, last "
                        f"{args.queries} queries")
    for col in ("layer", "ef_search", "recall (queries)", "recall (keys as queries)", "mass HNSW", "mass exact"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), str(r["ef_search"]), f"{r['recall']:.3f}", f"{r['recall_keys_as_queries']:.3f}",
                      f"{r['mass_hnsw']:.3f}", f"{r['mass_exact']:.3f}")
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": "smollm2", "length": args.length, "queries": args.queries, "top_k": args.top_k,
              "capture": info, "rows": rows, "seconds": time.perf_counter() - t0}
    (args.out / "retrieval_recall.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'retrieval_recall.json'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
