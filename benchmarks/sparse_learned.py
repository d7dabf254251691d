"""Content-sparse methods fitted to a model, on SmolLM2's real q/k (attnzoo.bench.capture, cached), against
the block-gated methods and the top-k oracle at the same share of the keys:

- MInference's offline pattern search (`minference`): each head of each layer gets its pattern (A-shape,
  vertical-slash, block-sparse) and budget split at one key budget; the searched layer against the best single
  pattern for every head.
- SeerAttention's self-distillation (`seer`): the gate of each layer trained on the first half of the text (KL to
  the block-max-pooled exact attention), scored on the whole text against the same gate untrained and the
  untrained identity gate (no gate weights).
- `moba`, `quest` (block gates without training) and the `topk` oracle at the same share.

Each method may name its block size (`seer:64`, `moba:128`, `quest:64`; default --block-size). At a density d of
the keys the token methods read round(d * length) keys, the block methods round(d * length / block) blocks (the
query's own block included). Mass kept = the exact softmax mass on the selected keys, mean over heads and
queries (causal); `read` = the share of the causal (query, key) pairs the selection reads (early queries read
all they can see, so this is about 2d - d^2 for a nominal share d).

    python benchmarks/sparse_learned.py [--length 512] [--densities 0.125,0.0625] [--block-size 16]
        [--variants minference,seer,moba,topk] [--steps 100] [--out DIR]

Writes sparse_learned.json (and the MInference patterns, minference_patterns.json, one file per density
minference_patterns_<keys>.json when several) and report.html (plotly plots when installed) to --out.
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
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

import attnzoo as az  # noqa: E402
from attnzoo import models  # noqa: E402
from attnzoo.bench import capture  # noqa: E402
from attnzoo.nn.seer import distill_seer_gate  # noqa: E402
from attnzoo.variants.sparse import minference as mi  # noqa: E402

BLOCK = 16
BLOCK_METHODS = ("minference", "seer", "moba", "quest")
METHODS = (*BLOCK_METHODS, "topk")


def causal_share(sel, s: int) -> float:
    """Share of the causal (query, key) pairs of causal self-attention over s positions that `sel` reads, a tile
    of queries at a time."""
    read = 0
    for a in range(0, s, mi.QUERY_TILE):
        tok = sel.token_indices(slice(a, min(a + mi.QUERY_TILE, s)))
        pos = torch.arange(a, a + tok.shape[2]).view(1, 1, -1, 1)
        read += int(((tok >= 0) & (tok <= pos)).sum())
    return read / (sel.indices.shape[0] * sel.indices.shape[1] * s * (s + 1) / 2)


def parse_variants(text: str, block: int) -> list[tuple[str, int]]:
    """"seer:64,moba,topk" -> [("seer", 64), ("moba", block), ("topk", 1)]."""
    out = []
    for item in text.split(","):
        name, _, size = item.strip().partition(":")
        if name not in METHODS:
            raise ValueError(f"--variants: {name!r} is not one of {', '.join(METHODS)}")
        if name == "topk" and size:
            raise ValueError("--variants: topk reads single keys; it takes no block size")
        out.append((name, int(size) if size else (block if name in BLOCK_METHODS else 1)))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--layers", default="0,10,19,29")
    p.add_argument("--density", "--densities", dest="densities", default="0.125",
                   help="shares of the keys, comma-separated (of the blocks for the block methods)")
    p.add_argument("--block-size", type=int, default=BLOCK, help="block size of the methods not naming their own")
    p.add_argument("--variants", default="minference,seer,moba,topk",
                   help=f"comma-separated, of {', '.join(METHODS)}; a block method may name its block size: seer:64")
    p.add_argument("--steps", type=int, default=100, help="distillation steps per layer")
    p.add_argument("--out", type=Path, default=Path("results/sparse_learned"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    layers = [int(x) for x in args.layers.split(",")]
    densities = [float(x) for x in args.densities.split(",")]
    variants = parse_variants(args.variants, args.block_size)
    t0 = time.perf_counter()
    qkv, info = capture.captured_qkv("smollm2", args.length, layers, lambda: models.load_causal_lm())
    args.out.mkdir(parents=True, exist_ok=True)
    gates, t1 = {}, time.perf_counter()
    for block in sorted({b for name, b in variants if name == "seer"}):   # trained once, scored at every density
        gates[block] = {}
        for layer in layers:
            q, k, _ = qkv[layer]
            torch.manual_seed(0)
            untrained = az.nn.SeerGate(q.shape[1], q.shape[3], block_size=block, gate_dim=16)
            trained = az.nn.SeerGate(q.shape[1], q.shape[3], block_size=block, gate_dim=16)
            trained.load_state_dict(untrained.state_dict())
            half = args.length // 2
            history = distill_seer_gate(trained, [(q[:, :, :half], k[:, :, :half])], steps=args.steps)
            gates[block][layer] = (trained, untrained, history["loss"])
    distill_seconds, t1 = time.perf_counter() - t1, time.perf_counter()
    runs = [new_run(d, args.length, variants) for d in densities]
    searches = {}
    for run in runs:
        for name, block in variants:
            if name == "minference":
                path = args.out / ("minference_patterns" + (f"_{run['key_budget']}" if len(runs) > 1 else "") + ".json")
                searches[run["key_budget"], block] = mi.search_model("smollm2", args.length, run["key_budget"],
                                                                     layers, path, block_size=block)
    for layer in track(layers, description="mass kept"):
        q, k, _ = qkv[layer]
        measure_layer(q, k, layer, runs, variants, gates, searches)
    for run in runs:
        for table in (run["mass"], run["read"]):
            for values in table.values():
                values["mean"] = sum(values[str(x)] for x in layers) / len(layers)
    results = {"model": "smollm2", "length": args.length, "layers": layers, "densities": densities,
               "block_size": args.block_size, "steps": args.steps,
               "variants": [f"{n}:{b}" if n in BLOCK_METHODS else n for n, b in variants],
               "capture": info, "seconds": time.perf_counter() - t0, "distill_seconds": distill_seconds,
               "mass_seconds": time.perf_counter() - t1, "runs": runs,
               "seer_gates": {str(b): {str(layer): {"loss_first": g[2][0], "loss_last": g[2][-1], "loss": g[2]}
                                       for layer, g in by_layer.items()} for b, by_layer in gates.items()}}
    (args.out / "sparse_learned.json").write_text(json.dumps(results, indent=1))
    show(results)
    (args.out / "report.html").write_text(report(results))
    return results


def new_run(density: float, length: int, variants) -> dict:
    """One density's record: {"density", "key_budget", "blocks": {block: count}, "mass": {label: {layer: mass}},
    "read": {label: {layer: share of the causal pairs}}, "minference": {layer: patterns}}."""
    return {"density": density, "key_budget": max(1, round(density * length)),
            "blocks": {str(b): max(1, round(density * length / b)) for n, b in variants if n in BLOCK_METHODS},
            "mass": {}, "read": {}, "minference": {}}


def measure_layer(q, k, layer: int, runs: list[dict], variants, gates, searches) -> None:
    """Every variant's selection at every density on one layer's q, k, their mass kept from one pass of the exact
    softmax (mi.masses_kept), written into the runs."""
    chosen = []   # (run, label, attn, inputs)
    for run in runs:
        budget = run["key_budget"]
        for name, block in variants:
            top = run["blocks"].get(str(block))
            if name == "topk":
                chosen.append((run, "topk oracle", az.get("topk", top_k=budget), {}))
            elif name in ("moba", "quest"):
                size = {"moba": "block_size", "quest": "page"}[name]
                chosen.append((run, f"{name}:{block}", az.get(name, **{size: block, "top_k": top}), {}))
            elif name == "seer":
                seer = az.get("seer", block_size=block, top_k=top)
                trained, untrained, _ = gates[block][layer]
                chosen += [(run, f"seer:{block} trained", seer, trained.inputs()),
                           (run, f"seer:{block} untrained", seer, untrained.inputs()),
                           (run, f"seer:{block} identity gate", seer, {})]
            else:
                found = searches[budget, block]["layers"][str(layer)]
                uniform = {c: sum(m) / len(m) for c, m in found["mass"].items()}
                best = max(uniform, key=uniform.get)
                params = mi.load_patterns(searches[budget, block], layer)
                chosen.append((run, f"minference:{block} searched", az.get("minference", **params), {}))
                run["mass"].setdefault(f"minference:{block} searched", {})   # its row first in the tables
                # the search's own estimate: no selection to count the pairs of
                run["mass"].setdefault(f"minference:{block} best uniform", {})[str(layer)] = uniform[best]
                run["minference"][str(layer)] = {"best_uniform_pattern": best, "heads": found["heads"]}
    with torch.no_grad():
        selections = [attn.selection(q, k, causal=True, **inputs) for _, _, attn, inputs in chosen]
        masses = mi.masses_kept(q, k, selections)
    for (run, label, _, _), sel, mass in zip(chosen, selections, masses):
        run["mass"].setdefault(label, {})[str(layer)] = float(mass.mean())
        run["read"].setdefault(label, {})[str(layer)] = causal_share(sel, q.shape[2])


def show(results: dict) -> None:
    console = Console()
    layers = [str(x) for x in results["layers"]]
    for run in results["runs"]:
        blocks = ", ".join(f"{n} of {b}" for b, n in run["blocks"].items())
        t = Table(title=f"SmolLM2, {results['length']} tokens: mass kept at density {run['density']:g} "
                        f"({run['key_budget']} keys; blocks: {blocks}); read = share of the causal pairs")
        t.add_column("variant", no_wrap=True)
        for c in (*(f"L{x}" for x in layers), "mean", "read"):
            t.add_column(c)
        for label, mass in run["mass"].items():
            read = run["read"].get(label)
            t.add_row(label, *(f"{mass[x]:.3f}" for x in (*layers, "mean")), f"{read['mean']:.3f}" if read else "")
        console.print(t)
        if run["minference"]:
            t = Table(title=f"MInference patterns at {run['key_budget']} keys (heads A / VS / BS)")
            t.add_column("layer"), t.add_column("best single pattern"), t.add_column("patterns (A / VS / BS)")
            for layer, r in run["minference"].items():
                count = [sum(h[0] == p for h in r["heads"]) for p in mi.PATTERNS]
                t.add_row(layer, str(r["best_uniform_pattern"]), " / ".join(map(str, count)))
            console.print(t)
    for block, by_layer in results["seer_gates"].items():
        t = Table(title=f"SeerAttention gate distillation, blocks of {block}: KL first -> last")
        t.add_column("layer"), t.add_column("KL")
        for layer, r in by_layer.items():
            t.add_row(layer, f"{r['loss_first']:.3f} -> {r['loss_last']:.4f}")
        console.print(t)


def report(results: dict) -> str:
    """One self-contained page: mass kept per variant and layer as grouped bars at each density and the
    distillation curves (plotly, inlined), or the JSON alone without plotly."""
    settings = html.escape(json.dumps({k: v for k, v in results.items() if k not in ("runs", "seer_gates")}, indent=1))
    body = f"<h1>Fitted content-sparse attention on SmolLM2</h1><pre>{settings}</pre>"
    try:
        import plotly.graph_objects as go
        from plotly.offline import get_plotlyjs
    except ImportError:
        return f"<html><body>{body}<p>plots need plotly (pip install 'attnzoo[report]')</p><pre>" \
               f"{html.escape(json.dumps(results, indent=1))}</pre></body></html>"
    figures = []
    for run in results["runs"]:
        x = [f"layer {layer}" for layer in results["layers"]] + ["mean"]
        fig = go.Figure([go.Bar(name=label, x=x, y=list(mass.values())) for label, mass in run["mass"].items()])
        fig.update_layout(title=f"attention mass kept at density {run['density']:g} ({results['length']} tokens)",
                          barmode="group", yaxis_title="mass kept")
        figures.append(fig)
    for block, by_layer in results["seer_gates"].items():
        curves = go.Figure([go.Scatter(y=r["loss"], name=f"layer {x}") for x, r in by_layer.items()])
        curves.update_layout(title=f"seer gate distillation (blocks of {block})", xaxis_title="step",
                             yaxis_title="KL", yaxis_type="log")
        figures.append(curves)
    plots = "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in figures)
    return f"<html><head><script>{get_plotlyjs()}</script></head><body>{body}{plots}</body></html>"


if __name__ == "__main__":
    main()
