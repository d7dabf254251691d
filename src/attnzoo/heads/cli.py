"""What `attnzoo heads` does once its options are checked: load the models, run their probes, print
the summaries, write results.json and a self-contained report.html. The options themselves live in
`attnzoo.cli` (with `attnzoo.cli_options`), which imports neither torch nor this package."""
from __future__ import annotations

import time

import torch
import typer
from rich.table import Table

from .. import cli_options as opts

console = opts.console


def _split(names: str | None) -> list[str] | None:
    return [n.strip() for n in names.split(",") if n.strip()] if names else None


def print_probes() -> None:
    from .probes import describe

    t = Table(title="attnzoo heads: probes")
    for col in ("name", "models", "paper", "what it measures"):
        t.add_column(col, overflow="fold")
    for d in describe():
        t.add_row(d["name"], d["models"], d["paper"], d["about"])
    console.print(t)


def run(model: str, probes: str | None, encoder: str, encoder_probes: str | None, out, settings: dict,
        threads: int) -> None:
    """`probes`, `encoder_probes`: the comma-separated option texts; `settings`: Settings fields."""
    from .probes import get_probe
    from .session import Settings

    for option, names in (("--probes", probes), ("--encoder-probes", encoder_probes)):
        for name in _split(names) or []:
            try:
                get_probe(name)
            except ValueError as e:
                raise typer.BadParameter(str(e), param_hint=option) from None
    n_threads, why = opts.resolve_threads(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    console.print(f"{n_threads} CPU thread(s): {why}")
    try:
        _run(model, _split(probes), encoder, _split(encoder_probes), str(out), Settings(**settings),
             f"{n_threads} ({why})")
    finally:
        torch.set_num_threads(previous)


def _run(model: str, probes, encoder: str, encoder_probes, out: str, settings, threads: str) -> None:
    """Load the models, run their probes, print the summaries, write the report."""
    from .. import models
    from . import analysis, report
    from .views import head_views

    start = time.perf_counter()
    runs = []
    lm, tok = opts.load_causal_lm(model)
    _check_context(lm, settings)
    runs.append((lm, tok, probes, models.label(model)))
    if encoder != "none":
        try:
            runs.append((*opts.load_encoder(encoder), encoder_probes, models.label(encoder)))
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


def _check_context(lm, settings) -> None:
    """The longest inputs (twice --passkey-tokens, for DeCoRe and the positional bias) must fit the model."""
    context = getattr(lm.config, "max_position_embeddings", None)
    longest = 2 * settings.passkey_tokens + 256  # DeCoRe's four needles, the question and the chat frame
    if context and longest > context:
        raise typer.BadParameter(f"{settings.passkey_tokens} makes inputs of ~{longest} tokens, beyond the model's "
                                 f"context of {context}; at most {(context - 256) // 2}", param_hint="--passkey-tokens")
    if context and settings.text_tokens > context:
        raise typer.BadParameter(f"{settings.text_tokens} exceeds the model's context of {context}",
                                 param_hint="--text-tokens")


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

