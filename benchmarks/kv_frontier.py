"""Accuracy vs KV bytes really held (codes, scales, minimums, offsets and full-precision tails counted)
on SmolLM2: eviction composed with int4 / int2 storage, eviction alone in the ragged layout, and
quantization alone, against the uncompressed model in the same run (issue 23's frontier).

    python benchmarks/kv_frontier.py --out results/kv_frontier            # 2k tokens, CPU
    python benchmarks/kv_frontier.py --passkey 2 --others 0 --out /tmp/x   # a quick look
    python benchmarks/kv_frontier.py --presses kvpress --compare kvpress --others 0 --out results/kv_vs_kvpress
        # in an environment with kvpress and a transformers it admits (kvpress 0.5.5: transformers<5.3)
    python benchmarks/kv_frontier.py --presses kvzip --only "kvzip(0.75)" --compare kvpress --others 0 --out DIR
        # attnzoo's kvzip against kvpress's KVzipPress at 0.75, same samples

Presses that compress after each layer's attention replay the uncompressed prefill, computed once per
sample (`evaluate(share_prefill=True)`): same caches and answers; kvzip runs its own prefill.
Writes results.json (records + summary, after every sample) and report.html; prints the table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnzoo.kv as kv
from attnzoo import models
from attnzoo.kv import evaluate, report, tasks


def presses() -> list:
    q4, q2 = kv.get("kv_quant", bits=4), kv.get("kv_quant", bits=2)
    return [
        kv.compose(q2),                                                   # quantization alone, ~0.09 of the bytes
        kv.get("snapkv", ratio=0.5) + q4, kv.get("expected_attention", ratio=0.5) + q4,      # <= 0.10
        kv.get("snapkv", ratio=0.65) + q2, kv.get("expected_attention", ratio=0.65) + q2,    # <= 0.05
        kv.compose(kv.get("razor", ratio=0.78)), kv.compose(kv.get("snapkv", ratio=0.78)),  # eviction only,
        kv.compose(kv.get("expected_attention", ratio=0.78)),                              # <= 0.25
        kv.get("razor", ratio=0.5) + kv.get("tova", ratio=0.78),
    ]


def retrieval_presses() -> list:
    """Per-head budgets from retrieval heads (razor's induction/echo profile, head_roles' attnzoo.heads
    probe) composed with int4 / int2 storage."""
    q4, q2 = kv.get("kv_quant", bits=4), kv.get("kv_quant", bits=2)
    return [kv.get("razor", ratio=0.5) + q4, kv.get("razor", ratio=0.78) + q4, kv.get("razor", ratio=0.65) + q2,
            kv.get("razor", ratio=0.78) + q2, kv.compose(kv.get("head_roles", ratio=0.78, examples=4)),
            kv.get("head_roles", ratio=0.78, examples=4) + q4]


def core_presses() -> list:
    """The frontier's reference rows: quantization alone, eviction + int4, eviction alone (ragged)."""
    q4 = kv.get("kv_quant", bits=4)
    return [kv.compose(q4), kv.get("snapkv", ratio=0.5) + q4, kv.get("razor", ratio=0.78) + q4,
            kv.compose(kv.get("razor", ratio=0.78))]


SHARED_WITH_KVPRESS = ("snapkv", "tova", "streaming_llm", "expected_attention")


def kvpress_presses() -> list:
    """attnzoo's versions of the methods kvpress has, at the issue's ratio 0.75 (rectangular, as kvpress
    stores them), and attnzoo's best rows at or below their bytes; `--compare kvpress` adds kvpress's own."""
    q4 = kv.get("kv_quant", bits=4)
    return [kv.get(name, ratio=0.75) for name in SHARED_WITH_KVPRESS] + [
        kv.compose(kv.get("razor", ratio=0.78)), kv.get("razor", ratio=0.78) + q4, kv.compose(q4)]


def kvzip_presses() -> list:
    """KVzip's context-reconstruction scores (query-agnostic by design): eviction alone at <= 0.25 of the bytes, with
    int4 or int8 storage at <= 0.10 and <= 0.05. They re-run the model on the repeated context, so they are not replayed."""
    q4, q8 = kv.get("kv_quant", bits=4), kv.get("kv_quant", bits=8)
    return [kv.compose(kv.get("kvzip", ratio=0.75)), kv.compose(kv.get("kvzip", ratio=0.76)), kv.get("kvzip", ratio=0.4) + q4, kv.get("kvzip", ratio=0.7) + q4,
            kv.get("kvzip", ratio=0.65) + q8, kv.get("kvzip", ratio=0.82) + q8]


PRESS_SETS = {"main": presses, "retrieval": retrieval_presses, "core": core_presses, "kvpress": kvpress_presses,
              "kvzip": kvzip_presses}


def markdown(summary: list[dict]) -> str:
    rows = {}
    for r in summary:
        row = rows.setdefault(r["method"], {})
        row[r["setting"]] = r
    lines = ["| method | agnostic | aware | bytes agnostic | bytes aware | decode ×full (aware) |",
             "|---|---|---|---|---|---|"]
    for method, by in rows.items():
        a, w = by.get("query_agnostic"), by.get("query_aware")
        cell = lambda r: f"{round(r['accuracy'] * r['n'])}/{r['n']}" if r else "–"
        frac = lambda r: f"{r['bytes_fraction']:.3f}" if r else "–"
        dec = f"{w['decode_vs_full']:.2f}" if w and w["decode_vs_full"] else "–"
        lines.append(f"| {method} | {cell(a)} | {cell(w)} | {frac(a)} | {frac(w)} | {dec} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--passkey", type=int, default=10, help="passkey samples (run first)")
    ap.add_argument("--others", type=int, default=2, help="samples of each other task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--presses", choices=sorted(PRESS_SETS), default="main")
    ap.add_argument("--depths", default="", help="only passkey samples at these depths (e.g. 0.5,0.7,0.9)")
    ap.add_argument("--settings", default=",".join(evaluate.SETTINGS))
    ap.add_argument("--only", default="", help="only the set's presses whose label contains one of these (comma-separated)")
    ap.add_argument("--out", type=Path, default=Path("results/kv_frontier"))
    ap.add_argument("--compare", choices=["kvpress"], default=None,
                    help="also run kvpress's versions of the shared methods at 0.75 on the same samples (needs kvpress "
                         "and a transformers it admits: kvpress 0.5.5 pins transformers<5.3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lm, tok = models.load_causal_lm()
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    samples = [tasks.make_sample("passkey", tok, args.length, depths[i % 5], i // 5) for i in range(args.passkey)]
    samples += [tasks.make_sample(t, tok, args.length, [0.3, 0.7][i % 2], i // 2)
                for t in tasks.TASKS if t != "passkey" for i in range(args.others)]
    if args.depths:
        keep = {float(x) for x in args.depths.split(",")}
        samples = [s for s in samples if s.task != "passkey" or s.depth in keep]
    press_list = PRESS_SETS[args.presses]()
    if args.only:
        press_list = [p for p in press_list if any(part in p.label for part in args.only.split(","))]
    compared = {}
    if args.compare == "kvpress":
        from importlib.metadata import version

        import transformers
        from attnzoo.kv.compare import kvpress_presses as theirs

        shared = ("kvzip",) if args.presses == "kvzip" else SHARED_WITH_KVPRESS
        adapters, note = theirs(list(shared), [0.75])
        if not adapters:
            raise SystemExit(f"--compare kvpress: {note}")
        compared = {"kvpress": version("kvpress"), "transformers": transformers.__version__, "note": note}
        press_list += adapters
    settings = tuple(x for x in args.settings.split(",") if x)
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for i, sample in enumerate(samples):
        evaluate.evaluate(lm, tok, press_list, [sample], settings, records=records, share_prefill=True)
        results = {"model": "smollm2", "length": args.length, "presses": [repr(p) for p in press_list],
                   "compare": compared,
                   "samples_done": i + 1, "records": records,
                   "samples": [{"task": s.task, "length": s.length, "depth": s.depth, "seed": s.seed,
                                "answers": list(s.answers)} for s in samples],
                   "summary": evaluate.summarize(records), "wall_s": time.perf_counter() - start}
        (args.out / "results.json").write_text(json.dumps(report.jsonable(results), indent=1))
        print(f"[{i + 1}/{len(samples)}] {sample.task} d={sample.depth} {time.perf_counter() - start:.0f} s",
              flush=True)
    by_task = {}
    for task in dict.fromkeys(s.task for s in samples):
        by_task[task] = markdown(evaluate.summarize([r for r in records if r["task"] == task]))
    table = markdown(evaluate.summarize(records))
    (args.out / "table.md").write_text("all tasks\n\n" + table + "\n\n" + "\n\n".join(
        f"{t}\n\n{m}" for t, m in by_task.items()) + "\n")
    config = {"methods": [p.label for p in press_list], "ratios": sorted({p.ratio for p in press_list}),
              "lengths": [args.length], "tasks": list(dict.fromkeys(s.task for s in samples)),
              "depths": sorted({s.depth for s in samples}), "samples": len(samples), "settings": list(settings)}
    report.write_html({**results, "device": "cpu", "machine": "", "config": config, "methods": [],
                       "interrupted": False}, args.out / "report.html")
    print(table)


if __name__ == "__main__":
    main()
