"""Outputs of `attnzoo kv`: the terminal table, results.json and a self-contained report.html
(plotly's JavaScript inlined, so it renders offline; without plotly the tables are still there)."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..bench.report import jsonable
from .evaluate import BASELINE, SETTINGS, accuracy_by

REPORT_INSTALL = 'pip install "attnzoo[report]"'
SHORT = {"query_agnostic": "agnostic", "query_aware": "aware"}


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return spec.format(value)


def table_rows(summary: list[dict]) -> list[dict]:
    """One row per (method, ratio): both settings' accuracy side by side, cost from the query-aware runs."""
    rows = {}
    for r in summary:
        row = rows.setdefault((r["method"], r["ratio"]),
                              {"method": r["method"], "kind": r["kind"], "ratio": r["ratio"]})
        row[f"acc_{SHORT[r['setting']]}"] = r["accuracy"]
        row[f"n_{SHORT[r['setting']]}"] = r["n"]
        if r["setting"] == "query_aware" or "bytes" not in row:
            row.update({k: r[k] for k in ("bytes", "bytes_fraction", "removed", "read_fraction", "prefill_s",
                                          "prefill_vs_full", "decode_ms", "decode_vs_full")})
    return list(rows.values())


COLUMNS = (
    ("method", "method", "{}"), ("kind", "kind", "{}"), ("ratio", "ratio", "{:.2f}"),
    ("acc_agnostic", "acc agnostic", "{:.0%}"), ("acc_aware", "acc aware", "{:.0%}"),
    ("n_agnostic", "n agnostic", "{}"), ("n_aware", "n aware", "{}"),
    ("removed", "removed (measured)", "{:.2f}"), ("read_fraction", "read", "{:.2f}"),
    ("bytes", "KV MiB", "{:.2f}"), ("bytes_fraction", "KV ×full", "{:.2f}"),
    ("prefill_s", "prefill s", "{:.2f}"), ("prefill_vs_full", "prefill ×full", "{:.2f}"),
    ("decode_ms", "decode ms/tok", "{:.1f}"), ("decode_vs_full", "decode ×full", "{:.2f}"),
)


def _cell(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    if key == "bytes" and value is not None:
        value = value / 2 ** 20
    return _fmt(value, spec)


TERMINAL_COLUMNS = (
    ("method", "method", "{}"), ("ratio", "ratio", "{:.2f}"), ("acc_agnostic", "agn.", "{:.0%}"),
    ("acc_aware", "aware", "{:.0%}"), ("removed", "rm", "{:.2f}"), ("read_fraction", "read", "{:.2f}"),
    ("bytes_fraction", "KV ×", "{:.2f}"), ("prefill_vs_full", "pre ×", "{:.2f}"),
    ("decode_vs_full", "dec ×", "{:.2f}"),
)


def print_table(results: dict, console) -> None:
    """The accuracy/cost table, narrow enough for an 80-column terminal (the absolute numbers of the
    uncompressed model go in the caption; report.html has every column)."""
    from rich.table import Table

    cfg = results["config"]
    rows = table_rows(results["summary"])
    full = next((r for r in rows if r["method"] == BASELINE), {})
    caption = (f"uncompressed: KV {_cell(full, 'bytes', '{:.2f}')} MiB, prefill {_cell(full, 'prefill_s', '{:.2f}')} s, "
               f"decode {_cell(full, 'decode_ms', '{:.1f}')} ms/token. agn./aware: accuracy query-agnostic/aware; ratio: "
               "fraction of KV entries asked removed, rm: measured; read: fraction read per decoding step; KV, pre(fill), "
               "dec(ode) ×: vs uncompressed, from the query-aware runs")
    t = Table(title=f"attnzoo kv: {results['model']}, {len(results['samples'])} samples ({', '.join(cfg['tasks'])}; "
                    f"lengths {cfg['lengths']}; depths {cfg['depths']})", caption=caption)
    for key, title, spec in TERMINAL_COLUMNS:
        t.add_column(title, justify="left" if spec == "{}" else "right", no_wrap=key == "method")
    for row in rows:
        t.add_row(*(_cell(row, key, spec) for key, _, spec in TERMINAL_COLUMNS))
    console.print(t)


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(jsonable(results), indent=1))


# ---- report.html -----------------------------------------------------------------------------------


def _figures(results: dict) -> list[tuple[str, str, object]]:
    """(id, title, plotly figure) of every plot."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    summary = results["summary"]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in summary)]
    methods = list(dict.fromkeys(r["method"] for r in summary if r["method"] != BASELINE))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    figs = []

    def base_acc(setting):
        return next((r["accuracy"] for r in summary if r["method"] == BASELINE and r["setting"] == setting), None)

    for key, x_key, x_title, title in (
        ("plot-acc-ratio", "ratio", "ratio (fraction of KV entries removed; read-sparse: left unread)",
         "Accuracy vs ratio"),
        ("plot-acc-bytes", "bytes_fraction", "KV-cache bytes held, as a fraction of the uncompressed cache (measured)",
         "Accuracy vs KV-cache bytes held"),
    ):
        fig = make_subplots(rows=1, cols=len(settings), subplot_titles=[s.replace("_", "-") for s in settings],
                            shared_yaxes=True)
        for col, setting in enumerate(settings, start=1):
            for m in methods:
                pts = sorted((r[x_key], r["accuracy"]) for r in summary if r["method"] == m and r["setting"] == setting)
                if x_key == "ratio" and all(r["kind"] == "quantize" for r in summary if r["method"] == m):
                    continue  # quantization removes no entries: it appears on the bytes plot
                fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                         name=m, legendgroup=m, showlegend=col == 1, line={"color": color[m]},
                                         hovertemplate=f"{m}<br>%{{x:.2f}}: %{{y:.0%}}<extra></extra>"),
                              row=1, col=col)
            acc = base_acc(setting)
            if acc is not None:
                fig.add_hline(y=acc, line_dash="dash", line_color="black", row=1, col=col,
                              annotation_text=f"uncompressed {acc:.0%}", annotation_position="bottom left")
            fig.update_xaxes(title_text=x_title if col == 1 else None, row=1, col=col)
        # Both x quantities are shares of the cache: a fixed [0, 1] axis (wider if some method holds more
        # bytes than the uncompressed cache), padded so markers at the ends are not cut, and the same
        # scale in every setting's panel (one ratio alone would otherwise get an arbitrary span).
        xs = [r[x_key] for r in summary if r["method"] != BASELINE and isinstance(r.get(x_key), (int, float))]
        top = max([1.0] + xs)
        fig.update_xaxes(range=[-0.03 * top, 1.03 * top], tickformat=".0%")
        fig.update_yaxes(title_text="accuracy (string match)", tickformat=".0%", range=[-0.05, 1.05], row=1, col=1)
        fig.update_layout(height=480, margin={"t": 60, "b": 60}, legend={"font": {"size": 11}})
        figs.append((key, title, fig))

    fields = [("depth", "needle depth", "Accuracy by needle depth")]
    if len(results["config"]["lengths"]) > 1:
        fields.append(("length", "prompt length (tokens)", "Accuracy by prompt length"))
    for field, x_title, title in fields:
        cells_by = accuracy_by(results["records"], field)
        fig = make_subplots(rows=1, cols=len(settings), subplot_titles=[s.replace("_", "-") for s in settings],
                            shared_yaxes=True, horizontal_spacing=0.04)
        for col, setting in enumerate(settings, start=1):
            cells = cells_by.get(setting, {})
            keys = [k for k in cells if k[0] == BASELINE] + sorted((k for k in cells if k[0] != BASELINE),
                                                                   key=lambda k: (methods.index(k[0]), k[1]))
            xs = sorted({x for k in keys for x in cells[k]})
            z = [[cells[k].get(x) for x in xs] for k in keys]
            labels = [k[0] if k[0] == BASELINE else f"{k[0]} @ {k[1]:g}" for k in keys]
            fig.add_trace(go.Heatmap(z=z, x=[f"{x:g}" for x in xs], y=labels, zmin=0, zmax=1, colorscale="Viridis",
                                     showscale=col == len(settings),
                                     colorbar={"title": "accuracy", "tickformat": ".0%"},
                                     text=[[_fmt(v, "{:.0%}") for v in row] for row in z], texttemplate="%{text}",
                                     hovertemplate=f"%{{y}}<br>{field} %{{x}}: %{{z:.0%}}<extra></extra>"),
                          row=1, col=col)
            fig.update_xaxes(title_text=x_title, type="category", row=1, col=col)
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(height=max(420, 22 * len(labels) + 140), margin={"l": 200, "t": 60})
        figs.append((f"plot-{field}", title, fig))

    aware = [r for r in summary if r["setting"] == settings[-1] and r["method"] != BASELINE]
    labels = [f"{r['method']} @ {r['ratio']:g}" for r in aware]
    fig = go.Figure([
        go.Bar(name="prefill ×uncompressed", x=labels, y=[r["prefill_vs_full"] for r in aware]),
        go.Bar(name="decode per token ×uncompressed", x=labels, y=[r["decode_vs_full"] for r in aware]),
    ])
    fig.add_hline(y=1.0, line_dash="dash", line_color="black")
    ratios = [y for r in aware for y in (r["prefill_vs_full"], r["decode_vs_full"]) if isinstance(y, (int, float)) and y > 0]
    if ratios and max(ratios) / min(ratios) > 8:  # one slow outlier would flatten every other bar on a linear axis
        fig.update_yaxes(type="log")
    fig.update_layout(barmode="group", height=460, yaxis_title=f"time relative to the uncompressed model "
                      f"({settings[-1].replace('_', '-')})", xaxis_tickangle=-45, margin={"b": 160})
    figs.append(("plot-latency", "Latency vs the uncompressed model", fig))
    return figs


def _html_table(rows: list[dict], columns) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r, k, s))}</td>" for k, _, s in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(results: dict, path: Path) -> None:
    cfg = results["config"]
    try:
        import plotly.offline

        figs = _figures(results)
        script = f"<script>{plotly.offline.get_plotlyjs()}</script>"
        plots = "".join(f'<h2 id="{key}-title">{html.escape(title)}</h2>'
                        + fig.to_html(full_html=False, include_plotlyjs=False, div_id=key,
                                      default_height=f"{fig.layout.height}px")
                        for key, title, fig in figs)
    except ImportError:
        script, plots = "", f"<p><b>Plots need plotly:</b> <code>{html.escape(REPORT_INSTALL)}</code></p>"
    method_rows = "".join(
        f"<tr><td>{html.escape(m['name'])}</td><td>{html.escape(m['kind'])}</td>"
        f"<td>{html.escape(', '.join(m['stages']))}</td><td class='text'>{html.escape(m['paper'] or '–')}</td>"
        f"<td class='text'>{html.escape(m['summary'])}</td></tr>" for m in results["methods"])
    wall = results.get("wall_s")
    stopped = (f" <b>Interrupted</b> after {len(results['records'])} runs: methods or samples not reached are "
               "missing, and the n column says how many runs each row averages." if results.get("interrupted") else "")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>attnzoo kv report</title>{script}
<style>body{{font-family:system-ui,sans-serif;margin:24px;max-width:1320px}}
table{{border-collapse:collapse;font-size:13px;margin:8px 0 24px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
td.text{{text-align:left}}
th{{background:#f3f3f3}} .note{{color:#444;font-size:14px;max-width:1100px}}</style></head><body>
<h1>attnzoo kv: KV-cache compression on {html.escape(results['model'])}</h1>
<p class="note">{len(results['samples'])} samples: tasks {html.escape(', '.join(cfg['tasks']))}; prompt lengths
{cfg['lengths']} tokens; needle depths {cfg['depths']}; {cfg['samples']} sample(s) each; settings
{html.escape(', '.join(cfg['settings']))}. Haystacks: held-out standard-library prose. Greedy decoding, string match.
Machine: {html.escape(results['machine'])}.{f' Wall time {wall:.0f} s.' if wall else ''}{stopped}</p>
<p class="note"><b>ratio</b> is the fraction of KV entries removed (0 = nothing removed), per row over its real
prompt tokens; for read-sparse methods (kind "read": the cache stays whole) it is the fraction of entries left unread
at each decoding step, and <b>read</b> is the measured fraction read. <b>removed</b> is measured from the cache
after prefill; <b>KV MiB</b> are the bytes of the cache tensors actually held when decoding starts. Per-head budgets
keep cache tensors rectangular (unused slots masked), so they can hold more bytes than entries.
<b>query-agnostic</b>: the context is compressed before the question is seen; <b>query-aware</b>: with it.</p>
{plots}
<h2>Summary</h2>{_html_table(table_rows(results['summary']), COLUMNS)}
<h2>Methods</h2><table><thead><tr><th>name</th><th>kind</th><th>stages</th><th>paper</th><th>what it does</th>
</tr></thead><tbody>{method_rows}</tbody></table>
</body></html>"""
    path.write_text(page, encoding="utf-8")
