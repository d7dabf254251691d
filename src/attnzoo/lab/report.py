"""Self-contained HTML reports (plotly inlined, as the bench's) and results.json for the lab commands."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from ..bench.report import REPORT_INSTALL
from ..bench.report import html_table as table  # noqa: F401  (the lab commands' tables)

STYLE = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}table{border-collapse:collapse;"
         "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
         ".l{text-align:left}.note{color:#555;font-size:90%}")


def line_figure(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, log_y: bool = False,
                width: int = 760, height: int = 400):
    """A plotly figure of named series of (x, y) points (non-finite points, and non-positive ones on a
    log axis, left out)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, pts in series.items():
        good = [(x, y) for x, y in pts if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
        fig.add_scatter(x=[x for x, _ in good], y=[y for _, y in good], name=name,
                        mode="lines+markers" if len(good) < 40 else "lines")
    fig.update_layout(width=width, height=height, xaxis_title=x_label, yaxis_title=y_label,
                      yaxis_type="log" if log_y else "linear", margin=dict(l=60, r=20, t=20, b=50))
    return fig


def line_plot(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, log_y: bool = False) -> str:
    """`line_figure` as an HTML div (`write` inlines plotly's script once); without plotly, a note
    saying how to get the plots (the tables stay)."""
    try:
        fig = line_figure(series, x_label, y_label, log_y)
    except ImportError:
        return f"<p class='note'>(plots need plotly: <code>{html.escape(REPORT_INSTALL)}</code>)</p>"
    return fig.to_html(full_html=False, include_plotlyjs=False)


def _plotly_script() -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        return ""
    return f"<script>{get_plotlyjs()}</script>"


def write(out_dir: Path, results: dict, title: str, sections: list[str]) -> tuple[Path, Path]:
    """results.json and report.html (the title and the given HTML sections) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                         f"<style>{STYLE}</style>{_plotly_script()}</head><body><h1>{html.escape(title)}</h1>{''.join(sections)}"
                         "</body></html>", encoding="utf-8")
    return json_path, html_path
