"""Hedgehog's feature maps fitted to a real model's softmax attention (`python -m attnzoo.lab.hedgehog`).

For each chosen layer of SmolLM2 (default) the post-RoPE q and k of the first `length` tokens of the
standard library's prose (train split), cut into windows of `window` tokens (attention within each
window: a batch of rows whose cost stays window^2), train one `HedgehogFeatureMap` per layer by
attention distillation (`attnzoo.nn.hedgehog.distill`); the held-out split measures, before and after, the
distillation loss and how far the attention output is from softmax's on the layer's real values
(||o - o_softmax|| / ||o_softmax||, causal), next to plain linear attention (elu + 1) as a baseline.
results.json, report.html (loss curves) and the fitted maps (maps_layer<L>.pt) go to `out`.
"""
from __future__ import annotations

import argparse
import html
import time
from pathlib import Path

import torch

from .. import models
from ..bench.capture import captured_qkv
from ..core.api import get
from ..nn.hedgehog import (
    HedgehogFeatureMap,
    distill,
    distillation_loss,
    softmax_weights,
)


def evaluate(maps: HedgehogFeatureMap, q, k, v) -> dict:
    """Distillation loss (its lower bound: the teacher's entropy) and relative output error against causal
    softmax attention on (q, k, v)."""
    with torch.no_grad():
        teacher = softmax_weights(q, k)
        exact = teacher @ v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        o = maps.attention(q, k, v, causal=True)
        return {"distillation_loss": distillation_loss(maps.weights(q, k), teacher).item(),
                "teacher_entropy": distillation_loss(teacher, teacher).item(),   # the loss's lower bound
                "output_error": ((o - exact).norm() / exact.norm()).item()}


def windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(1, H, L, D) -> (L // window, H, window, D): consecutive windows stacked on the batch dimension."""
    n = x.shape[2] // window
    if n < 1:
        raise ValueError(f"window={window} is longer than the {x.shape[2]} captured tokens")
    return x[0, :, :n * window].unflatten(1, (n, window)).transpose(0, 1)


def run(layers=(5, 15), length: int = 256, window: int = 256, eval_length: int = 256, feature_dim: int | None = None,
        steps: int = 100, lr: float = 1e-2, model: str = models.DEFAULT_MODEL, out: str | Path | None = None,
        progress: bool = True) -> dict:
    layers = [int(x) for x in layers]
    torch.manual_seed(0)
    load = (lambda: models.load_causal_lm(model))
    train, _ = captured_qkv(model, length, layers, load, split="train")
    held, _ = captured_qkv(model, eval_length, layers, load, split="heldout")
    results = {"paper": str(HedgehogFeatureMap.paper), "model": model, "length": length, "window": window,
               "eval_length": eval_length,
               "steps": steps, "lr": lr, "layers": []}
    for layer in layers:
        q, k = (windows(x, window) for x in train[layer][:2])
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
        maps = HedgehogFeatureMap(hq, hkv, d, feature_dim)
        before = evaluate(maps, *held[layer])
        t0 = time.perf_counter()
        history = distill(maps, [(q, k)], steps=steps, lr=lr, progress=progress)
        seconds = time.perf_counter() - t0
        after = evaluate(maps, *held[layer])
        hq_, hk_, hv_ = held[layer]
        exact = softmax_weights(hq_, hk_) @ hv_.repeat_interleave(hq // hkv, dim=1)
        linear = get("linear")(hq_, hk_, hv_, causal=True)
        results["layers"].append({
            "layer": layer, "heads": hq, "kv_heads": hkv, "head_dim": d, "feature_dim": maps.feature_dim,
            "untrained": before, "fitted": after, "seconds": seconds, "loss": history["loss"],
            "linear_elu1_output_error": ((linear - exact).norm() / exact.norm()).item()})
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            torch.save(maps.state_dict(), Path(out) / f"maps_layer{layer}.pt")
    if out is not None:
        write(results, Path(out))
    return results


def write(results: dict, out: Path) -> tuple[Path, Path]:
    from .report import line_plot, table
    from .report import write as write_report

    rows = [[r["layer"], f"{r['fitted']['teacher_entropy']:.3f}", f"{r['untrained']['distillation_loss']:.3f}",
             f"{r['fitted']['distillation_loss']:.3f}",
             f"{r['untrained']['output_error']:.3f}", f"{r['fitted']['output_error']:.3f}",
             f"{r['linear_elu1_output_error']:.3f}", f"{r['seconds']:.1f}"] for r in results["layers"]]
    curves = {f"layer {r['layer']}": list(enumerate(r["loss"])) for r in results["layers"]}
    note = (f"<p class='note'>{html.escape(results['paper'])}; {results['model']}, {results['length']} training tokens in "
            f"windows of {results['window']}, "
            f"{results['eval_length']} held-out tokens, {results['steps']} Adam steps at lr {results['lr']}.</p>")
    headers = ["layer", "softmax entropy (loss bound)", "loss untrained", "loss fitted", "output error untrained",
               "output error fitted", "output error linear (elu+1)", "seconds"]
    sections = [note, table(headers, rows),
                "<h2>Distillation loss (train)</h2>", line_plot(curves, "step", "cross-entropy to softmax weights")]
    return write_report(out, results, "Hedgehog feature maps distilled from softmax attention", sections)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m attnzoo.lab.hedgehog", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[5, 15])
    p.add_argument("--length", type=int, default=256, help="training tokens (train split)")
    p.add_argument("--window", type=int, default=256, help="training windows (attention within each)")
    p.add_argument("--eval-length", type=int, default=256, help="held-out tokens")
    p.add_argument("--feature-dim", type=int, default=None, help="F (2F features per head); default head_dim")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--out", default="results/hedgehog")
    a = p.parse_args(argv)
    res = run(a.layers, a.length, a.window, a.eval_length, a.feature_dim, a.steps, a.lr, a.model, a.out)
    for r in res["layers"]:
        print(f"layer {r['layer']}: distillation loss {r['untrained']['distillation_loss']:.3f} -> "
              f"{r['fitted']['distillation_loss']:.3f}; output error vs softmax {r['untrained']['output_error']:.3f} "
              f"-> {r['fitted']['output_error']:.3f} (linear elu+1: {r['linear_elu1_output_error']:.3f}); "
              f"{r['seconds']:.1f} s")
    print(f"wrote {a.out}/results.json, report.html")
    return res


if __name__ == "__main__":
    main()
