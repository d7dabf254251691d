"""The two content-sparse methods fitted to a model, on SmolLM2's real q/k (attnzoo.bench.capture, cached):

- MInference's offline pattern search: each head of each layer gets its pattern (A-shape, vertical-slash,
  block-sparse) and budget split at one key budget; the searched layer keeps attention mass against the
  best single pattern for every head, MoBA and the top-k oracle at the same budget.
- SeerAttention's self-distillation: the gate of each layer trained on the first half of the text (KL to the
  block-max-pooled exact attention), scored on the whole text against the same gate untrained, the
  untrained identity gate, MoBA and the top-k oracle at the same share of the blocks.

Mass kept = the exact softmax mass on the selected keys, mean over heads and queries (causal).

    python benchmarks/sparse_learned.py [--length 512] [--density 0.125] [--steps 100] [--out DIR]

Writes sparse_learned.json (and the MInference patterns, minference_patterns.json) and report.html (plotly
plots when installed) to --out.
"""
from __future__ import annotations

import argparse
import html
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
from attnzoo.nn.seer import distill_seer_gate  # noqa: E402
from attnzoo.variants.sparse import minference as mi  # noqa: E402

BLOCK = 16


def kept(q, k, attn, **inputs) -> float:
    with torch.no_grad():
        return float(mi.mass_kept(q, k, attn.selection(q, k, causal=True, **inputs)).mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--layers", default="0,10,19,29")
    p.add_argument("--density", type=float, default=0.125, help="share of the keys (of the blocks for seer)")
    p.add_argument("--steps", type=int, default=100, help="distillation steps per layer")
    p.add_argument("--out", type=Path, default=Path("results/sparse_learned"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    qkv, info = capture.captured_qkv("smollm2", args.length, layers, lambda: models.load_causal_lm())
    budget = max(1, round(args.density * args.length))
    blocks = max(1, round(args.density * args.length / BLOCK))
    args.out.mkdir(parents=True, exist_ok=True)
    search = mi.search_model("smollm2", args.length, budget, layers, args.out / "minference_patterns.json",
                             block_size=BLOCK)
    rows = {"minference": {}, "seer": {}}
    for layer in layers:
        q, k, _ = qkv[layer]
        oracle = kept(q, k, az.get("topk", top_k=budget))
        moba = kept(q, k, az.get("moba", block_size=BLOCK, top_k=blocks))
        found = search["layers"][str(layer)]
        uniform = {c: sum(m) / len(m) for c, m in found["mass"].items()}
        searched = kept(q, k, az.get("minference", **mi.load_patterns(search, layer)))
        rows["minference"][layer] = {"searched": searched, "best_uniform": max(uniform.values()),
                                     "best_uniform_pattern": max(uniform, key=uniform.get), "moba": moba,
                                     "topk_oracle": oracle, "heads": found["heads"]}
        torch.manual_seed(0)
        gate = az.nn.SeerGate(q.shape[1], q.shape[3], block_size=BLOCK, gate_dim=16)
        seer = az.get("seer", block_size=BLOCK, top_k=blocks)
        untrained = kept(q, k, seer, **gate.inputs())
        half = args.length // 2
        history = distill_seer_gate(gate, [(q[:, :, :half], k[:, :, :half])], steps=args.steps)
        rows["seer"][layer] = {"trained": kept(q, k, seer, **gate.inputs()), "untrained": untrained,
                               "identity_gate": kept(q, k, seer), "moba": moba, "topk_oracle": oracle,
                               "loss_first": history["loss"][0], "loss_last": history["loss"][-1],
                               "loss": history["loss"]}
    results = {"model": "smollm2", "length": args.length, "layers": layers, "density": args.density,
               "key_budget": budget, "block_size": BLOCK, "seer_blocks": blocks, "steps": args.steps,
               "capture": info, "seconds": time.perf_counter() - t0, **rows}
    (args.out / "sparse_learned.json").write_text(json.dumps(results, indent=1))
    show(results)
    (args.out / "report.html").write_text(report(results))
    return results


def show(results: dict) -> None:
    console = Console()
    t = Table(title=f"MInference search: mass kept at {results['key_budget']} keys of {results['length']}")
    for c in ("layer", "searched", "best single pattern", "moba", "topk oracle", "patterns (A / VS / BS)"):
        t.add_column(c)
    for layer, r in results["minference"].items():
        count = [sum(h[0] == p for h in r["heads"]) for p in mi.PATTERNS]
        t.add_row(str(layer), f"{r['searched']:.3f}", f"{r['best_uniform']:.3f} ({r['best_uniform_pattern']})",
                  f"{r['moba']:.3f}", f"{r['topk_oracle']:.3f}", " / ".join(map(str, count)))
    console.print(t)
    t = Table(title=f"SeerAttention gate: mass kept at {results['seer_blocks']} blocks of {results['block_size']}")
    for c in ("layer", "trained", "untrained", "identity gate", "moba", "topk oracle", "KL first -> last"):
        t.add_column(c)
    for layer, r in results["seer"].items():
        t.add_row(str(layer), f"{r['trained']:.3f}", f"{r['untrained']:.3f}", f"{r['identity_gate']:.3f}",
                  f"{r['moba']:.3f}", f"{r['topk_oracle']:.3f}", f"{r['loss_first']:.3f} -> {r['loss_last']:.4f}")
    console.print(t)


def report(results: dict) -> str:
    """One self-contained page: the two tables' numbers as grouped bars and the distillation curves (plotly,
    inlined), or the JSON alone without plotly."""
    body = f"<h1>Fitted content-sparse attention on SmolLM2</h1><pre>{html.escape(json.dumps({k: v for k, v in results.items() if k not in ('minference', 'seer')}, indent=1))}</pre>"
    try:
        import plotly.graph_objects as go
        from plotly.offline import get_plotlyjs
    except ImportError:
        return f"<html><body>{body}<p>plots need plotly (pip install 'attnzoo[report]')</p><pre>" \
               f"{html.escape(json.dumps(results, indent=1))}</pre></body></html>"
    figures = []
    for method, keys in (("minference", ("searched", "best_uniform", "moba", "topk_oracle")),
                         ("seer", ("trained", "untrained", "identity_gate", "moba", "topk_oracle"))):
        fig = go.Figure([go.Bar(name=key, x=[f"layer {x}" for x in results[method]],
                                y=[r[key] for r in results[method].values()]) for key in keys])
        fig.update_layout(title=f"{method}: attention mass kept", barmode="group", yaxis_title="mass kept")
        figures.append(fig)
    curves = go.Figure([go.Scatter(y=r["loss"], name=f"layer {x}") for x, r in results["seer"].items()])
    curves.update_layout(title="seer gate distillation", xaxis_title="step", yaxis_title="KL", yaxis_type="log")
    figures.append(curves)
    plots = "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in figures)
    return f"<html><head><script>{get_plotlyjs()}</script></head><body>{body}{plots}</body></html>"


if __name__ == "__main__":
    main()
