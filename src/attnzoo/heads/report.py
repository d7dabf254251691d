"""The outputs of `attnzoo heads`: results.json (every score of every probe) and report.html, one
self-contained file (plotly's JavaScript inlined, the head views in a few lines of own JS), so it
opens offline."""
from __future__ import annotations

import html
import json
from pathlib import Path

from .analysis import Analysis
from .probes import PROBES

REPORT_INSTALL = 'pip install "attnzoo[report]"'


def results_json(analyses: list[Analysis], views: list[dict], wall_seconds: float | None = None,
                 cpu_threads: str | None = None) -> dict:
    return {"models": [a.as_dict() | {"views": v} for a, v in zip(analyses, views)], "wall_seconds": wall_seconds,
            "cpu_threads": cpu_threads,
            "probes": {name: {"paper": str(p.paper), "about": p.about, "models": p.models} for name, p in PROBES.items()}}


def write(out_dir: str | Path, analyses: list[Analysis], views: list[dict], wall_seconds: float | None = None,
          cpu_threads: str | None = None) -> tuple[Path, Path]:
    """Write results.json and report.html into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = results_json(analyses, views, wall_seconds, cpu_threads)
    js = out / "results.json"
    js.write_text(json.dumps(data, indent=1))
    page = out / "report.html"
    page.write_text(render(data))
    return js, page


# ---- HTML ------------------------------------------------------------------------------------


def render(data: dict) -> str:
    figures: list[tuple[str, dict]] = []
    body = [_section_model(m, i, figures) for i, m in enumerate(data["models"])]
    body.append(_probe_table(data["probes"]))
    plotly_js = _plotly_js()
    note = "" if plotly_js else (f"<p class='note'>The plots need plotly: <code>{html.escape(REPORT_INSTALL)}</code>; "
                                 "every number is in the tables and in results.json.</p>")
    title = "attnzoo heads: " + " and ".join(m["model"] for m in data["models"])
    wall = f" &middot; wall time {data['wall_seconds']:.0f} s" if data.get("wall_seconds") else ""
    wall += f" on {html.escape(data['cpu_threads'])} CPU thread(s)" if data.get("cpu_threads") else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style>" + (f"<script>{plotly_js}</script>" if plotly_js else "") + "</head><body>"
            f"<h1>{html.escape(title)}</h1><p class='meta'>What the attention heads do, found by the probes of the "
            f"literature and checked by ablation. Every number is also in results.json{wall}.</p>{note}"
            + "".join(body) + _script(figures, bool(plotly_js)) + "</body></html>")


def _plotly_js() -> str | None:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        return None
    return get_plotlyjs()


def _section_model(m: dict, index: int, figures: list) -> str:
    probes = m["probes"]
    slug = f"m{index}"
    parts = [f"<section><h2>{html.escape(m['model'])}</h2><p class='meta'>{html.escape(m['architecture'])}: "
             f"{m['layers']} layers &times; {m['heads']} query heads = {m['layers'] * m['heads']} heads, "
             f"{'causal' if m['causal'] else 'bidirectional'} attention. Seconds per step: "
             f"{html.escape(', '.join(f'{k} {v:.0f}' for k, v in m['seconds'].items()))}.</p>",
             _findings(m)]
    parts.append(_validation(probes, slug, figures))
    parts.append(_heatmaps(m, slug, figures))
    if m.get("views"):
        parts.append(_views(m["views"], slug, figures))
    parts.append(_massive(probes, slug, figures))
    parts.append(_pruning(probes, slug, figures))
    parts.append(_attribution(probes, slug, figures))
    parts.append(_position(probes, slug, figures))
    parts.append(_act_decore(probes))
    return "".join(parts) + "</section>"


def _fmt_heads(rows, n=5) -> str:
    return ", ".join(f"L{l}H{h} ({v:.2f})" for l, h, v in rows[:n])


def _findings(m: dict) -> str:
    p, items = m["probes"], []
    n_heads = m["layers"] * m["heads"]
    if "retrieval" in p:
        s = p["retrieval"]["summary"]
        items.append(f"<b>Retrieval heads</b>: {s['retrieval_heads']} of {n_heads} heads "
                     f"({100 * s['share_of_heads']:.1f}%) score above {s['threshold']}; top: {_fmt_heads(s['top_retrieval'])}.")
        v = s.get("validation")
        if v:
            rand = ", ".join(f"{r['exact']:.2f}" for r in v["accuracy_random_ablated"])
            items.append(f"<b>Ablating the top {v['heads_ablated']} retrieval heads</b> ({v['mode']}) takes passkey "
                         f"accuracy from {v['accuracy_intact']['exact']:.2f} to <b>{v['accuracy_top_ablated']['exact']:.2f}</b>; "
                         f"{v['heads_ablated']} random heads: {rand} ({v['examples']} held-out questions, "
                         f"{v['context_tokens']} tokens).")
    if "induction" in p:
        s = p["induction"]["summary"]
        items.append(f"<b>Induction heads</b>: {_fmt_heads(s['top_induction'])}.")
        v = s.get("validation")
        if v:
            rand = ", ".join(f"{x:.3f}" for x in v["loss_random_ablated"])
            items.append(f"<b>Ablating the top {v['heads_ablated']} induction heads</b> raises the loss on repeated "
                         f"held-out text from {v['loss_intact']:.3f} to <b>{v['loss_top_ablated']:.3f}</b>; random heads: {rand}.")
    if "sink" in p:
        s = p["sink"]["summary"]
        toks = ", ".join(html.escape(repr(t)) for t, _ in s["hidden_sink_tokens"][:6])
        items.append(f"<b>Sinks</b>: on average {100 * s['mean_first_token_mass']:.0f}% of a head's attention goes to the "
                     f"first token; {s['heads_over_half_on_first_token']} heads put more than half there. Hidden sinks "
                     f"(mean mass {s['mean_hidden_sink_mass']:.3f}) sit on {toks}.")
    if "massive_activations" in p:
        s = p["massive_activations"]["summary"]
        big = s["largest"]
        items.append(f"<b>Massive activations</b>: {big['value']:.0f} at layer {big['layer']}, token {big['position']} "
                     f"({html.escape(repr(big['token']))}), dimension {big['dim']}: {big['ratio_to_median']:.0f}&times; the "
                     f"layer's median; massive (&gt;100 and &gt;1000&times; median) in layers "
                     f"{_ranges(s['layers_with_massive'])}, dimensions {s['massive_dims']}.")
    if "active_dormant" in p:
        s = p["active_dormant"]["summary"]
        items.append(f"<b>Active/dormant</b>: {s['always_dormant']} heads always dormant, {s['never_dormant']} never, "
                     f"{s['active_dormant']} dormant on some inputs only ({s['domain_switching']} switch with the domain, "
                     f"prose vs code); dormant heads' outputs are {s['output_norm_dormant_over_active']:.2f}&times; as large as active ones'.")
    if "importance" in p:
        s = p["importance"]["summary"]
        items.append(f"<b>Pruning</b> half the heads, least important first, takes held-out loss from {s['loss_intact']:.2f} "
                     f"to {s['pruned_half_loss']['by_gradient']:.2f} (random order: {s['pruned_half_loss']['random']:.2f}).")
    if "rollout_flow" in p:
        s = p["rollout_flow"]["summary"]
        corr = ", ".join(f"{k} {v:+.2f}" for k, v in s["spearman_with_gradient"].items())
        items.append(f"<b>Token attribution</b> for position {html.escape(s['target'])}: Spearman correlation with "
                     f"|gradient &times; input|: {corr}.")
    if "bert_patterns" in p:
        s = p["bert_patterns"]["summary"]
        items.append("<b>BERT patterns</b>: " + "; ".join(f"{k.replace('_', ' ')} L{r[0][0]}H{r[0][1]} ({r[0][2]:.2f})"
                                                         for k, r in s.items() if k != "sep_by_layer") + ".")
    if "position_bias" in p:
        s = p["position_bias"]["summary"]
        curve = s["mean_curve"]
        text = (f"<b>Positional bias</b> over a {s['context_tokens']}-token needle-free context: the question's attention "
                f"per context token is {curve[0] / max(sum(curve[1:-1]) / len(curve[1:-1]), 1e-12):.1f}&times; the middle's in the first "
                f"tenth and {curve[-1] / max(sum(curve[1:-1]) / len(curve[1:-1]), 1e-12):.1f}&times; in the last.")
        c = s.get("calibration")
        if c:
            text += (f" Passkey accuracy {c['accuracy_base']:.2f} &rarr; {c['accuracy_calibrated']:.2f} with the "
                     f"found-in-the-middle calibration ({c['examples']} questions).")
        items.append(text)
    if "lookback_lens" in p:
        s = p["lookback_lens"]["summary"]
        items.append(f"<b>Lookback Lens</b>: held-out AUROC {s['test_auroc']:.2f} (accuracy {s['test_accuracy']:.2f}, "
                     f"{s['test_examples']} answers); mean lookback ratio {s['mean_lookback_grounded']:.3f} on grounded "
                     f"vs {s['mean_lookback_ungrounded']:.3f} on ungrounded answers.")
    if "decore" in p:
        a = p["decore"]["summary"]["accuracy"]
        items.append(f"<b>DeCoRe</b> on keyed-needle QA: greedy {a['greedy']:.2f}, DeCoRe static {a['decore_static']:.2f}, "
                     f"entropy-scaled {a['decore_entropy']:.2f}; with retrieval heads masked {a['masked_model']:.2f}.")
    if not items:
        return ""
    return "<h3>Findings</h3><ul class='findings'>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}&ndash;{a}")
            start = b
    return ", ".join(out)


def _fig(figures: list, fid: str, data: list, layout: dict, cls: str = "plot") -> str:
    # Legends go in a row above the plot: at plotly's default place (right) they are cut off in half-width cells.
    base = {"margin": {"l": 50, "r": 20, "t": 64, "b": 45},
            "legend": {"orientation": "h", "x": 0, "y": 1.0, "xanchor": "left", "yanchor": "bottom"}}
    figures.append((fid, {"data": data, "layout": {**base, **layout}}))
    return f"<div id='{fid}' class='{cls}'></div>"


def _validation(probes: dict, slug: str, figures: list) -> str:
    out = []
    v = probes.get("retrieval", {}).get("summary", {}).get("validation")
    if v:
        labels = ["intact", f"top {v['heads_ablated']} retrieval"] + [f"random {i + 1}" for i in range(len(v["accuracy_random_ablated"]))]
        runs = [v["accuracy_intact"], v["accuracy_top_ablated"], *v["accuracy_random_ablated"]]
        data = [{"type": "bar", "name": "exact match", "x": labels, "y": [r["exact"] for r in runs]},
                {"type": "bar", "name": "digits right", "x": labels, "y": [r["digits"] for r in runs]}]
        out.append(_fig(figures, f"{slug}-val-retrieval", data, {
            "title": {"text": "Passkey accuracy with heads ablated"}, "yaxis": {"range": [0, 1.05], "title": {"text": "accuracy"}},
            "barmode": "group", "height": 330}, "plot half"))
    v = probes.get("induction", {}).get("summary", {}).get("validation")
    if v:
        labels = ["intact", f"top {v['heads_ablated']} induction"] + [f"random {i + 1}" for i in range(len(v["loss_random_ablated"]))]
        data = [{"type": "bar", "x": labels, "y": [v["loss_intact"], v["loss_top_ablated"], *v["loss_random_ablated"]],
                 "marker": {"color": ["#888", "#d62728"] + ["#1f77b4"] * len(v["loss_random_ablated"])}}]
        out.append(_fig(figures, f"{slug}-val-induction", data, {
            "title": {"text": "Loss on repeated real text with heads ablated"}, "yaxis": {"title": {"text": "cross-entropy (nats)"}},
            "height": 330}, "plot half"))
    if not out:
        return ""
    return ("<h3>Validation by ablation</h3><p class='cap'>The heads a probe ranks highest are ablated on held-out inputs, "
            "next to as many heads drawn at random from the rest (several draws).</p><div class='row'>" + "".join(out) + "</div>")


def _heatmaps(m: dict, slug: str, figures: list) -> str:
    cells = []
    height = max(260, 16 * m["layers"] + 90)
    for name, probe in m["probes"].items():
        for n_map, (key, grid) in enumerate(probe["maps"].items()):
            fid = f"{slug}-map-{name}-{key}"
            signed = min(min(row) for row in grid) < 0  # a difference or a weight: diverging colours around 0
            colours = {"colorscale": "RdBu", "zmid": 0} if signed else {"colorscale": "Viridis"}
            data = [{"type": "heatmap", "z": grid, **colours, "x": list(range(m["heads"])),
                     "y": list(range(m["layers"])), "colorbar": {"thickness": 10},
                     "hovertemplate": "layer %{y}, head %{x}: %{z:.3f}<extra></extra>"}]
            layout = {"title": {"text": key.replace("_", " "), "font": {"size": 13}}, "height": height,
                      "yaxis": {"autorange": "reversed", "title": {"text": "layer"}, "dtick": 2 if m["layers"] > 12 else 1},
                      "xaxis": {"title": {"text": "head"}, "dtick": 1}, "margin": {"l": 45, "r": 10, "t": 34, "b": 40}}
            about = PROBES[name].about if n_map == 0 else f"second map of {name}: {key.replace('_', ' ')}"
            cells.append(f"<div class='cell'>{_fig(figures, fid, data, layout)}<p class='cap'>"
                         f"<b>{html.escape(name)}</b>: {html.escape(about)}<br><i>{html.escape(probe['paper'])}</i></p></div>")
    if not cells:
        return ""
    return "<h3>Scores per layer and head</h3><div class='grid'>" + "".join(cells) + "</div>"


def _views(views: dict, slug: str, figures: list) -> str:
    pca = views["pca"]
    tokens = views["tokens"]
    n = len(tokens)
    hover = [f"{i}: {t!r}" for i, t in enumerate(tokens)]
    data = [{"type": "scatter", "mode": "markers", "name": "queries", "x": [p[0] for p in pca["queries"]],
             "y": [p[1] for p in pca["queries"]], "text": hover, "hoverinfo": "text+name",
             "marker": {"symbol": "circle", "size": 9, "color": list(range(n)), "colorscale": "Blues", "line": {"width": 1}}},
            {"type": "scatter", "mode": "markers", "name": "keys", "x": [p[0] for p in pca["keys"]],
             "y": [p[1] for p in pca["keys"]], "text": hover, "hoverinfo": "text+name",
             "marker": {"symbol": "diamond", "size": 9, "color": list(range(n)), "colorscale": "Oranges", "line": {"width": 1}}}]
    scatter = _fig(figures, f"{slug}-pca", data, {
        "title": {"text": f"Queries and keys of {pca['label']}, joint PCA"}, "height": 460,
        "xaxis": {"title": {"text": "PC 1"}}, "yaxis": {"title": {"text": "PC 2"}}}, "plot half")
    payload = json.dumps(views).replace("</", "<\\/")
    return (f"<h3>Heads at work</h3><p class='cap'>Attention of the top head of each probe over a short held-out text "
            f"(written twice for a causal model). Hover a token on the left to see where it looks; the colour depth is the "
            f"attention weight. Right: AttentionViz-style joint PCA of one head's queries (circles) and keys (diamonds), "
            f"darker = later in the text; a query lands near the keys it attends to.</p><div class='row'>"
            f"<div class='half attnview' id='{slug}-av'><select></select><svg></svg></div>{scatter}</div>"
            f"<script>window.AV = window.AV || {{}}; window.AV['{slug}-av'] = {payload};</script>")


def _massive(probes: dict, slug: str, figures: list) -> str:
    p = probes.get("massive_activations")
    if not p:
        return ""
    rows = p["details"]["layers"]
    layers = [r["layer"] for r in rows]
    data = [{"type": "scatter", "mode": "lines+markers", "name": f"top {i + 1}", "x": layers,
             "y": [r["top"][i]["value"] for r in rows]} for i in range(min(3, len(rows[0]["top"])))]
    data.append({"type": "scatter", "mode": "lines", "name": "median", "x": layers, "y": [r["median"] for r in rows],
                 "line": {"dash": "dot"}})
    fig = _fig(figures, f"{slug}-massive", data, {
        "title": {"text": "Largest |hidden state| entries after each layer"}, "height": 360,
        "yaxis": {"type": "log", "title": {"text": "magnitude"}}, "xaxis": {"title": {"text": "layer"}}}, "plot half")
    table = "".join(f"<tr><td>{r['layer']}</td><td>{r['top'][0]['value']:.1f}</td><td>{r['median']:.3f}</td>"
                    f"<td>{r['top'][0]['position']} {html.escape(repr(r['top'][0]['token']))}</td><td>{r['top'][0]['dim']}</td></tr>"
                    for r in rows)
    return (f"<h3>Massive activations</h3><div class='row'>{fig}<div class='half scroll'><table><tr><th>layer</th>"
            f"<th>largest</th><th>median</th><th>token</th><th>dim</th></tr>{table}</table></div></div>")


def _pruning(probes: dict, slug: str, figures: list) -> str:
    p = probes.get("importance")
    if not p:
        return ""
    c = p["details"]["pruning_curve"]
    x = [100 * f for f in c["fractions"]]
    data = [{"type": "scatter", "mode": "lines+markers", "name": k.replace("_", " "), "x": x, "y": v}
            for k, v in c.items() if k != "fractions"]
    return "<h3>Pruning curve</h3>" + _fig(figures, f"{slug}-pruning", data, {
        "title": {"text": "Held-out loss as heads are pruned"}, "height": 360,
        "xaxis": {"title": {"text": "% of heads pruned"}}, "yaxis": {"title": {"text": "cross-entropy (nats)"}}}, "plot half")


def _attribution(probes: dict, slug: str, figures: list) -> str:
    p = probes.get("rollout_flow")
    if not p:
        return ""
    d = p["details"]
    labels = [f"{i}:{t}" for i, t in enumerate(d["tokens"])]
    data = []
    for k, v in d["attributions"].items():
        total = sum(v) or 1.0
        data.append({"type": "bar", "name": k.replace("_", " "), "x": labels, "y": [x / total for x in v]})
    return "<h3>Token attribution: raw attention, rollout, flow</h3>" + _fig(figures, f"{slug}-attrib", data, {
        "title": {"text": f"Attribution of each input token to position {d['target']} (each method sums to 1)"},
        "barmode": "group", "height": 380, "xaxis": {"tickangle": -45}}, "plot wide")


def _position(probes: dict, slug: str, figures: list) -> str:
    p = probes.get("position_bias")
    if not p:
        return ""
    s = p["summary"]
    n = len(s["mean_curve"])
    x = [f"{100 * i // n}-{100 * (i + 1) // n}%" for i in range(n)]
    data = [{"type": "scatter", "mode": "lines+markers", "name": "mean over heads", "x": x, "y": s["mean_curve"]}]
    for l, h, _ in s["top_u_shaped"][:3]:
        data.append({"type": "scatter", "mode": "lines", "name": f"L{l}H{h}", "x": x, "y": p["details"]["curves"][l][h]})
    fig = _fig(figures, f"{slug}-position", data, {
        "title": {"text": "Question's attention per context token, by depth"}, "height": 360,
        "xaxis": {"title": {"text": "depth in the context"}}, "yaxis": {"type": "log", "title": {"text": "attention per token"}}},
        "plot half")
    c = s.get("calibration")
    table = ""
    if c:
        rows = "".join(f"<tr><td>{d:.2f}</td><td>{'yes' if b else 'no'}</td><td>{'yes' if k else 'no'}</td></tr>"
                       for d, b, k in c["by_depth"])
        table = (f"<div class='half'><table><tr><th>needle depth</th><th>right (base)</th><th>right (calibrated)</th></tr>"
                 f"{rows}</table></div>")
    return f"<h3>Positional attention bias (found in the middle)</h3><div class='row'>{fig}{table}</div>"


def _act_decore(probes: dict) -> str:
    out = []
    act = probes.get("sink", {}).get("summary", {}).get("act")
    if act:
        runs = [("no calibration", "base")] + [(f"ACT on {label.replace('_', ' ')} heads", f"act_{label}")
                                               for label in ("kept", "all_candidates") if f"heldout_loss_act_{label}" in act]
        rows = (f"<tr><td>beta, sink threshold</td><td colspan=2>{act['beta']}, {act['threshold']}</td></tr>"
                "<tr><td>head search (loss change when calibrated alone)</td><td colspan=2>"
                + html.escape(", ".join(f"L{l}H{h} {d:+.4f}" for l, h, d in act["candidates_loss_change"])) + "</td></tr>"
                "<tr><td>heads kept</td><td colspan=2>" + (", ".join(f"L{l}H{h}" for l, h in act["kept_heads"]) or "none")
                + "</td></tr><tr><th></th><th>held-out loss</th><th>passkey exact / digits</th></tr>"
                + "".join(f"<tr><td>{name}</td><td>{act[f'heldout_loss_{key}']:.4f}</td><td>{act[f'passkey_accuracy_{key}']['exact']:.2f}"
                          f" / {act[f'passkey_accuracy_{key}']['digits']:.2f}</td></tr>" for name, key in runs))
        out.append("<h3>ACT: calibrating hidden sinks at inference</h3><p class='cap'>Head search on calibration text "
                   "(keep a head if calibrating it alone lowers the loss), then the kept heads calibrated on held-out "
                   f"prose and passkey questions.</p><table>{rows}</table>")
    dec = probes.get("decore", {}).get("summary")
    if dec:
        rows = "".join(f"<tr><td>{html.escape(k.replace('_', ' '))}</td><td>{v:.3f}</td></tr>" for k, v in dec["accuracy"].items())
        out.append(f"<h3>DeCoRe</h3><p class='cap'>{html.escape(dec['task'])}; {dec['examples']} questions; "
                   f"{dec['masked_heads']} retrieval heads masked in the contrasted model.</p><table>{rows}</table>")
    return "".join(out)


def _probe_table(probes: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(p['paper'])}</td><td>{html.escape(p['about'])}</td></tr>"
                   for n, p in probes.items())
    return f"<section><h2>Probes</h2><table><tr><th>probe</th><th>paper</th><th>what it measures</th></tr>{rows}</table></section>"


def _script(figures: list, plotly: bool) -> str:
    figs = json.dumps(figures).replace("</", "<\\/") if plotly else "[]"
    return f"<script>const FIGS = {figs};{VIEW_JS}</script>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:20px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{font-size:16px;margin:26px 0 8px}.meta{color:#555;font-size:14px}.cap{color:#555;font-size:12.5px;margin:4px 0}
.note{background:#fff4d6;padding:8px}.findings li{margin:5px 0;font-size:14px;line-height:1.45}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.cell{border:1px solid #e4e4e4;border-radius:6px;padding:6px}.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.half{flex:1 1 560px;min-width:420px}.wide{width:100%}.scroll{max-height:360px;overflow-y:auto}
table{border-collapse:collapse;font-size:12.5px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.attnview select{font-size:13px;margin-bottom:6px}.attnview svg{display:block}
.attnview text{font-family:ui-monospace,monospace;font-size:12px;cursor:default}
"""

# Plots every figure, and draws each head view: tokens on both sides, one line per (query, key)
# pair with opacity = attention; hovering a query token keeps only its lines.
VIEW_JS = """
for (const [id, f] of FIGS) Plotly.newPlot(id, f.data, f.layout, {displayModeBar: false, responsive: true});
for (const [id, d] of Object.entries(window.AV || {})) {
  const root = document.getElementById(id), sel = root.querySelector('select'), svg = root.querySelector('svg');
  d.heads.forEach((h, i) => sel.add(new Option(h.label, i)));
  const NS = 'http://www.w3.org/2000/svg', row = 17, n = d.tokens.length, W = 560, xl = 200, xr = 360;
  svg.setAttribute('width', W); svg.setAttribute('height', n * row + 30);
  const colours = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2', '#17becf'];
  function el(tag, attrs, text) { const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text !== undefined) e.textContent = text; return e; }
  function draw(focus) {
    svg.innerHTML = '';
    const h = d.heads[sel.value], c = colours[sel.value % colours.length];
    svg.appendChild(el('text', {x: xl - 4, y: 14, 'text-anchor': 'end', fill: '#777'}, 'query'));
    svg.appendChild(el('text', {x: xr + 4, y: 14, fill: '#777'}, 'key'));
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
      const a = h.attn[i][j]; if (a < 0.02 || (focus !== null && focus !== i)) continue;
      svg.appendChild(el('line', {x1: xl + 4, y1: 26 + i * row, x2: xr - 4, y2: 26 + j * row, stroke: c,
        'stroke-opacity': Math.min(1, a * (focus === null ? 1 : 1.5)), 'stroke-width': 2}));
    }
    d.tokens.forEach((t, i) => {
      const shown = JSON.stringify(t).slice(1, -1);
      const left = el('text', {x: xl, y: 30 + i * row, 'text-anchor': 'end', 'font-weight': focus === i ? 'bold' : 'normal'}, shown);
      left.addEventListener('mouseenter', () => draw(i)); left.addEventListener('mouseleave', () => draw(null));
      svg.appendChild(left);
      const w = focus === null ? 0 : h.attn[focus][i];
      svg.appendChild(el('text', {x: xr, y: 30 + i * row, fill: w > 0.02 ? c : '#222', 'font-weight': w > 0.1 ? 'bold' : 'normal'}, shown));
    });
  }
  sel.addEventListener('change', () => draw(null)); draw(null);
}
"""
