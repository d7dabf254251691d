"""Fidelity vs budget, per family: every budgeted variant's sweep (relative error and exact attention mass
kept against the share of the keys it keeps, on real and on noise q/k/v), beside the top-k oracle at the
same shares (no selection of that many keys keeps more mass; keeping every key it is exact).

`sweep(results)` is the table (written as budget_sweep.json beside results.json); `figure(results)` draws
it, one row of panels per family. The oracle's numbers at a variant's share are interpolated (linearly in
log share) between the oracle's own sweep points, and None outside them."""
from __future__ import annotations

import math

ORACLE = "topk"
SOURCES = {"captured": "real", "gaussian": "noise"}


def _swept_rows(results: dict) -> list[dict]:
    return [r for r in results["fidelity"] if r["error"] is None and r["budget"] is not None and r.get("kept")]


def _family(results: dict, name: str) -> str:
    entry = results["variants"].get(name)
    if entry is not None:
        return entry["info"]["family"]
    from ..core.api import variant_class

    return variant_class(name).class_info().family


def _interpolate(points: list[tuple[float, float | None]], x: float) -> float | None:
    """y at x, linear in log x between the (x, y) points (sorted by x), None outside them or where y is."""
    pts = [(px, py) for px, py in points if py is not None and px > 0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return pts[0][1] if len(pts) == 1 and math.isclose(pts[0][0], x) else None


def sweep(results: dict) -> dict:
    """{'length', 'oracle', 'families': {family: {variant: {'budget_param', 'points': {source: [point]}}}}},
    each point {budget, kept, rel_err, mass_kept, oracle_rel_err, oracle_mass_kept}, ascending in kept."""
    rows = _swept_rows(results)
    by_source = {}
    for source in SOURCES:
        oracle = sorted((r for r in rows if r["variant"] == ORACLE and r["source"] == source), key=lambda r: r["kept"])
        # keeping every key, the oracle is exact attention: the curve's right end
        by_source[source] = {key: [(r["kept"], r[key]) for r in oracle if r["kept"] < 1] + [(1.0, exact)]
                             for key, exact in (("rel_err", 0.0), ("mass_kept", 1.0))} if oracle else \
            {"rel_err": [], "mass_kept": []}
    families: dict = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        if not any(not r["default"] for r in mine):
            continue  # one configuration is not a sweep
        entry = {"budget_param": mine[0]["budget_param"], "points": {}}
        for source in SOURCES:
            pts = sorted((r for r in mine if r["source"] == source), key=lambda r: r["kept"])
            oracle = by_source[source]
            entry["points"][source] = [
                {"budget": r["budget"], "kept": r["kept"], "rel_err": r["rel_err"], "mass_kept": r["mass_kept"],
                 "oracle_rel_err": None if name == ORACLE else _interpolate(oracle["rel_err"], r["kept"]),
                 "oracle_mass_kept": None if name == ORACLE else _interpolate(oracle["mass_kept"], r["kept"])}
                for r in pts]
        families.setdefault(_family(results, name), {})[name] = entry
    return {"length": results["capture"]["length"], "oracle": ORACLE if any(r["variant"] == ORACLE for r in rows)
            else None, "families": dict(sorted(families.items()))}


def figure(results: dict, colors: dict, log_floor: float):
    """Per family a row of two panels (relative error, mass kept) against the share of the keys kept: each
    variant solid on real q/k/v, dashed on noise; the top-k oracle in black in every family's panels."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    table = sweep(results)
    families = list(table["families"]) or ["(no budgeted variant)"]
    oracle = next((fam[ORACLE] for fam in table["families"].values() if ORACLE in fam), None)
    fig = make_subplots(rows=len(families), cols=2, horizontal_spacing=0.08, vertical_spacing=0.12 / len(families),
                        subplot_titles=[f"{f}: {what}" for f in families
                                        for what in ("relative error", "exact attention mass kept")])
    for row, family in enumerate(families, start=1):
        members = table["families"].get(family, {})
        curves = [(n, e, colors.get(n)) for n, e in members.items() if n != ORACLE]
        if oracle is not None:
            curves.append((ORACLE, oracle, "#000000"))
        for name, entry, color in curves:
            for source, dash in (("captured", "solid"), ("gaussian", "dash")):
                pts = entry["points"].get(source) or []
                if not pts:
                    continue
                label = f"{name} ({entry['budget_param']}) · {SOURCES[source]}"
                for col, key in ((1, "rel_err"), (2, "mass_kept")):
                    ys = [p[key] if p[key] is None or col == 2 else max(p[key], log_floor) for p in pts]
                    fig.add_trace(go.Scatter(
                        x=[p["kept"] for p in pts], y=ys, mode="lines+markers", name=label, legendgroup=label,
                        showlegend=col == 1 and (name != ORACLE or row == 1),
                        line=dict(color=color, dash=dash, width=3 if name == ORACLE else 2),
                        customdata=[[p["budget"]] for p in pts],
                        hovertemplate=f"{name} ({family})<br>{entry['budget_param']}=%{{customdata[0]}}<br>keeps "
                                      f"%{{x:.3f}} of the keys<br>%{{y:.3g}}<extra></extra>"), row=row, col=col)
        fig.update_yaxes(type="log", row=row, col=1)
        fig.update_yaxes(range=[0, 1.02], row=row, col=2)
    for f in results["config"].get("keep_fractions") or []:
        fig.add_vline(x=f, line_dash="dot", line_color="#999")
    fig.update_xaxes(type="log", title_text="share of the keys kept (measured on the mask)")
    fig.update_layout(height=max(420, 330 * len(families)), margin=dict(t=70), legend=dict(orientation="h", y=-0.08),
                      title=f"budget sweep at {table['length']} tokens, per family: solid real q/k/v, dashed noise; "
                            f"black: the top-k oracle; dotted lines: the shares the leaderboard compares")
    return fig
