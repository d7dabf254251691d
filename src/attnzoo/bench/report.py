"""The bench's outputs: the leaderboard (terminal), results.json (every number) and report.html.

report.html is one self-contained file: plotly's JavaScript is inlined, so it renders offline.
Without plotly installed (`pip install "attnzoo[report]"`) it still holds every table, and says
how to get the plots.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

PLOTS = {
    "plot-fidelity-speed": "Fidelity vs speed, per family",
    "plot-error-budget": "Fidelity vs budget per family: error and attention mass kept vs the share of keys kept, "
                         "beside the top-k oracle",
    "plot-paths": "Which CPU path wins: time and peak memory of each path vs SDPA with the dense mask",
    "plot-time-length": "Time vs sequence length",
    "plot-memory-length": "Peak memory vs sequence length",
    "plot-ppl-delta": "In-model perplexity change",
}
REPORT_INSTALL = 'pip install "attnzoo[report]"'
LOG_FLOOR = 1e-12  # errors of exactly 0 drawn here on log axes
FIXED = "fixed"  # the board of variants compared at their defaults (no countable key budget)


# ---- leaderboard -----------------------------------------------------------------------------


def fraction_label(f: float | None) -> str:
    """1/4 for 0.25; 'defaults' for None."""
    if f is None:
        return "defaults"
    return f"1/{round(1 / f)}" if f > 0 and abs(1 / f - round(1 / f)) < 1e-9 else f"{f:g}"


def boards(results: dict) -> list[str]:
    """Leaderboard sections in order: each share of the keys, then the variants at their defaults."""
    fractions = results["config"].get("keep_fractions") or []
    return [fraction_label(f) for f in fractions] + [FIXED]


def leaderboard(results: dict) -> list[dict]:
    """One row per variant and budget compared: variants with a key budget at each share of the keys
    in `config.keep_fractions` (board '1/4', '1/8', ...), the others at their defaults (board 'fixed').
    Within a board, rows are ranked by in-model perplexity ratio, then real-activation error; rows
    whose configuration is full attention at this length (`equals_full`) get no rank."""
    fid = [r for r in results["fidelity"] if r["error"] is None]
    qual = [r for r in results["quality"]["rows"]]
    rows = []
    for name, entry in results["variants"].items():
        info = entry["info"]
        mine = [r for r in fid if r["variant"] == name]
        targets = sorted({r["keep_target"] for r in mine if r.get("keep_target")}, reverse=True)
        configs = [(f, [r for r in mine if r.get("keep_target") == f]) for f in targets] or \
                  [(None, [r for r in mine if r["default"]])]
        if not mine:  # speed only, or fidelity failed: the speed rows say which budgets ran
            speed_targets = sorted({r.get("keep_target") for r in results["speed"] if r["variant"] == name
                                    and r.get("keep_target")}, reverse=True)
            configs = [(f, []) for f in speed_targets] or [(None, [])]
        for target, fr in configs:
            cap = next((r for r in fr if r["source"] == "captured"), {})
            gau = next((r for r in fr if r["source"] == "gaussian"), {})
            q = next((r for r in qual if r["variant"] == name and r.get("keep_target") == target
                      and (target is not None or not r.get("params"))), {})
            fwd = _fastest(results["speed"], name, entry["fidelity_pattern"], "fwd", target)
            fwd_bwd = _fastest(results["speed"], name, entry["fidelity_pattern"], "fwd+bwd", target)
            budget = cap.get("budget")
            same = cap.get("equals_full") or ("exact attention (the reference)" if name == "full" else None)
            rows.append({
                "board": fraction_label(target) if target else FIXED, "keep_target": target,
                "variant": name, "family": info["family"], "exact": info["exact"],
                "budget": None if budget is None else f"{cap.get('budget_param') or entry['budget_param']}={budget}",
                "kept": cap.get("kept"), "equals_full": same,
                "err_captured": cap.get("rel_err"), "err_gaussian": gau.get("rel_err"), "cosine": cap.get("cosine"),
                "mass_kept": cap.get("mass_kept"), "delta_loss": q.get("delta_loss"), "ppl_ratio": q.get("ppl_ratio"),
                "delta_ppl": q.get("delta_ppl"), "ppl": q.get("ppl"), "speed_length": fwd.get("length"),
                "speed_budget": _budget_text(fwd), "backend": fwd.get("backend"), "path": fwd.get("path"),
                "fwd_vs_sdpa": fwd.get("time_vs_sdpa"), "fwd_bwd_vs_sdpa": fwd_bwd.get("time_vs_sdpa"),
                "fwd_vs_sdpa_mask": fwd.get("time_vs_sdpa_mask"), "peak_mib": fwd_bwd.get("peak_mib"),
                "memory_vs_sdpa": fwd_bwd.get("memory_vs_sdpa"), "rank": None,
            })
    order = {b: i for i, b in enumerate(boards(results))}
    rows.sort(key=lambda r: (order.get(r["board"], len(order)), r["equals_full"] is not None,
                             _or_inf(r["delta_loss"]), _or_inf(r["err_captured"]), r["variant"]))
    for board in order:
        ranked = [r for r in rows if r["board"] == board and r["equals_full"] is None]
        for i, r in enumerate(ranked, 1):
            r["rank"] = i
    return rows


def _budget_text(row: dict) -> str | None:
    return ", ".join(f"{k}={v}" for k, v in row["params"].items()) if row.get("params") else None


def _fastest(speed_rows: list[dict], name: str, pattern: str | None, mode: str, target: float | None) -> dict:
    """The variant's fastest row at the budget keeping `target` of the keys (defaults when None) at
    its longest measured length, in its fidelity pattern; the comparison paths (torch:tiles,
    sdpa_mask) are not the variant's own."""
    from .speed import PATH_ROWS

    mine = [r for r in speed_rows if r["variant"] == name and r["pattern"] == pattern and r["mode"] == mode
            and r.get("keep_target") == target and (target is not None or not r["params"])
            and r["backend"] not in PATH_ROWS and r["error"] is None]
    if not mine:
        return {}
    longest = max(r["length"] for r in mine)
    return min((r for r in mine if r["length"] == longest), key=lambda r: r["median_ms"])


def _or_inf(x) -> float:
    return math.inf if x is None else abs(x)


def winners(results: dict) -> dict[str, dict]:
    """Per board: the ranked row losing least in the model (or, without perplexity, least error),
    the fastest ranked row (forward vs SDPA), and the rows equal to full attention."""
    board_rows = leaderboard(results)
    out = {}
    for board in boards(results):
        rows = [r for r in board_rows if r["board"] == board]
        ranked = [r for r in rows if r["rank"] is not None]
        timed = [r for r in ranked if r["fwd_vs_sdpa"] is not None]
        out[board] = {"best": ranked[0] if ranked else None,
                      "fastest": min(timed, key=lambda r: r["fwd_vs_sdpa"]) if timed else None,
                      "equal": [r for r in rows if r["equals_full"] is not None and r["variant"] != "full"],
                      "rows": len(rows)}
    return out


def headline(results: dict) -> str:
    """One plain sentence: what was run, what wins at which budget."""
    cfg, meta, m = results["config"], results["meta"], results["model"]
    n = len(results["variants"])
    lengths = "/".join(str(x) for x in cfg["lengths"])
    if cfg.get("speed_only"):
        what = (f"{n} variants timed on {meta['device']} ({meta['dtype']}) at {lengths} tokens "
                f"with {m['name']}'s head layout")
    else:
        what = (f"{n} variants on {m['name']}'s real q/k/v ({results['capture']['length']} tokens, layers "
                f"{results['capture']['layers']}), in-model perplexity on {results['quality']['tokens']} held-out "
                f"tokens, speed at {lengths} tokens on {meta['device']} ({meta['dtype']})")
    if cfg.get("speed_only"):
        return f"Ran {what}. " + (paths_line(results) or "")
    parts = []
    for board, w in winners(results).items():
        if board == FIXED or not w["best"]:
            continue
        b = w["best"]
        loss = f"perplexity ×{b['ppl_ratio']:.2f}" if b["ppl_ratio"] is not None else \
            f"error {cell(b['err_captured'], '{:.2g}')}"
        text = f"keeping {board} of the keys, {b['variant']} ({b['budget']}) loses least ({loss})"
        f = w["fastest"]
        if f is not None:
            text += f" and {f['variant']} runs fastest ({f['fwd_vs_sdpa']:.2f}× SDPA forward)"
        parts.append(text)
    equal = sorted({f"{r['variant']}" for w in winners(results).values() for r in w["equal"]})
    joined = "; ".join(parts)
    sentence = f"Ran {what}. " + (joined[0].upper() + joined[1:] + ". " if parts else "")
    if equal:
        sentence += (f"Not ranked, because at this length they are full attention: {', '.join(equal)} "
                     "(in at least one configuration).")
    return sentence


# ---- terminal -------------------------------------------------------------------------------------

COLUMNS = (
    ("rank", "#", str), ("variant", "variant", str), ("family", "family", str), ("budget", "budget", str),
    ("kept", "keep", "{:.2f}"), ("err_captured", "err", "{:.1e}"), ("err_gaussian", "err noise", "{:.1e}"),
    ("cosine", "cos", "{:.4f}"), ("mass_kept", "mass", "{:.3f}"), ("ppl_ratio", "ppl ×", "{:.3g}"),
    ("delta_loss", "Δln ppl", "{:+.3f}"), ("fwd_vs_sdpa", "fwd×", "{:.2f}"), ("fwd_bwd_vs_sdpa", "f+b×", "{:.2f}"),
    ("fwd_vs_sdpa_mask", "×mask", "{:.2f}"), ("memory_vs_sdpa", "mem×", "{:.2g}"), ("peak_mib", "peak MiB", "{:.1f}"),
    ("speed_budget", "timed at", str), ("path", "path", str),
)
# What each column means (HTML legend and terminal caption).
LEGEND = {
    "#": "rank within the board (by perplexity ratio, then error); '=' marks a configuration that is full "
         "attention at this length (mask keeps every pair, or output equal to full's): not ranked",
    "budget": "the budget parameter's value at the fidelity length",
    "keep": "share of the (query, key) pairs of exact causal attention that the mask keeps (measured)",
    "err": "||o − o_exact|| / ||o_exact|| on the model's real q/k/v (float64 exact attention)",
    "err noise": "the same on Gaussian q/k/v",
    "cos": "mean cosine between output rows and exact attention's",
    "mass": "share of exact attention's probability mass on the keys kept",
    "ppl ×": "perplexity with the variant in every layer ÷ the unchanged model's (1 = no loss)",
    "Δln ppl": "ln(ppl ÷ unchanged ppl) = change in next-token loss, nats per token",
    "fwd×": "forward time ÷ SDPA's exact attention (same length, same run): lower is faster",
    "f+b×": "forward+backward time ÷ SDPA's",
    "×mask": "forward time ÷ SDPA given this configuration's dense boolean mask",
    "mem×": "forward+backward peak memory ÷ SDPA's",
    "peak MiB": "forward+backward extra peak memory",
    "timed at": "the budget timed at the speed length (chosen there to keep the same share of the keys)",
    "path": "the torch backend's path: fused (CPU flash kernel per run of key tiles), tiles (online softmax "
            "engine), own (the variant's own code)",
}
TERMINAL_COLUMNS = ("rank", "variant", "budget", "kept", "err_captured", "delta_loss", "fwd_vs_sdpa",
                    "fwd_bwd_vs_sdpa")


def cell(value, fmt) -> str:
    if value is None:
        return "–"
    return str(value) if fmt is str else fmt.format(value)


def _rank_cell(r: dict) -> str:
    return "=" if r["equals_full"] is not None else cell(r["rank"], str)


def paths_line(results: dict) -> str | None:
    """One sentence on the CPU paths at the longest length: how often the fused path beats SDPA given
    the dense mask, and the median time and memory ratios."""
    summary = [s_ for s_ in path_summary(results) if s_["paths"].get("torch fused", {}).get("vs_mask") is not None]
    if not summary:
        return None
    longest = max(s_["length"] for s_ in summary)
    parts = []
    for mode in dict.fromkeys(s_["mode"] for s_ in summary):
        rows = [s_["paths"]["torch fused"] for s_ in summary if s_["length"] == longest and s_["mode"] == mode]
        if not rows:
            continue
        wins = sum(r["vs_mask"] < 1 for r in rows)
        mem = [r["mem_vs_mask"] for r in rows if r["mem_vs_mask"] is not None]
        parts.append(f"{mode}: faster in {wins} of {len(rows)} (median time ×{_median([r['vs_mask'] for r in rows]):.2f}"
                     + (f", peak memory ×{_median(mem):.2f}" if mem else "") + ")")
    return (f"CPU paths at {longest} tokens, the torch backend's fused path vs SDPA given the dense mask: "
            + "; ".join(parts) + ".")


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def print_paths(results: dict, console) -> None:
    """Per configuration with a path comparison: each path's time (and fused memory) ÷ SDPA with the
    dense mask, and the fused path ÷ SDPA's exact attention. Fits 80 columns."""
    from rich import box
    from rich.table import Table

    t = Table(title="CPU paths: time ÷ SDPA given the dense boolean mask (lower is faster)", box=box.SIMPLE_HEAD,
              pad_edge=False, title_justify="left")
    for head in ("variant", "budget", "len", "mode", "fused", "tiles", "f×sdpa", "t×sdpa", "mem"):
        t.add_column(head, justify="left" if head in ("variant", "budget", "mode") else "right", no_wrap=True)
    for s_ in path_summary(results):
        p = s_["paths"]
        t.add_row(s_["variant"], _params_text(s_["params"]), str(s_["length"]), s_["mode"],
                  cell(p.get("torch fused", {}).get("vs_mask"), "{:.2f}"),
                  cell(p.get("torch tiles", {}).get("vs_mask"), "{:.2f}"),
                  cell(p.get("torch fused", {}).get("vs_sdpa"), "{:.2f}"),
                  cell(p.get("torch tiles", {}).get("vs_sdpa"), "{:.2f}"),
                  cell(p.get("torch fused", {}).get("mem_vs_mask"), "{:.2g}"))
    console.print(t)
    console.print("fused / tiles: the torch backend's two paths, time ÷ SDPA given the dense mask; f×sdpa, "
                  "t×sdpa: their time ÷ SDPA's exact attention (no mask); mem: fused peak memory ÷ the masked "
                  "SDPA's.", highlight=False, style="dim")


def print_leaderboard(results: dict, console) -> None:
    """One narrow table per board (fits 80 columns), abbreviations in the caption."""
    from rich import box
    from rich.table import Table

    console.print(headline(results), highlight=False)
    if results["config"].get("speed_only"):
        print_paths(results, console)
        return
    columns = [c for c in COLUMNS if c[0] in TERMINAL_COLUMNS]
    rows = leaderboard(results)
    length = max(results["config"]["lengths"])
    for board in boards(results):
        mine = [r for r in rows if r["board"] == board]
        if not mine:
            continue
        title = ("variants at their defaults (no key budget to set)" if board == FIXED
                 else f"keeping {board} of the keys (budget chosen per length)")
        t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
        for key, head, fmt in columns:
            t.add_column(head, justify="left" if fmt is str and key != "rank" else "right", no_wrap=True)
        for r in mine:
            t.add_row(*(_rank_cell(r) if key == "rank" else cell(r[key], fmt) for key, _, fmt in columns))
        console.print(t)
    q = results["quality"]
    base = f"{q['baseline']['ppl']:.2f} on {q['tokens']} held-out tokens" if q.get("baseline") else "not measured"
    console.print(
        f"= : full attention at this length, not ranked. keep: share of causal (query, key) pairs kept. "
        f"err: relative error vs exact attention on real q/k/v. Δln ppl: ln(ppl ÷ {base}). "
        f"fwd×, f+b×: time ÷ SDPA's exact attention at {length} tokens (lower is faster). "
        f"Every column: results.json and report.html.", highlight=False, style="dim")
    line = paths_line(results)
    if line:
        console.print(line, highlight=False)
    problems = failures(results)
    if problems:
        console.print(f"[yellow]{len(problems)} measurements could not run; reasons in results.json and the report.[/yellow]")


def failures(results: dict) -> list[dict]:
    """Every recorded failure: (section, variant, what, reason)."""
    out = []
    for section in ("fidelity", "speed"):
        for r in results[section]:
            if r["error"]:
                what = r.get("source") or f"{r['backend']} {r['pattern']} {r['length']} {r['mode']}"
                out.append({"section": section, "variant": r["variant"], "what": what, "reason": r["error"]})
    out += [{"section": "quality", "variant": r["variant"], "what": "in-model", "reason": r["error"]}
            for r in results["quality"]["rows"] if r["error"]]
    return out


# ---- results.json ---------------------------------------------------------------------------------


def jsonable(x):
    """Plain JSON: NaN/inf become null, tuples lists, anything else its str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def write_json(results: dict, path: Path) -> Path:
    payload = jsonable({**results, "leaderboard": leaderboard(results), "failures": failures(results)})
    path.write_text(json.dumps(payload, indent=1, allow_nan=False))
    return path


# ---- report.html ----------------------------------------------------------------------------------


def write_html(results: dict, path: Path) -> Path:
    plotly_js = _plotly_js()
    figures = _figures(results) if plotly_js else {}
    parts = [_head(results, plotly_js), _summary(results), _leaderboard_html(results)]
    if plotly_js is None:
        parts.append(f"<p class='note'>The plots need plotly: <code>{html.escape(REPORT_INSTALL)}</code>. "
                     "Every number is in the tables below and in results.json.</p>")
    else:
        for div_id, title in PLOTS.items():
            parts.append(f"<h2>{html.escape(title)}</h2>{figures[div_id]}")
    parts += [_table_html("Which CPU path wins", _paths_table(results)),
              _table_html("In-model quality", _quality_table(results)),
              _table_html("Fidelity, every configuration", _fidelity_table(results), collapsed=True),
              _table_html("Speed and memory, every row", _speed_table(results), collapsed=True),
              _table_html("What could not run", _failure_table(results), collapsed=False),
              _methods(results), "</body></html>"]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """results.json, report.html, and budget_sweep.json (the fidelity-vs-budget table per family, budget.py)."""
    from . import budget

    out_dir.mkdir(parents=True, exist_ok=True)
    if results["fidelity"]:
        (out_dir / "budget_sweep.json").write_text(json.dumps(jsonable(budget.sweep(results)), indent=1, allow_nan=False))
    return write_json(results, out_dir / "results.json"), write_html(results, out_dir / "report.html")


def _plotly_js() -> str | None:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        return None
    return get_plotlyjs()


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#222}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{padding:3px 8px;border-bottom:1px solid #eee;
text-align:right;white-space:nowrap}th{background:#f5f5f5;position:sticky;top:0}td.l,th.l{text-align:left}
.note{color:#555;font-size:13px}.meta{font-size:13px;color:#444}details summary{cursor:pointer;font-weight:600}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
td:last-child{white-space:normal;text-align:left;max-width:560px}
.board{display:flex;gap:24px;align-items:flex-start}.legend{font-size:12px;color:#444;max-width:420px}.legend dt{font-weight:600;margin-top:4px}.legend dd{margin:0 0 0 8px}.headline{font-size:15px;background:#f6f8fa;border-left:4px solid #3283FE;padding:8px 12px;margin:12px 0}tr.same td{color:#888}
"""


def _head(results: dict, plotly_js: str | None) -> str:
    script = f"<script type='text/javascript'>{plotly_js}</script>" if plotly_js else ""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>attnzoo bench report</title>"
            f"<style>{STYLE}</style>{script}</head><body>")


def _summary(results: dict) -> str:
    m, meta, cap, q = results["model"], results["meta"], results["capture"], results["quality"]
    v = meta["versions"]
    lines = [
        f"model <b>{html.escape(str(m['name']))}</b>: {m['layers']} layers, {m['q_heads']} query / {m['kv_heads']} "
        f"key-value heads, head dim {m['head_dim']}",
        f"device <b>{html.escape(meta['device'])}</b> ({html.escape(str(meta['device_name']))}, "
        f"{meta['cpu_threads']} threads: {html.escape(meta['cpu_threads_reason'])}), dtype {meta['dtype']}, "
        f"seed {meta['seed']}",
        f"real q/k/v: layers {cap['layers']} on {cap['length']} tokens of standard-library text "
        f"({'read from the cache' if cap['hit'] else 'captured'}); in-model quality on {q['tokens']} held-out tokens; "
        f"budgets compared at {', '.join(boards(results)[:-1]) or 'defaults'} of the keys",
        f"attnzoo {v['attnzoo']}, torch {v['torch']}, transformers {v['transformers']}, python {v['python']}; "
        f"started {meta['started']}, took {results['timings_s']['total']:.0f} s",
    ]
    return (f"<h1>attnzoo bench</h1><p class='headline'>{html.escape(headline(results))}</p>"
            "<div class='meta'>" + "<br>".join(lines) + "</div>")


def _methods(results: dict) -> str:
    meta = results["meta"]
    return ("<h2>How it was measured</h2><ul class='note'>"
            "<li>Error: ||o − o_exact|| / ||o_exact|| against exact softmax attention in float64 on the same q/k/v; "
            "cosine: mean over heads and queries of the cosine between output rows; mass kept: share of the exact "
            "softmax probability on the keys the variant allows. Real q/k/v are post-RoPE activations captured "
            "from the model; noise is standard Gaussian q/k/v of the same shape, whose attention is nearly "
            "uniform, unlike a real model's.</li>"
            "<li>In-model: next-token loss with the variant in every layer at its default parameters, vs the "
            "unchanged model on the same held-out tokens.</li>"
            f"<li>Time: median of repeated calls after a warm-up ({html.escape(meta['timer'])}); first call (compiles, "
            "block masks) reported apart. Ratios are to PyTorch SDPA computing exact attention in the same pattern, "
            "length and mode, measured in the same run.</li>"
            f"<li>Memory: {html.escape(meta['memory_method'])}.</li>"
            "<li>Patterns: self is Sq = Sk = length; cross is the last length/4 queries against all keys "
            "(bottom-right aligned when causal).</li></ul>")


def _table_html(title: str, table: str, collapsed: bool = False) -> str:
    if collapsed:
        return f"<h2>{html.escape(title)}</h2><details><summary>show</summary>{table}</details>"
    return f"<h2>{html.escape(title)}</h2>{table}"


def html_table(headers: list[str], rows: list[list], left: int = 1) -> str:
    """An HTML table (the first `left` columns left-aligned), cells escaped: every report's tables."""
    head = "".join(f"<th class='{'l' if i < left else ''}'>{html.escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{html.escape(str(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _leaderboard_html(results: dict) -> str:
    """Per board: the table, and beside it what each column means."""
    keys = ("rank", "variant", "family", "budget", "kept", "err_captured", "err_gaussian", "cosine", "mass_kept",
            "ppl_ratio", "delta_loss", "fwd_vs_sdpa", "fwd_bwd_vs_sdpa", "fwd_vs_sdpa_mask", "memory_vs_sdpa",
            "speed_budget", "path")
    columns = [c for c in COLUMNS if c[0] in keys]
    legend = "<dl class='legend'>" + "".join(
        f"<dt>{html.escape(head)}</dt><dd>{html.escape(LEGEND[head])}</dd>" for _, head, _ in columns
        if head in LEGEND) + "</dl>"
    rows = leaderboard(results)
    length = max(results["config"]["lengths"])
    out = ["<h2>Leaderboard</h2>",
           f"<p class='note'>Speed columns at {length} tokens, in each variant's own pattern. Variants with a key "
           "budget are compared where they keep the same share of the keys (the budget is chosen per length); "
           "the others at their defaults.</p>"]
    for i, board in enumerate(boards(results)):
        mine = [r for r in rows if r["board"] == board]
        if not mine:
            continue
        title = "At their defaults (no key budget)" if board == FIXED else f"Keeping {board} of the keys"
        head = "".join(f"<th class='{'' if fmt is not str or key == 'rank' else 'l'}'>{html.escape(t)}</th>"
                       for key, t, fmt in columns)
        body = []
        for r in mine:
            cls = " class='same'" if r["equals_full"] is not None else ""
            tip = f" title='{html.escape(r['equals_full'])}'" if r["equals_full"] else ""
            cells = []
            for key, _, fmt in columns:
                value = _rank_cell(r) if key == "rank" else cell(r[key], fmt)
                left = fmt is str and key != "rank"
                cells.append(f"<td class='{'l' if left else ''}'>{html.escape(value)}</td>")
            body.append(f"<tr{cls}{tip}>{''.join(cells)}</tr>")
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        out.append(f"<h3>{html.escape(title)}</h3><div class='board'>{table}{legend if i == 0 else ''}</div>")
    return "\n".join(out)


def _quality_table(results: dict) -> str:
    q = results["quality"]
    if not q.get("baseline"):
        return "<p class='note'>Not measured in this run.</p>"
    rows = [["(unchanged model)", "", cell(q["baseline"]["loss"], "{:.4f}"), cell(q["baseline"]["ppl"], "{:.3f}"),
             "", "", ""]]
    rows += [[r["variant"], _params_text(r.get("params")) + (f" (keeps {fraction_label(r['keep_target'])})"
                                                              if r.get("keep_target") else ""),
              cell(r["loss"], "{:.4f}"), cell(r["ppl"], "{:.3f}"), cell(r.get("ppl_ratio"), "{:.4g}"),
              cell(r["delta_loss"], "{:+.4f}"), r["error"] or ""] for r in q["rows"]]
    return html_table(["variant", "configuration", "loss", "ppl", "ppl ×", "Δln ppl", "error"], rows, left=2)


def _params_text(params) -> str:
    return ", ".join(f"{k}={v}" for k, v in (params or {}).items()) or "defaults"


def _fidelity_table(results: dict) -> str:
    rows = [[r["variant"], r["source"], r["pattern"] or "", "default" if r["default"] else "",
             "" if r["budget"] is None else f"{r['budget_param']}={r['budget']}",
             fraction_label(r["keep_target"]) if r.get("keep_target") else "", cell(r.get("kept"), "{:.3f}"),
             cell(r.get("rel_err"), "{:.3e}"), cell(r.get("cosine"), "{:.5f}"), cell(r.get("mass_kept"), "{:.4f}"),
             cell(r.get("full_diff"), "{:.2e}"),
             r["error"] or r.get("equals_full") or r.get("mass_note") or ""]
            for r in results["fidelity"]]
    return html_table(["variant", "source", "pattern", "", "budget", "for", "keep", "error", "cosine", "mass kept",
                   "vs full", "note"], rows, left=5)


def _speed_table(results: dict) -> str:
    rows = [[r["variant"], r["backend"], r.get("path") or "", _params_text(r["params"]), r["pattern"], r["mode"],
             r["length"], cell(r.get("median_ms"), "{:.2f}"), cell(r.get("first_ms"), "{:.1f}"),
             cell(r.get("time_vs_sdpa"), "{:.2f}"), cell(r.get("time_vs_sdpa_mask"), "{:.2f}"),
             cell(r.get("time_vs_flex"), "{:.2f}"), cell(r.get("peak_mib"), "{:.1f}"),
             cell(r.get("memory_vs_sdpa_mask"), "{:.2g}"), cell(r.get("tflops"), "{:.3f}"), r.get("inputs") or "",
             r["error"] or ""] for r in results["speed"]]
    return html_table(["variant", "backend", "path", "configuration", "pattern", "mode", "length", "median ms",
                   "first ms", "×sdpa", "×sdpa mask", "×flex", "peak MiB", "mem ×mask", "TFLOP/s", "inputs", "error"],
                  rows, left=6)


def path_summary(results: dict) -> list[dict]:
    """Per (variant, configuration, pattern, length, mode) timed on several paths (it has a torch:tiles
    row): every path's time and peak memory as ratios to SDPA given the dense mask (where timed) and to
    SDPA's exact attention, and the fastest path."""
    from .speed import SDPA_MASK, TILES

    ok = [r for r in results["speed"] if r["error"] is None]
    out = []
    for t in (r for r in ok if r["backend"] == TILES):
        shape = (t["variant"], t["pattern"], t["length"], t["mode"])
        same = [r for r in ok if (r["variant"], r["pattern"], r["length"], r["mode"]) == shape
                and r["params"] == t["params"]]
        m = next((r for r in same if r["backend"] == SDPA_MASK), None)
        sdpa = next((r for r in ok if r["variant"] == "full" and r["backend"] == "sdpa" and
                     (r["pattern"], r["length"], r["mode"]) == shape[1:]), None)
        paths = {}
        for r in same:
            label = "torch fused" if r.get("path") == "fused" else "torch tiles" if r.get("path") == "tiles" else \
                r["backend"]
            if r["variant"] == "full" and r["backend"] == "sdpa":
                continue  # the anchor itself, below
            paths[label] = {"ms": r["median_ms"], "peak_mib": r["peak_mib"],
                            "vs_mask": r["median_ms"] / m["median_ms"] if m else None,
                            "vs_sdpa": r["median_ms"] / sdpa["median_ms"] if sdpa else None,
                            "mem_vs_mask": r.get("memory_vs_sdpa_mask"), "mem_vs_sdpa": r.get("memory_vs_sdpa")}
        if sdpa:
            paths["sdpa (full, no mask)"] = {"ms": sdpa["median_ms"], "peak_mib": sdpa["peak_mib"],
                                             "vs_mask": sdpa["median_ms"] / m["median_ms"] if m else None,
                                             "vs_sdpa": 1.0, "mem_vs_mask": None, "mem_vs_sdpa": 1.0}
        candidates = {k: v for k, v in paths.items() if not k.startswith("sdpa (full") or t["variant"] == "full"}
        out.append({"variant": t["variant"], "params": t["params"], "keep_target": t.get("keep_target"),
                    "pattern": t["pattern"], "length": t["length"], "mode": t["mode"], "paths": paths,
                    "fastest": min(candidates, key=lambda k: candidates[k]["ms"]) if candidates else None})
    return out


def _paths_table(results: dict) -> str:
    rows = []
    for s_ in path_summary(results):
        p = s_["paths"]

        def ratio(label, key="vs_mask", fmt="{:.2f}"):
            return cell(p.get(label, {}).get(key), fmt)

        rows.append([s_["variant"], _params_text(s_["params"]), s_["pattern"], s_["mode"], s_["length"],
                     s_["fastest"] or "", ratio("torch fused"), ratio("torch tiles"),
                     ratio("torch fused", "vs_sdpa"), ratio("torch tiles", "vs_sdpa"), ratio("sdpa_mask", "vs_sdpa"),
                     ratio("torch fused", "mem_vs_mask", "{:.2g}"), ratio("torch tiles", "mem_vs_mask", "{:.2g}"),
                     cell(p.get("sdpa_mask", {}).get("peak_mib"), "{:.1f}")])
    if not rows:
        return "<p class='note'>No path comparison in this run (it needs the torch backend on CPU).</p>"
    return ("<p class='note'>Same configuration, same inputs, same run. Time ÷ SDPA given the dense boolean mask "
            "(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), the mask built beforehand) and ÷ SDPA's exact "
            "attention without a mask; peak memory ÷ the masked SDPA's. Lower is better.</p>" +
            html_table(["variant", "configuration", "pattern", "mode", "length", "fastest", "fused ×mask", "tiles ×mask",
                    "fused ×sdpa", "tiles ×sdpa", "mask ×sdpa", "fused mem ×mask", "tiles mem ×mask",
                    "mask peak MiB"], rows, left=4))


def _failure_table(results: dict) -> str:
    rows = [[f["section"], f["variant"], f["what"], f["reason"]] for f in failures(results)]
    return html_table(["section", "variant", "what", "reason"], rows, left=4) if rows else "<p class='note'>Nothing.</p>"


# ---- plots ----------------------------------------------------------------------------------------


def _figures(results: dict) -> dict[str, str]:
    builders = {"plot-fidelity-speed": _fidelity_speed_figure, "plot-error-budget": _budget_figure,
                "plot-paths": _paths_figure,
                "plot-time-length": lambda r: _length_figure(r, "median_ms", "ms"),
                "plot-memory-length": lambda r: _length_figure(r, "peak_mib", "peak MiB"),
                "plot-ppl-delta": _ppl_figure}
    return {div_id: build(results).to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                                           config={"displaylogo": False, "responsive": True})
            for div_id, build in builders.items()}


def palette() -> list[str]:
    """Distinct colours for many traces: plotly's Alphabet (26), then Dark24 and Light24."""
    from plotly.colors import qualitative

    return list(qualitative.Alphabet) + list(qualitative.Dark24) + list(qualitative.Light24)


DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def _styles(keys) -> dict:
    """(colour, dash) per key: every key gets its own colour while the palette lasts, then dashes vary."""
    colours = palette()
    return {k: (colours[i % len(colours)], DASHES[(i // len(colours)) % len(DASHES)])
            for i, k in enumerate(dict.fromkeys(keys))}


def _colors(keys) -> dict:
    return {k: c for k, (c, _) in _styles(keys).items()}


BOARD_SYMBOLS = ("circle", "diamond", "triangle-up", "star", "hexagon")


def _variant_colors(results: dict) -> dict:
    """One colour per variant, the same in every plot."""
    return _colors(results["variants"])


def _fidelity_speed_figure(results: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    board = [r for r in leaderboard(results) if r["fwd_vs_sdpa"] is not None and r["err_captured"] is not None]
    families = sorted({r["family"] for r in board}) or ["(none)"]
    cols = min(2, len(families))
    n_rows = -(-len(families) // cols)
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=families, horizontal_spacing=0.08)
    color = _variant_colors(results)
    symbols = {b: BOARD_SYMBOLS[i % len(BOARD_SYMBOLS)] for i, b in enumerate(boards(results))}
    shown = set()
    for i, fam in enumerate(families):
        row, col = i // cols + 1, i % cols + 1
        for r in (r for r in board if r["family"] == fam):
            label = "defaults" if r["board"] == FIXED else f"keeps {r['board']}"
            fig.add_trace(go.Scatter(
                x=[r["fwd_vs_sdpa"]], y=[max(r["err_captured"], LOG_FLOOR)], mode="markers", name=r["variant"],
                legendgroup=r["variant"], showlegend=r["variant"] not in shown,
                marker=dict(symbol=symbols[r["board"]] + ("-open" if r["equals_full"] else ""), size=11,
                            color=color.get(r["variant"]), line=dict(width=2)),
                hovertemplate=f"{r['variant']} ({label}{'; = full' if r['equals_full'] else ''})<br>error %{{y:.3e}}"
                              f"<br>forward %{{x:.2f}}× SDPA ({r['backend']} {r['path'] or ''}, length "
                              f"{r['speed_length']})<extra></extra>"), row=row, col=col)
            shown.add(r["variant"])
        fig.update_xaxes(type="log", title_text="forward time / SDPA", row=row, col=col)
        fig.update_yaxes(type="log", title_text="relative error (real q/k/v)", row=row, col=col)
    marks = ", ".join(f"{'○' if False else ''}{s_} {'defaults' if b == FIXED else 'keeps ' + b}"
                      for b, s_ in symbols.items())
    fig.update_layout(height=440 * n_rows, margin=dict(t=70, b=40), legend=dict(title="variant (click to hide)"),
                      title=f"markers: {marks}; open = full attention at this length")
    return fig


def _budget_figure(results: dict):
    """Error and mass kept against the measured share of the keys kept, a row of panels per family, with the
    top-k oracle (budget.py)."""
    from . import budget

    return budget.figure(results, _variant_colors(results), LOG_FLOOR)


def _paths_figure(results: dict):
    """Per variant, each path's time and peak memory ÷ SDPA with the dense mask, at the longest length."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    summary = path_summary(results)
    modes = [m for m in results["config"]["modes"] if any(s_["mode"] == m for s_ in summary)] or ["fwd"]
    fig = make_subplots(rows=2, cols=len(modes), shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"time · {m}" for m in modes] + [f"peak memory · {m}" for m in modes])
    labels = ("torch fused", "torch tiles", "sdpa (full, no mask)")
    color = dict(zip(labels, ("#3283FE", "#F6222E", "#565656")))
    for j, mode in enumerate(modes, start=1):
        mine = [s_ for s_ in summary if s_["mode"] == mode]
        if not mine:
            continue
        longest = max(s_["length"] for s_ in mine)
        mine = [s_ for s_ in mine if s_["length"] == longest]
        xs = [f"{s_['variant']} ({_params_text(s_['params'])})" for s_ in mine]
        for label in labels:
            for row, key in ((1, "vs_mask"), (2, "mem_vs_mask")):
                ys = [s_["paths"].get(label, {}).get(key) for s_ in mine]
                if all(y is None for y in ys):
                    continue
                fig.add_trace(go.Bar(x=xs, y=ys, name=label, legendgroup=label, marker_color=color[label],
                                     showlegend=(j, row) == (1, 1),
                                     hovertemplate=f"{label}<br>%{{x}}<br>%{{y:.2f}}× SDPA with the dense mask "
                                                   f"({mode}, {longest} tokens)<extra></extra>"), row=row, col=j)
        fig.add_hline(y=1.0, line_dash="dash", line_color="black", row=1, col=j)
        fig.add_hline(y=1.0, line_dash="dash", line_color="black", row=2, col=j)
    fig.update_yaxes(type="log", title_text="÷ SDPA with the dense mask", col=1)
    fig.update_yaxes(type="log")
    fig.update_layout(barmode="group", height=760, margin=dict(t=60, b=160), xaxis_tickangle=-45,
                      title="below 1: faster / smaller than F.scaled_dot_product_attention(q, k, v, attn_mask=mask)")
    return fig


def _length_figure(results: dict, key: str, unit: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cfg = results["config"]
    ok = [r for r in results["speed"] if r["error"] is None and r.get(key) is not None]
    patterns = [p for p in (cfg["patterns"] or sorted({r["pattern"] for r in ok})) if any(r["pattern"] == p for r in ok)]
    patterns = patterns or ["causal_self"]
    modes = cfg["modes"]
    first = {}  # each variant's first budget (its defaults when it has none): one line per variant and backend
    for r in ok:
        first.setdefault(r["variant"], r.get("keep_target"))
    ok = [r for r in ok if r.get("keep_target") == first[r["variant"]]]
    series = sorted({(r["variant"], r["backend"]) for r in ok}, key=lambda s_: (s_[0] != "full", s_))
    styles = _styles(series)
    fig = make_subplots(rows=len(modes), cols=len(patterns), horizontal_spacing=0.05, vertical_spacing=0.12,
                        subplot_titles=[f"{p.replace('_', ' ')} · {m}" for m in modes for p in patterns])
    for i, mode in enumerate(modes):
        for j, pattern in enumerate(patterns):
            for s_ in series:
                pts = sorted((r for r in ok if (r["variant"], r["backend"]) == s_ and r["pattern"] == pattern
                              and r["mode"] == mode), key=lambda r: r["length"])
                if not pts:
                    continue
                label = f"{s_[0]} · {s_[1]}"
                colour, dash = styles[s_]
                if s_[1].startswith("sdpa"):
                    dash = "dot"
                keep = pts[0].get("keep_target")
                fig.add_trace(go.Scatter(
                    x=[r["length"] for r in pts], y=[r[key] for r in pts], mode="lines+markers", name=label,
                    legendgroup=label, showlegend=(i, j) == (0, 0), line=dict(color=colour, dash=dash),
                    hovertemplate=f"{label} ({'keeps ' + fraction_label(keep) if keep else 'defaults'})<br>"
                                  f"%{{x}} tokens: %{{y:.3g}} {unit}<extra></extra>"),
                    row=i + 1, col=j + 1)
    lengths = sorted({r["length"] for r in ok}) or sorted(cfg["lengths"])
    fig.update_xaxes(type="log", title_text="length", tickmode="array", tickvals=lengths,
                     ticktext=[str(n) for n in lengths])
    fig.update_yaxes(type="log", title_text=unit, col=1)
    fig.update_yaxes(type="log")
    fig.update_layout(height=380 * len(modes) + 120, margin=dict(t=60), legend=dict(orientation="h", y=-0.15),
                      title="each variant at its first compared budget (or its defaults); dotted: SDPA rows")
    return fig


def _ppl_figure(results: dict):
    """Bars of ln(ppl / ppl of the unchanged model), nats per token, per variant and budget: perplexity
    ratios span orders of magnitude (a RoPE model given ALiBi breaks down), so a linear Δppl axis would
    hide all but the worst variant."""
    import plotly.graph_objects as go

    q = results["quality"]
    rows = sorted((r for r in q["rows"] if r["delta_loss"] is not None), key=lambda r: r["delta_loss"])
    color = _variant_colors(results)
    labels = [r["variant"] + (f" @{fraction_label(r['keep_target'])}" if r.get("keep_target") else "") for r in rows]
    fig = go.Figure(go.Bar(
        x=labels, y=[r["delta_loss"] for r in rows], marker_color=[color.get(r["variant"]) for r in rows],
        customdata=[[r["ppl"], r.get("ppl_ratio") or math.exp(r["delta_loss"]), _params_text(r.get("params")),
                     r["tokens"]] for r in rows],
        hovertemplate="%{x} (%{customdata[2]})<br>Δln ppl %{y:+.4f} nats/token<br>ppl %{customdata[0]:.3f} "
                      "(×%{customdata[1]:.3g}) on %{customdata[3]} tokens<extra></extra>"))
    base = f"{q['baseline']['ppl']:.3f}" if q.get("baseline") else "–"
    fig.update_layout(height=460, yaxis_title="ln(ppl ÷ unchanged ppl), nats/token", margin=dict(t=60, b=140),
                      xaxis_tickangle=-45,
                      title=f"every layer replaced; @1/4: the budget keeping 1/4 of the keys; unchanged model: ppl "
                            f"{base} on {q['tokens']} held-out tokens")
    return fig
