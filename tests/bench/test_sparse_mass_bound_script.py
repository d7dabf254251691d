"""benchmarks/sparse_mass_bound.py: the oracle's frontier goes from nothing to all the mass, counts every causal pair
once per head at every granularity, inverts between mass and share, and bounds what real selections keep at their
share of the causal pairs."""
from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import attnzoo as az
from attnzoo.variants.sparse import minference as mi

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse_mass_bound.py"
S, H, HKV, D = 200, 4, 2, 16   # not a multiple of the 64- and 128-key blocks


@pytest.fixture(scope="module")
def script():
    return SimpleNamespace(**runpy.run_path(str(SCRIPT), run_name="sparse_mass_bound"))


@pytest.fixture(scope="module")
def qk():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, H, S, D, generator=g) * 2, torch.randn(1, HKV, S, D, generator=g) * 2


def test_frontier_counts_every_pair_and_reaches_all_mass(script, qk):
    hists = script.layer_histograms(*qk)
    causal_pairs = H * S * (S + 1) / 2
    for name, hist in hists.items():
        assert float(hist.pairs.sum()) == pytest.approx(causal_pairs, rel=1e-12), name
        share, mass = hist.frontier(H * S)
        assert float(share[0]) == 0 and float(mass[0]) == 0
        assert float(share[-1]) == pytest.approx(1.0) and float(mass[-1]) == pytest.approx(1.0, rel=1e-6), name   # float32 softmax
        assert bool((share.diff() >= 0).all() and (mass.diff() >= 0).all())
        for p in (0.5, 0.9, 0.99):
            x = script.share_for(share, mass, p)
            assert script.mass_at(share, mass, x) == pytest.approx(p, abs=1e-9), name


def test_finer_granularity_never_keeps_less(script, qk):
    result = script.measure(*qk)
    order = ["keys", "query x block64", "qblock64 x block64", "qblock128 x block128"]
    for x in ("0.25", "0.125", "0.0625"):
        kept = [result[g]["mass_at_share"][x] for g in order]
        assert all(a >= b - 1e-2 for a, b in zip(kept, kept[1:])), (x, kept)


def _share(sel, s: int) -> float:
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return (sel.dense() & causal).sum().item() / (sel.indices.shape[1] * causal.sum().item())


@pytest.mark.parametrize("name,params,granularity", [
    ("topk", {"top_k": 24}, "keys"), ("topk", {"top_k": 60}, "keys"),
    ("moba", {"block_size": 64, "top_k": 2}, "query x block64"),
    ("quest", {"page": 64, "top_k": 2}, "query x block64"),
    ("seer", {"block_size": 64, "top_k": 2}, "qblock64 x block64"),
    ("seer", {"block_size": 128, "top_k": 1}, "qblock128 x block128")])
def test_real_selections_keep_no_more_than_the_bound(script, qk, name, params, granularity):
    """A selection at its share of the causal pairs keeps at most the oracle's mass at that share (up to the
    binning: within the last bin taken, units differ by at most 2^(1/32) in mass per pair)."""
    q, k = qk
    sel = az.get(name, **params).selection(q, k, causal=True)
    kept = mi.mass_kept(q, k, sel).mean().item()
    share, mass = script.layer_histograms(q, k)[granularity].frontier(H * S)
    bound = script.mass_at(share, mass, _share(sel, S))
    assert kept <= bound + 1e-2, (kept, bound)
    assert kept > 0.2   # the selections are not empty: the comparison says something


def test_a_shared_budget_keeps_at_least_the_mean_of_equal_budgets(script, qk):
    """Pooling two layers' histograms: at the same total share, moving budget between layers can only help."""
    q, k = qk
    other = script.layer_histograms(q.flip(2), k)   # a second "layer"
    first = script.layer_histograms(q, k)
    both = script.pooled([first, other])
    rows = H * S
    for g in script.GRANULARITIES:
        shared = script.summarize(both, 2 * rows)[g]["mass_at_share"]
        alone = [script.summarize(h, rows)[g]["mass_at_share"] for h in (first, other)]
        for x, m in shared.items():
            assert m >= (alone[0][x] + alone[1][x]) / 2 - 1e-2, (g, x)
        assert float(both[g].pairs.sum()) == pytest.approx(2 * H * S * (S + 1) / 2, rel=1e-12)
