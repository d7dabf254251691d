"""The most attention mass any content-sparse selection can keep at a share of the causal pairs, on SmolLM2's real
q/k (attnzoo.bench.capture, cached): an oracle bound, per layer, for three granularities of selection:

- `keys`: each query picks single keys (the top-k / top-p oracle: token-level methods);
- `query x block64`: each query picks blocks of 64 keys (MoBA, Quest: per-query block methods);
- `qblock64 x block64`, `qblock128 x block128`: each block of queries picks blocks of keys (SeerAttention; what
  the block-sparse kernels compute without a union).

For a layer, every unit (a key, or a key block for a query or a query block) of every head has its exact softmax
mass (causal) and its number of causal (query, key) pairs. The oracle takes units by mass per pair, highest first,
across all heads and queries of the layer, until it has read the given share of the layer's causal pairs; what it
holds, divided by the number of (head, query) rows, is the most mean mass per query any selection at that
granularity and share can keep (a per-row budget, a fixed top_k or the query's own block only lower it). Units are
binned by log2(mass per pair) in steps of 1/32 (weights: mass and pairs), so a selection never needs an S x S
sort; within the bin where the budget ends, mass is taken in proportion to pairs.

    python benchmarks/sparse_mass_bound.py [--length 8192] [--layers 0,10,19,29] [--out DIR]

Prints, per layer and granularity, the mass kept at 1/4, 1/8, 1/16 of the causal pairs and the share needed for
0.9, 0.95, 0.98, 0.99 of the mass, their mean over the layers, and the same for one budget shared by all the
layers (`shared`: a selection may read more in one layer and less in another; mass is then the mean over all
layers' rows); writes sparse_mass_bound.json and report.html (plotly: mass vs share).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from attnzoo import models  # noqa: E402
from attnzoo.bench import capture  # noqa: E402

GRANULARITIES = ("keys", "query x block64", "qblock64 x block64", "qblock128 x block128")
SHARES = (1 / 4, 1 / 8, 1 / 16)
MASSES = (0.9, 0.95, 0.98, 0.99)
BINS_PER_OCTAVE = 32
LOWEST = -80  # log2 of the smallest mass per pair binned apart (smaller ones share the lowest bin)
QUERY_CHUNK = 256


class Histogram:
    """Mass and causal pairs of units binned by log2(mass per pair)."""

    def __init__(self):
        n = -LOWEST * BINS_PER_OCTAVE + 1
        self.mass = torch.zeros(n, dtype=torch.float64)
        self.pairs = torch.zeros(n, dtype=torch.float64)

    def add(self, mass: torch.Tensor, pairs: torch.Tensor) -> None:
        keep = pairs > 0
        mass, pairs = mass[keep].double(), pairs[keep].double()
        density = (mass / pairs).clamp(min=2.0 ** LOWEST, max=1.0)
        index = ((density.log2() - LOWEST) * BINS_PER_OCTAVE).long().clamp(0, self.mass.numel() - 1)
        self.mass.index_add_(0, index, mass)
        self.pairs.index_add_(0, index, pairs)

    def frontier(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(share of the pairs, mean mass per row) after each bin, densest bins first, from (0, 0)."""
        mass, pairs = self.mass.flip(0).cumsum(0), self.pairs.flip(0).cumsum(0)
        zero = torch.zeros(1, dtype=torch.float64)
        return torch.cat([zero, pairs / pairs[-1]]), torch.cat([zero, mass / rows])


def mass_at(share: torch.Tensor, mass: torch.Tensor, x: float) -> float:
    """Mass kept at share x of the pairs (linear inside the bin where the budget ends)."""
    i = int(torch.searchsorted(share, torch.tensor(x, dtype=torch.float64)).clamp(1, share.numel() - 1))
    a, b = float(share[i - 1]), float(share[i])
    t = 0.0 if b == a else (x - a) / (b - a)
    return float(mass[i - 1] + t * (mass[i] - mass[i - 1]))


def share_for(share: torch.Tensor, mass: torch.Tensor, p: float) -> float | None:
    """Smallest share of the pairs that keeps mass p (None where even every pair keeps less)."""
    if float(mass[-1]) < p:
        return None
    i = int(torch.searchsorted(mass, torch.tensor(p, dtype=torch.float64)).clamp(1, mass.numel() - 1))
    a, b = float(mass[i - 1]), float(mass[i])
    t = 0.0 if b == a else (p - a) / (b - a)
    return float(share[i - 1] + t * (share[i] - share[i - 1]))


def layer_histograms(q: torch.Tensor, k: torch.Tensor) -> dict[str, Histogram]:
    """Exact causal softmax of one layer, a chunk of queries at a time, binned at every granularity."""
    b, h, s, d = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)[0].float()
    q = q[0].float()
    out = {g: Histogram() for g in GRANULARITIES}
    nb64 = -(-s // 64)
    block_sums = {64: torch.zeros(h, -(-s // 64), -(-s // 64), dtype=torch.float64),
                  128: torch.zeros(h, -(-s // 128), -(-s // 128), dtype=torch.float64)}
    keys = torch.arange(s)
    for a in range(0, s, QUERY_CHUNK):
        pos = torch.arange(a, min(a + QUERY_CHUNK, s))
        causal = keys.view(1, -1) <= pos.view(-1, 1)
        p = ((q[:, pos] @ k.transpose(1, 2)) * d ** -0.5).masked_fill(~causal, -math.inf).softmax(-1)
        out["keys"].add(p.flatten(), causal.expand_as(p).flatten().float())
        padded = torch.nn.functional.pad(p, (0, nb64 * 64 - s)).view(h, len(pos), nb64, 64).sum(-1)
        visible = torch.nn.functional.pad(causal.float(), (0, nb64 * 64 - s)).view(len(pos), nb64, 64).sum(-1)
        out["query x block64"].add(padded.flatten(), visible.expand_as(padded).flatten())
        for block, sums in block_sums.items():
            per_key_block = padded if block == 64 else torch.nn.functional.pad(
                padded, (0, (-nb64) % 2)).view(h, len(pos), -1, 2).sum(-1)
            sums.index_add_(1, pos // block, per_key_block.double())
    for block, sums in block_sums.items():
        n = sums.shape[1]
        first = torch.arange(n) * block
        qb = torch.minimum(first + block, torch.tensor(s)) - first              # queries per block
        kb = qb                                                                 # keys per block (same grid)
        # causal pairs of (query block i, key block j): all below the diagonal, a triangle on it, none above
        pairs = (qb.view(-1, 1) * kb.view(1, -1)).double().tril(-1) + torch.diag(qb * (qb + 1) / 2).double()
        out[f"qblock{block} x block{block}"].add(sums.flatten(), pairs.expand_as(sums).flatten())
    return out


def measure(q: torch.Tensor, k: torch.Tensor) -> dict:
    return summarize(layer_histograms(q, k), q.shape[1] * q.shape[2])


def pooled(histograms: list[dict[str, Histogram]]) -> dict[str, Histogram]:
    """The layers' histograms added up: one budget shared by all of them (a selection may move it between
    layers)."""
    out = {g: Histogram() for g in GRANULARITIES}
    for by_gran in histograms:
        for g, hist in by_gran.items():
            out[g].mass += hist.mass
            out[g].pairs += hist.pairs
    return out


def summarize(histograms: dict[str, Histogram], rows: int) -> dict:
    result = {}
    for name, hist in histograms.items():
        share, mass = hist.frontier(rows)
        grid = torch.linspace(0, 1, 129, dtype=torch.float64)
        result[name] = {
            "mass_at_share": {f"{x:g}": mass_at(share, mass, x) for x in SHARES},
            "share_for_mass": {f"{p:g}": share_for(share, mass, p) for p in MASSES},
            "curve": {"share": grid.tolist(), "mass": [mass_at(share, mass, float(x)) for x in grid]},
        }
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--layers", default="0,10,19,29")
    p.add_argument("--out", type=Path, default=Path("results/sparse_mass_bound"))
    args = p.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    qkv, info = capture.captured_qkv("smollm2", args.length, layers, lambda: models.load_causal_lm())
    histograms = [layer_histograms(qkv[layer][0], qkv[layer][1]) for layer in track(layers, description="oracle")]
    rows = qkv[layers[0]][0].shape[1] * args.length
    per_layer = {str(layer): summarize(h, rows) for layer, h in zip(layers, histograms)}
    mean = {g: {kind: {x: _mean([per_layer[str(layer)][g][kind][x] for layer in layers])
                       for x in per_layer[str(layers[0])][g][kind]}
                for kind in ("mass_at_share", "share_for_mass")} for g in GRANULARITIES}
    results = {"model": "smollm2", "length": args.length, "layers": layers, "capture": info,
               "granularities": list(GRANULARITIES), "per_layer": per_layer, "mean_of_layers": mean,
               "shared_budget": summarize(pooled(histograms), rows * len(layers)),
               "seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparse_mass_bound.json").write_text(json.dumps(results, indent=1))
    (args.out / "report.html").write_text(report(results))
    show(results)
    return results


def _mean(values):
    return None if any(v is None for v in values) else sum(values) / len(values)


def show(results: dict) -> None:
    table = Table(title=f"oracle bound, SmolLM2, {results['length']} tokens: mass kept at a share of the causal "
                        "pairs / share needed for a mass")
    for col in ("layer", "granularity", *(f"mass @ {x:g}" for x in SHARES), *(f"share for {p:g}" for p in MASSES)):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for layer, by_gran in [*results["per_layer"].items(), ("mean", results["mean_of_layers"]),
                           ("shared", results["shared_budget"])]:
        for g in GRANULARITIES:
            r = by_gran[g]
            table.add_row(layer, g, *(fmt(v) for v in r["mass_at_share"].values()),
                          *(fmt(v) for v in r["share_for_mass"].values()))
    Console(width=200).print(table)


def report(results: dict) -> str:
    """One self-contained page: mass kept vs share of the causal pairs, one plot per layer (plotly, inlined), or
    the JSON alone without plotly."""
    settings = html.escape(json.dumps({k: v for k, v in results.items() if k not in ("per_layer", "shared_budget")},
                                      indent=1))
    body = f"<h1>Oracle bound of content-sparse attention on SmolLM2</h1><pre>{settings}</pre>"
    try:
        import plotly.graph_objects as go
        from plotly.offline import get_plotlyjs
    except ImportError:
        return f"<html><body>{body}<p>plots need plotly (pip install 'attnzoo[report]')</p></body></html>"
    figures = []
    for layer, by_gran in [*results["per_layer"].items(), ("shared budget", results["shared_budget"])]:
        fig = go.Figure([go.Scatter(x=r["curve"]["share"], y=r["curve"]["mass"], name=g) for g, r in by_gran.items()])
        fig.add_hline(y=0.99, line_dash="dot")
        fig.add_vline(x=1 / 8, line_dash="dot")
        fig.update_layout(title=f"{'layer ' if layer.isdigit() else ''}{layer}: most mass any selection keeps ({results['length']} tokens)",
                          xaxis_title="share of the causal (query, key) pairs read", yaxis_title="mean mass kept",
                          xaxis_type="log")
        figures.append(fig)
    plots = "".join(f.to_html(full_html=False, include_plotlyjs=False) for f in figures)
    return f"<html><head><script>{get_plotlyjs()}</script></head><body>{body}{plots}</body></html>"


if __name__ == "__main__":
    main()
