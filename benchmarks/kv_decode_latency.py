"""Per-token decode latency and prefill time with a KV press active, as ratios to the uncompressed
model measured in the same run (SmolLM2 on real text).

    python benchmarks/kv_decode_latency.py                                   # CPU, 2048 tokens
    python benchmarks/kv_decode_latency.py --device cuda --lengths 2048,8192 --out $OUT/kvdec.json
    python benchmarks/kv_decode_latency.py --export-shape .gl/smollm2_shape        # then, where the model file is absent:
    python benchmarks/kv_decode_latency.py --device cuda --random-weights .gl/smollm2_shape --lengths 2048,8192

In each round (`--rounds`) the uncompressed model and the method prefill the prompt one after the
other (timed, synchronised on CUDA), then decode `--tokens` greedy tokens in turns, one step each (the
first to step alternating), so a busy machine slows both alike; the decode time is the median per
token. Ratios are taken per round, their median reported.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

import attnzoo.kv as kv
from attnzoo import models
from attnzoo.kv.base import with_cache


def methods() -> dict:
    q4, q2 = kv.get("kv_quant", bits=4), kv.get("kv_quant", bits=2)
    return {
        "snapkv 0.75 (rectangular)": (kv.get("snapkv", ratio=0.75), "rectangular"),
        "snapkv 0.75 (ragged)": (kv.get("snapkv", ratio=0.75), "ragged"),
        "razor 0.75 (ragged)": (kv.get("razor", ratio=0.75), "ragged"),
        "expected_attention 0.5 + int4": (kv.get("expected_attention", ratio=0.5) + q4, None),
        "snapkv 0.65 + int2": (kv.get("snapkv", ratio=0.65) + q2, None),
        "kv_quant int4 (KIVI layer)": (kv.get("kv_quant", bits=4), None),
        "kvzip 0.76 (ragged)": (kv.get("kvzip", ratio=0.76), "ragged"),
        "kvzip 0.7 + int4": (kv.get("kvzip", ratio=0.7) + q4, None),
    }


def _clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def run_round(model, tok, ids, tokens: int, press, layout) -> tuple[float, float, float, float]:
    """(uncompressed prefill s, press prefill s, uncompressed and press median decode s per token)."""
    DynamicCache = __import__("transformers").DynamicCache
    device = ids.device
    sessions = [contextlib.nullcontext(), press(model, tok, layout=layout)]
    caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
    tokens_in, steps = [ids, ids], [[], []]

    def step(which: int) -> float:
        with sessions[which]:  # the press's hooks are on the model only for its own forwards
            start = _clock(device)
            out = model(input_ids=tokens_in[which], **with_cache(model, caches[which]), logits_to_keep=1)
            took = _clock(device) - start
        tokens_in[which] = out.logits[:, -1:].argmax(-1)
        return took

    prefill = [step(0), step(1)]
    for i in range(tokens):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            steps[which].append(step(which))
    return prefill[0], prefill[1], statistics.median(steps[0]), statistics.median(steps[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--tokens", type=int, default=16, help="decoded tokens per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the model's dtype (auto: bfloat16 on CUDA, as models are served there; float32 on CPU)")
    ap.add_argument("--methods", default="", help="comma-separated substrings of the method names to run (default all)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file")
    ap.add_argument("--export-shape", type=Path, default=None, metavar="DIR",
                    help="write SmolLM2's config and tokenizer (3.4 MB) to DIR and exit")
    ap.add_argument("--random-weights", type=Path, default=None, metavar="DIR",
                    help="time a model of the exact configuration in DIR (from --export-shape) with random weights, "
                         "for a machine without the 98 MB model file: per-token latency does not depend on the weights "
                         "(the prompts stay real text; nothing about answers is measured)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.export_shape is not None:
        model, tok = models.load_causal_lm()
        model.config.save_pretrained(args.export_shape)
        tok.save_pretrained(args.export_shape)
        return
    if args.random_weights is not None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_weights),
                                                 dtype=torch.float32, attn_implementation="sdpa").eval()
        tok = AutoTokenizer.from_pretrained(args.random_weights)
    else:
        model, tok = models.load_causal_lm()
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.to(device=device, dtype=dtype)
    lengths = [int(x) for x in args.lengths.split(",")]
    wanted = [w.strip() for w in args.methods.split(",") if w.strip()]
    table = {k: v for k, v in methods().items() if not wanted or any(w in k for w in wanted)}
    results = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
               "weights": "random, SmolLM2's configuration" if args.random_weights is not None else "SmolLM2-135M-Instruct",
               "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "threads": args.threads,
               "tokens": args.tokens, "rounds": args.rounds, "rows": []}
    for length in lengths:
        ids = models.real_token_ids(tok, length, "heldout").to(device)
        for name, (press, layout) in table.items():
            run_round(model, tok, ids[:, :256], 2, press, layout)  # warm-up; profiling presses profile here, untimed
            pre, dec, base_pre, base_dec = [], [], [], []
            for _ in range(args.rounds):
                bp, p, bd, d = run_round(model, tok, ids, args.tokens, press, layout)
                base_pre.append(bp), base_dec.append(bd), pre.append(p / bp), dec.append(d / bd)
            row = {"length": length, "method": name, "prefill_vs_full": statistics.median(pre),
                   "decode_vs_full": statistics.median(dec), "full_prefill_s": statistics.median(base_pre),
                   "full_decode_ms": 1e3 * statistics.median(base_dec), "prefill_ratios": pre, "decode_ratios": dec}
            results["rows"].append(row)
            print(f"{length:>6} {name:<34} prefill x{row['prefill_vs_full']:.2f}  decode x{row['decode_vs_full']:.2f}"
                  f" (rounds: {' '.join(f'{r:.2f}' for r in dec)})"
                  f"  (uncompressed: prefill {row['full_prefill_s']:.2f} s, decode {row['full_decode_ms']:.1f} ms/token)",
                  flush=True)
            if args.out is not None:  # after every row: an interrupted run keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
