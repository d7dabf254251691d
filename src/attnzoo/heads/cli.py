"""`attnzoo heads`: run the head probes on a causal LM (and the encoder probes on an encoder), write
results.json and a self-contained report.html."""
from __future__ import annotations

import os
import time

import torch
import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _split(names: str | None) -> list[str] | None:
    return [n.strip() for n in names.split(",") if n.strip()] if names else None


def _label(spec: str) -> str:
    """How reports name a model: the embedded ones by name, others by folder."""
    from pathlib import Path

    return {"smollm2": "SmolLM2-135M-Instruct", "minilm": "all-MiniLM-L6-v2"}.get(spec, Path(spec).name)


def _threads(asked: int) -> tuple[int, str]:
    """(CPU threads, why). On a CPU other processes already keep busy, several OpenMP threads spin
    waiting for each other: one thread then runs several times faster."""
    if asked:
        return asked, "--threads"
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cpus and torch.get_num_threads() > 1:
        return 1, f"1-minute load average {load:.1f} on {cpus} CPUs: one thread avoids oversubscription"
    return torch.get_num_threads(), "torch's default"


def _load_encoder(spec: str):
    from .. import models

    if spec == "minilm":
        return models.load_encoder()
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(spec).eval(), AutoTokenizer.from_pretrained(spec)


def heads_cmd(
    model: str = typer.Option("smollm2", help="causal LM: 'smollm2' (embedded) or a local Hugging Face folder"),
    probes: str = typer.Option(None, help="comma-separated probes for the causal LM (default: all that fit minutes)"),
    encoder: str = typer.Option("minilm", help="encoder for the encoder probes: 'minilm', a local folder, or 'none'"),
    encoder_probes: str = typer.Option(None, help="comma-separated probes for the encoder"),
    out: str = typer.Option("results/heads", help="output folder for results.json and report.html"),
    passkey_tokens: int = typer.Option(384, help="haystack tokens of the passkey questions"),
    examples: int = typer.Option(8, help="passkey questions to score heads, and held-out ones to evaluate"),
    text_tokens: int = typer.Option(256, help="tokens per real-prose segment"),
    draws: int = typer.Option(3, help="random head sets ablated next to the top heads"),
    ablation: str = typer.Option("zero", help="how heads are ablated: zero | mean"),
    validate: bool = typer.Option(True, help="run the ablation validations"),
    ablation_sweep: bool = typer.Option(False, help="also ablate every head alone (slow: one pass per head)"),
    seed: int = typer.Option(0, help="seed for question keys and random head draws"),
    threads: int = typer.Option(0, help="CPU threads; 0: torch's default, or 1 when the machine is already busy"),
    list_probes: bool = typer.Option(False, "--list", help="list the probes and exit"),
):
    """Find what the attention heads of a model do: retrieval, sink, induction ... heads, checked by ablation."""
    from .probes import describe, get_probe
    from .session import Settings

    if list_probes:
        t = Table(title="attnzoo heads: probes")
        for col in ("name", "models", "paper", "what it measures"):
            t.add_column(col, overflow="fold")
        for d in describe():
            t.add_row(d["name"], d["models"], d["paper"], d["about"])
        console.print(t)
        return
    if threads < 0:
        raise typer.BadParameter(f"expected 0 (auto) or a positive count; got {threads}", param_hint="--threads")
    if ablation not in ("zero", "mean"):
        raise typer.BadParameter(f"--ablation must be zero or mean, got {ablation!r}")
    settings = Settings(passkey_tokens=passkey_tokens, passkey_examples=examples, eval_examples=examples,
                        text_tokens=text_tokens, random_draws=draws, ablation=ablation, validate=validate,
                        ablation_sweep=ablation_sweep, seed=seed)
    for name in (_split(probes) or []) + (_split(encoder_probes) or []):
        try:
            get_probe(name)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    n_threads, why = _threads(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    console.print(f"{n_threads} CPU thread(s): {why}")
    try:
        _run(model, _split(probes), encoder, _split(encoder_probes), out, settings, f"{n_threads} ({why})")
    finally:
        torch.set_num_threads(previous)


def _run(model: str, probes, encoder: str, encoder_probes, out: str, settings, threads: str) -> None:
    """Load the models, run their probes, print the summaries, write the report."""
    from .. import models
    from . import analysis, report
    from .views import head_views

    start = time.perf_counter()
    runs = []
    with console.status(f"loading {model}"):
        lm, tok = models.load_causal_lm(model)
    runs.append((lm, tok, probes, _label(model)))
    if encoder != "none":
        try:
            with console.status(f"loading {encoder}"):
                runs.append((*_load_encoder(encoder), encoder_probes, _label(encoder)))
        except models.ModelNotInstalled as e:
            console.print(f"[yellow]skipping the encoder probes: {e}[/yellow]")
    analyses, views = [], []
    for m, t, names, label in runs:
        console.print(f"[bold]{label}[/bold]")
        try:
            a = analysis.analyze(m, t, names, settings, label=label)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        analyses.append(a)
        views.append(head_views(a.session, a.results))
        _print_summary(a)
    wall = time.perf_counter() - start
    js, page = report.write(out, analyses, views, wall_seconds=round(wall, 1), cpu_threads=threads)
    console.print(f"wrote {js} and {page} in {wall:.0f} s")


def _print_summary(a) -> None:
    t = Table(title=f"{a.session.layers} layers x {a.session.heads} heads", show_lines=False)
    t.add_column("probe")
    t.add_column("top heads (layer, head, score)", overflow="fold")
    t.add_column("headline", overflow="fold")
    for name, r in a.results.items():
        top = next((v for k, v in r.summary.items() if k.startswith("top_")), [])
        top_text = ", ".join(f"L{l}H{h} {v:.2f}" for l, h, v in top[:4]) if top and isinstance(top[0], list) else ""
        t.add_row(name, top_text, _headline(name, r.summary))
    console.print(t)


def _headline(name: str, s: dict) -> str:
    if name == "retrieval":
        text = f"{s['retrieval_heads']} retrieval heads ({100 * s['share_of_heads']:.1f}%) > {s['threshold']}"
        v = s.get("validation")
        if v:
            rand = ", ".join(f"{r['exact']:.2f}" for r in v["accuracy_random_ablated"])
            text += (f"; passkey acc {v['accuracy_intact']['exact']:.2f} -> top-{v['heads_ablated']} ablated "
                     f"{v['accuracy_top_ablated']['exact']:.2f} vs random {rand}")
        return text
    if name == "induction" and "validation" in s:
        v = s["validation"]
        rand = ", ".join(f"{x:.2f}" for x in v["loss_random_ablated"])
        return f"repeat loss {v['loss_intact']:.2f} -> top ablated {v['loss_top_ablated']:.2f} vs random {rand}"
    if name == "sink":
        return (f"first-token mass {s['mean_first_token_mass']:.2f}; {s['heads_over_half_on_first_token']} heads > 0.5; "
                f"hidden-sink mass {s['mean_hidden_sink_mass']:.3f}")
    if name == "massive_activations":
        b = s["largest"]
        return f"{b['value']:.0f} at layer {b['layer']}, token {b['position']} {b['token']!r}, dim {b['dim']}"
    if name == "decore":
        return ", ".join(f"{k} {v:.2f}" for k, v in s["accuracy"].items())
    return ", ".join(f"{k} {v}" for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool))[:120]


def register(app: typer.Typer) -> None:
    app.command("heads")(heads_cmd)
