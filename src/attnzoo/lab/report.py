"""Self-contained HTML reports with inline SVG line plots (no plotting dependency) and results.json."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse;"
         "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
         ".l{text-align:left}.note{color:#555;font-size:90%}")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def line_plot(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, log_y: bool = False,
              width: int = 720, height: int = 380) -> str:
    """An SVG plot of named series of (x, y) points, with axes, ticks and a legend."""
    pts = [(x, y) for s in series.values() for x, y in s if y is not None and math.isfinite(y)]
    if not pts:
        return "<p class='note'>(nothing to plot)</p>"
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [p[0] for p in pts], [fy(p[1]) for p in pts if not log_y or p[1] > 0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 70, 180, 15, 45
    pw, ph = width - left - right, height - top - bottom

    def sx(v):
        return left + (v - x0) / (x1 - x0) * pw

    def sy(v):
        return top + (1 - (fy(v) - y0) / (y1 - y0)) * ph

    out = [f"<svg width='{width}' height='{height}' font-size='11' xmlns='http://www.w3.org/2000/svg'>",
           f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>"]
    for t in _ticks(x0, x1):
        out.append(f"<line x1='{sx(t):.1f}' x2='{sx(t):.1f}' y1='{top + ph}' y2='{top + ph + 4}' stroke='#999'/>"
                   f"<text x='{sx(t):.1f}' y='{top + ph + 16}' text-anchor='middle'>{t:g}</text>")
    for t in _ticks(y0, y1):
        label = f"{10 ** t:.3g}" if log_y else f"{t:g}"
        y = top + (1 - (t - y0) / (y1 - y0)) * ph
        out.append(f"<line x1='{left - 4}' x2='{left + pw}' y1='{y:.1f}' y2='{y:.1f}' stroke='#eee'/>"
                   f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{label}</text>")
    out.append(f"<text x='{left + pw / 2}' y='{height - 8}' text-anchor='middle'>{html.escape(x_label)}</text>"
               f"<text x='14' y='{top + ph / 2}' transform='rotate(-90 14 {top + ph / 2})' text-anchor='middle'>"
               f"{html.escape(y_label)}{' (log)' if log_y else ''}</text>")
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        good = [(x, y) for x, y in s if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        out.append(f"<polyline points='{path}' fill='none' stroke='{c}' stroke-width='1.8'/>")
        if len(good) < 40:
            out += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{c}'/>" for x, y in good]
        ly = top + 12 + 16 * i
        out.append(f"<line x1='{left + pw + 10}' x2='{left + pw + 28}' y1='{ly - 4}' y2='{ly - 4}' stroke='{c}' "
                   f"stroke-width='2'/><text x='{left + pw + 32}' y='{ly}'>{html.escape(name)}</text>")
    out.append("</svg>")
    return "".join(out)


def table(headers: list[str], rows: list[list], left: int = 1) -> str:
    def cell(i, v, tag):
        return f"<{tag} class='{'l' if i < left else ''}'>{html.escape(str(v))}</{tag}>"

    head = "".join(cell(i, h, "th") for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell(i, v, "td") for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write(out_dir: Path, results: dict, title: str, sections: list[str]) -> tuple[Path, Path]:
    """results.json and report.html (the title and the given HTML sections) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}"
                         "</body></html>", encoding="utf-8")
    return json_path, html_path
