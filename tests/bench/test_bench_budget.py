"""The fidelity-vs-budget table and plot per family (bench/budget.py), on hand-made results and on a tiny
fidelity run of real variants; the top-k oracle joins any run that measures a content-sparse variant."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from attnzoo.bench import budget
from attnzoo.bench import run as bench_run


def _row(variant, source, budget_value, kept, rel_err, mass, default=False):
    return {"variant": variant, "source": source, "error": None, "budget": budget_value, "budget_param": "top_k",
            "kept": kept, "rel_err": rel_err, "mass_kept": mass, "default": default}


def _results(rows, families):
    return {"fidelity": rows, "capture": {"length": 64}, "config": {"keep_fractions": [0.25, 0.125]},
            "variants": {n: {"info": {"family": f}} for n, f in families.items()}}


def test_sweep_groups_by_family_and_interpolates_the_oracle_at_each_share():
    rows = [_row("topk", "captured", 4, 0.1, 0.4, 0.6), _row("topk", "captured", 16, 0.4, 0.1, 0.9),
            _row("moba", "captured", 1, 0.2, 0.5, 0.5, default=True), _row("moba", "captured", 2, 0.4, 0.3, 0.7),
            _row("moba", "captured", 8, 1.0, 0.0, 1.0), _row("moba", "captured", 0, 0.05, 0.8, 0.2),
            _row("sliding_window", "captured", 8, 0.2, 0.6, 0.4), _row("sliding_window", "captured", 32, 0.5, 0.2, 0.8)]
    table = budget.sweep(_results(rows, {"topk": "sparse", "moba": "sparse", "sliding_window": "masks"}))
    assert table["oracle"] == "topk" and list(table["families"]) == ["masks", "sparse"]
    moba = table["families"]["sparse"]["moba"]["points"]["captured"]
    assert [p["kept"] for p in moba] == [0.05, 0.2, 0.4, 1.0]
    assert moba[0]["oracle_rel_err"] is None                         # below the oracle's smallest share
    t = (torch.tensor(0.2).log() - torch.tensor(0.1).log()) / (torch.tensor(0.4).log() - torch.tensor(0.1).log())
    assert moba[1]["oracle_rel_err"] == pytest.approx(0.4 + float(t) * (0.1 - 0.4))
    assert moba[2]["oracle_mass_kept"] == pytest.approx(0.9)
    assert moba[3]["oracle_rel_err"] == 0.0 and moba[3]["oracle_mass_kept"] == 1.0   # every key: exact
    window = table["families"]["masks"]["sliding_window"]["points"]["captured"]
    assert window[0]["oracle_mass_kept"] is not None                 # the oracle bounds every family


def test_figure_has_a_row_per_family_and_the_oracle_in_each():
    pytest.importorskip("plotly")
    rows = [_row("topk", "captured", 4, 0.1, 0.4, 0.6), _row("topk", "captured", 16, 0.4, 0.1, 0.9),
            _row("moba", "captured", 2, 0.4, 0.3, 0.7), _row("moba", "gaussian", 2, 0.4, 0.2, 0.8),
            _row("sliding_window", "captured", 8, 0.2, 0.6, 0.4)]
    fig = budget.figure(_results(rows, {"topk": "sparse", "moba": "sparse", "sliding_window": "masks"}), {}, 1e-12)
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:4] == ["masks: relative error", "masks: exact attention mass kept", "sparse: relative error",
                          "sparse: exact attention mass kept"]
    oracle = [t for t in fig.data if t.name.startswith("topk")]
    assert {(t.xaxis, t.yaxis) for t in oracle} == {("x", "y"), ("x2", "y2"), ("x3", "y3"), ("x4", "y4")}
    assert any(t.name == "moba (top_k) · noise" for t in fig.data)


def test_a_tiny_fidelity_run_adds_the_oracle_and_no_variant_keeps_more_mass_than_it():
    """Two content-sparse variants on small random q/k/v at 64 tokens: the oracle is measured beside them, no
    variant keeps more mass than the oracle at its share, and the table and its plot are built."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 64, 16, generator=g) for _ in range(3))
    config = bench_run.Config(variants=["moba", "longheads"], text_length=64, sweep_points=2)
    rows = bench_run._fidelity(["moba", "longheads"], (q, k[:, :1].expand(1, 3, 64, 16), v), config, torch.float32,
                               bench_run.Steps())
    assert {r["variant"] for r in rows} == {"moba", "longheads", "topk"} and all(r["error"] is None for r in rows)
    results = _results(rows, {"moba": "sparse", "longheads": "sparse"})
    table = budget.sweep(results)
    for name in ("moba", "longheads"):
        for p in table["families"]["sparse"][name]["points"]["captured"]:
            if p["oracle_mass_kept"] is not None:
                assert p["mass_kept"] <= p["oracle_mass_kept"] + 0.05, (name, p)
    json.dumps(table, allow_nan=False)
    if importlib.util.find_spec("plotly") is not None:
        assert "sparse: relative error" in budget.figure(results, {}, 1e-12).to_html(full_html=False)
