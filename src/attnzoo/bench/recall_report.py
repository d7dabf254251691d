"""Outputs of the MQAR sweep (`attnzoo bench --task mqar`): the terminal table, results.json and a
self-contained report.html (plotly inlined): accuracy vs state size per family (log x, one panel per
sequence length, as Zoology's Figure 2 / Based's Figure 1), accuracy vs sequence length, learning
curves, every run, what could not run, and the papers' claims checked on these numbers.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from .report import REPORT_INSTALL, STYLE, html_table, jsonable, palette

PLOTS = {
    "plot-state": "Accuracy vs state size, per family (log x), one panel per sequence length",
    "plot-length": "Accuracy vs sequence length",
    "plot-curves": "Held-out accuracy during training (lowest over the lengths)",
}
FAMILY_SYMBOLS = {"masks": "circle", "scores": "square", "sparse": "diamond", "linear": "triangle-up",
                  "hybrid": "star", "approx": "x"}


# ---- terminal -------------------------------------------------------------------------------------


def table_rows(results: dict) -> list[dict]:
    """One row per run and length: variant, width, knob, state size, accuracy, steps, seconds."""
    out = []
    for r in results["runs"]:
        for x in r["by_length"]:
            out.append({"label": r["label"], "name": r["name"], "family": r["family"], "width": r["width"],
                        "knob": r["knob"], "value": r["value"], "seq_len": x["seq_len"], "num_pairs": x["num_pairs"],
                        "state_elements": x["state_elements"], "accuracy": x["accuracy"], "steps": r["steps"],
                        "seconds": r["seconds"], "early_stop": r["early_stop"]})
    return out


def print_table(results: dict, console) -> None:
    from rich.table import Table

    lengths = results["config"]["lengths"]
    t = Table(title=f"MQAR accuracy (held-out, {results['config']['final_eval_answers']} answers per length) "
                    f"and state size (elements, all layers)")
    for col in ("variant", "family", "width", "state knob"):
        t.add_column(col)
    for s in lengths:
        t.add_column(f"S={s} acc", justify="right")
        t.add_column(f"S={s} state", justify="right")
    t.add_column("steps", justify="right")
    t.add_column("s", justify="right")
    for r in results["runs"]:
        cells = [r["name"], r["family"], str(r["width"]), f"{r['knob']}={r['value']}"]
        for s in lengths:
            x = next((y for y in r["by_length"] if y["seq_len"] == s), None)
            cells += [f"{x['accuracy']:.3f}" if x else "", f"{x['state_elements']:,}" if x else ""]
        cells += [f"{r['steps']}{'*' if r['early_stop'] else ''}", f"{r['seconds']:.0f}"]
        t.add_row(*cells)
    console.print(t)
    if any(r["early_stop"] for r in results["runs"]):
        console.print(f"steps*: stopped early at the {results['config']['train']['target']:.0%} target")
    for s in results["skipped"]:
        console.print(f"[yellow]skipped[/yellow] {s.get('label') or s['name']}: {s['reason']}")
    for line in claim_lines(results):
        console.print(line)


def claim_lines(results: dict) -> list[str]:
    """The claims and their verdicts in plain sentences."""
    c = results["claims"]
    lines = []
    for v in c["verdicts"].values():
        where = ""
        if v["holds_at"] or v["fails_at"]:
            where = f" (holds at S={v['holds_at'] or 'none'}; not at S={v['fails_at'] or 'none'})"
        lines.append(f"{v['verdict'].upper()}: {v['claim']}{where}")
    for e in c["per_length"]:
        parts = [f"S={e['seq_len']}:"]
        for k, name in (("softmax", "softmax"), ("linear", "best pure linear"), ("mix", "best Based mix")):
            if e[k]:
                parts.append(f"{name} {e[k]['label']} {e[k]['accuracy']:.3f} at {e[k]['state_elements']:,} state;")
        if e["gap_closed"] is not None:
            parts.append(f"gap closed {e['gap_closed']:.0%}")
        parts += [f"({n})" for n in e["notes"]]
        lines.append(" ".join(parts))
    return lines


# ---- files ----------------------------------------------------------------------------------------


def write(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = jsonable({**results, "table": table_rows(results)})
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(payload, indent=1, allow_nan=False))
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(results), encoding="utf-8")
    return json_path, html_path


def _plotly_js() -> str | None:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        return None
    return get_plotlyjs()


def render_html(results: dict) -> str:
    js = _plotly_js()
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>attnzoo MQAR recall</title>"
             f"<style>{STYLE}</style>{f'<script>{js}</script>' if js else ''}</head><body>", _summary(results)]
    if js is None:
        parts.append(f"<p class='note'>The plots need plotly: <code>{html.escape(REPORT_INSTALL)}</code>; every "
                     "number is in the tables below and in results.json.</p>")
    else:
        for div_id, build in (("plot-state", state_figure), ("plot-length", length_figure),
                              ("plot-curves", curves_figure)):
            fig = build(results).to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                                         config={"displaylogo": False, "responsive": True})
            parts.append(f"<h2>{html.escape(PLOTS[div_id])}</h2>{fig}")
    parts += [_claims_html(results), _runs_html(results), _skipped_html(results), _methods(results), "</body></html>"]
    return "\n".join(parts)


def _summary(results: dict) -> str:
    meta, cfg = results["meta"], results["config"]
    tasks = ", ".join(f"S={t['seq_len']} with {t['num_pairs']} pairs" for t in cfg["tasks"])
    tr = cfg["train"]
    lines = [
        f"MQAR (Zoology): {tasks}; vocabulary {cfg['vocab_size']}, power_a {cfg['power_a']}, "
        f"{'random' if cfg['random_non_queries'] else 'zero'} filler tokens",
        f"model: embedding, {2} pre-norm blocks (token mixer + MLP x{cfg['mlp_ratio']}), unembedding; width "
        f"{cfg['width']} unless the width is the knob; RoPE in every mixer",
        f"training: AdamW lr {tr['lr']}, weight decay {tr['weight_decay']}, {tr['tokens']} tokens a step (lengths "
        f"in turn), at most {tr['steps']} steps, early stop when every length reaches {tr['target']:.0%}; seed {tr['seed']}",
        f"{meta['cpu_count']} CPUs, {meta['cpu_threads']} torch threads ({html.escape(meta['cpu_threads_reason'])}); "
        f"load average {meta['load_average_start']} at the start, {meta['load_average_end']} at the end; "
        f"torch {meta['torch']}, python {meta['python']}; started {meta['started']}, took "
        f"{results['timings_s']['total']:.0f} s",
    ]
    head = " ".join(html.escape(x) for x in claim_lines(results)[:2])
    return (f"<h1>attnzoo: recall across families (MQAR)</h1><p class='headline'>{head}</p>"
            "<div class='meta'>" + "<br>".join(html.escape(x) if i < 3 else x for i, x in enumerate(lines)) + "</div>")


def _claims_html(results: dict) -> str:
    c = results["claims"]
    verdicts = "".join(f"<li><b>{html.escape(v['verdict'])}</b>: {html.escape(v['claim'])}</li>"
                       for v in c["verdicts"].values())
    rows = []
    def cell(e, k):
        return f"{e[k]['label']}: {e[k]['accuracy']:.3f} at {e[k]['state_elements']:,}" if e[k] else "-"

    for e in c["per_length"]:
        rows.append([e["seq_len"], cell(e, "softmax"), cell(e, "linear"), cell(e, "mix"),
                     "-" if e["gap_closed"] is None else f"{e['gap_closed']:.0%}", "; ".join(e["notes"])])
    th = c["thresholds"]
    note = (f"Reference: the smallest-state <code>full</code> run reaching {th['solved']:.0%} at that length (else the "
            f"best one). Pure linear runs holding at least 1/{th['state_factor']:g} of its state and Based-mix runs "
            f"holding at most {th['state_factor']:g}x it are compared; 'does not solve' is below {th['fails']:.0%}, "
            f"'much of the gap' at least {th['much_of_gap']:.0%} of it.")
    return (f"<h2>The papers' claims on these numbers</h2><ul>{verdicts}</ul>"
            + html_table(["S", "softmax (full)", "best pure linear", "best Based mix", "gap closed", "notes"], rows, 6)
            + f"<p class='note'>{note}</p>")


def _runs_html(results: dict) -> str:
    lengths = results["config"]["lengths"]
    headers = ["run", "family", "layers", "width", "params"] + [f"S={s} acc" for s in lengths] + \
              [f"S={s} state" for s in lengths] + ["steps", "early stop", "seconds", "recurrent form"]
    rows = []
    for r in results["runs"]:
        by = {x["seq_len"]: x for x in r["by_length"]}
        layers = " | ".join(_layer_text(x) for x in r["layers"])
        rows.append([r["label"], r["family"], layers, r["width"], f"{r['parameters']:,}"]
                    + [f"{by[s]['accuracy']:.3f}" if s in by else "" for s in lengths]
                    + [f"{by[s]['state_elements']:,}" if s in by else "" for s in lengths]
                    + [r["steps"], "yes" if r["early_stop"] else "no", f"{r['seconds']:.1f}", r["mode"] or "-"])
    return "<h2>Every run</h2>" + html_table(headers, rows, 3)


def _layer_text(x: dict) -> str:
    """"sliding_window(window=8) 1x64": the variant, its swept parameters, heads x head_dim."""
    params = ", ".join(f"{k}={v}" for k, v in x["params"].items())
    return f"{x['variant']}{f'({params})' if params else ''} {x['heads']}x{x['head_dim']}"


def _skipped_html(results: dict) -> str:
    if not results["skipped"]:
        return "<h2>What could not run</h2><p class='note'>Nothing: every requested variant ran.</p>"
    rows = [[s.get("label") or s["name"], s["family"], s["reason"]] for s in results["skipped"]]
    return "<h2>What could not run</h2>" + html_table(["variant", "family", "reason"], rows, 3)


def _methods(results: dict) -> str:
    return ("<h2>How it was measured</h2><ul class='note'>"
            "<li>Task: key-value pairs, then every key queried once at power-law-placed even offsets; the answer "
            "is the value paired with the key, scored at the query positions only (Zoology's multi-query "
            "associative recall). Batches are drawn fresh every step from a seeded generator; the held-out sets "
            "come from other seeds.</li>"
            "<li>Accuracy: share of the answers predicted exactly (argmax) on a held-out set after training; "
            "the early-stop check uses a smaller held-out set.</li>"
            "<li>State size: what a decoder holds after S tokens, summed over both layers, in elements: 2 x "
            "kv_heads x head_dim per kept key for softmax layers (every key for full and content-sparse "
            "variants, the keys a query may read for windows), the recurrent state for the linear family "
            "(heads x features x (head_dim [+1 for a normaliser])).</li>"
            "<li>One model per configuration is trained on every length in turn; its accuracy is measured at "
            "each length.</li></ul>")


# ---- figures --------------------------------------------------------------------------------------


def _entry_styles(results: dict) -> dict:
    names = list(dict.fromkeys(r["name"] for r in results["runs"]))
    colours = palette()
    return {n: colours[i % len(colours)] for i, n in enumerate(names)}


def state_figure(results: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    lengths = results["config"]["lengths"]
    fig = make_subplots(rows=1, cols=len(lengths), shared_yaxes=True,
                        subplot_titles=[f"S = {s} ({t['num_pairs']} pairs)" for s, t in zip(lengths, results["config"]["tasks"])])
    colour = _entry_styles(results)
    for name in colour:
        runs = sorted((r for r in results["runs"] if r["name"] == name), key=lambda r: r["value"])
        fam = runs[0]["family"]
        for col, s in enumerate(lengths, 1):
            pts = [(r, x) for r in runs for x in r["by_length"] if x["seq_len"] == s]
            fig.add_trace(go.Scatter(
                x=[x["state_elements"] for _, x in pts], y=[x["accuracy"] for _, x in pts], mode="lines+markers",
                name=f"{name} ({fam})", legendgroup=name, showlegend=col == 1,
                line={"color": colour[name], "dash": "dash" if fam == "hybrid" else "solid"},
                marker={"symbol": FAMILY_SYMBOLS.get(fam, "circle"), "size": 9},
                text=[f"{r['label']}<br>accuracy {x['accuracy']:.3f}<br>state {x['state_elements']:,}<br>"
                      f"{r['steps']} steps" for r, x in pts], hoverinfo="text"), row=1, col=col)
        for col in range(1, len(lengths) + 1):
            fig.update_xaxes(type="log", title_text="state size (elements, both layers)", row=1, col=col)
    fig.update_yaxes(title_text="MQAR accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_layout(height=480, margin={"t": 40}, legend={"groupclick": "togglegroup"})
    return fig


def length_figure(results: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    colour = _entry_styles(results)
    dashes = ("solid", "dash", "dot", "dashdot")
    for name in colour:
        runs = sorted((r for r in results["runs"] if r["name"] == name), key=lambda r: r["value"])
        for i, r in enumerate(runs):
            xs = sorted(r["by_length"], key=lambda x: x["seq_len"])
            fig.add_trace(go.Scatter(x=[x["seq_len"] for x in xs], y=[x["accuracy"] for x in xs], mode="lines+markers",
                                     name=r["label"], legendgroup=name,
                                     line={"color": colour[name], "dash": dashes[i % len(dashes)]},
                                     marker={"symbol": FAMILY_SYMBOLS.get(r["family"], "circle")}))
    fig.update_xaxes(type="log", title_text="sequence length", tickvals=results["config"]["lengths"])
    fig.update_yaxes(title_text="MQAR accuracy", range=[0, 1.02])
    fig.update_layout(height=460, margin={"t": 20})
    return fig


def curves_figure(results: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    colour = _entry_styles(results)
    for r in results["runs"]:
        pts = r.get("curve") or []
        fig.add_trace(go.Scatter(x=[p["step"] for p in pts], y=[min(p["accuracy"]) for p in pts], mode="lines",
                                 name=r["label"], legendgroup=r["name"], line={"color": colour[r["name"]]}))
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="held-out accuracy (lowest length)", range=[0, 1.02])
    fig.update_layout(height=420, margin={"t": 20})
    return fig
