"""Fidelity metrics on known answers."""
from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.bench import fidelity


def _ref(s=48, causal=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, s, 16, generator=g) for h in (4, 2, 2))  # batch = 2 "layers", GQA
    return fidelity.reference(q, k, v, causal)


def test_metrics_on_hand_made_cases():
    o = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])
    assert fidelity.relative_error(o, o).item() == 0
    assert fidelity.mean_cosine(o, o).item() == pytest.approx(1.0)
    assert fidelity.relative_error(2 * o, o).item() == pytest.approx(1.0)
    assert fidelity.mean_cosine(-o, o).item() == pytest.approx(-1.0)
    # one query, three keys with exact probabilities 0.5 / 0.3 / 0.2; the variant keeps keys 0 and 2
    probs = torch.tensor([[[[0.5, 0.3, 0.2]]]])
    assert fidelity.mass_kept(probs, torch.tensor([[[[True, False, True]]]])).item() == pytest.approx(0.7)


def test_exact_probabilities_are_softmax_under_causality():
    ref = _ref(s=10)
    p = ref.probs
    assert p.shape == (2, 4, 10, 10)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 10))
    assert (p.triu(1) == 0).all()


def test_full_has_error_zero_cosine_one_mass_one():
    ref = _ref()
    row = fidelity.measure(az.get("full"), ref, torch.float64)
    assert row["rel_err"] < 1e-12 and row["cosine"] == pytest.approx(1.0) and row["mass_kept"] == pytest.approx(1.0)
    assert len(row["per_layer"]["rel_err"]) == 2
    low = fidelity.measure(az.get("full"), ref, torch.float32)
    assert low["rel_err"] < 1e-6  # the float32 floor


def test_window_covering_the_sequence_equals_full_and_a_short_one_loses_mass():
    ref = _ref(s=48)
    wide = fidelity.measure(az.get("sliding_window", window=48), ref, torch.float64)
    assert wide["rel_err"] < 1e-12 and wide["mass_kept"] == pytest.approx(1.0)
    narrow = fidelity.measure(az.get("sliding_window", window=4), ref, torch.float64)
    assert narrow["rel_err"] > 1e-3 and narrow["mass_kept"] < 1 and narrow["cosine"] < 1
    mask = az.get("sliding_window", window=4).dense_mask(48, 48, causal=True)
    assert narrow["mass_kept"] == pytest.approx((ref.probs * mask).sum(-1).mean().item(), rel=1e-6)


def test_run_covers_defaults_and_the_sweep_and_records_failures(fake_variants):
    ref = _ref(s=32)
    sources = {"captured": (ref.q, ref.k, ref.v)}
    rows = fidelity.run(["full", "sliding_window", "_bench_test_needy", "_bench_test_impossible"], sources, 32,
                        torch.float32, sweep_points=3)
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    assert len(by["full"]) == 1 and by["full"][0]["default"] and by["full"][0]["error"] is None
    sweep = by["sliding_window"]
    assert sweep[0]["default"] and len(sweep) > 2 and all(r["error"] is None for r in sweep)
    errs = {r["budget"]: r["rel_err"] for r in sweep}
    assert errs[max(errs)] <= errs[min(errs)]  # more budget, less error
    assert by["_bench_test_needy"][0]["error"] is None and by["_bench_test_needy"][0]["mass_kept"] < 1
    assert "mystery" in by["_bench_test_impossible"][0]["error"]


def test_recurrent_variants_report_no_softmax_error_and_say_why():
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.float32) for _ in range(3))
    ref = fidelity.reference(q, k, v, True)
    row = fidelity.measure(az.get("retention"), ref, torch.float32)
    assert row["rel_err"] is None and row["mass_kept"] is None and row["full_diff"] is None
    assert "meaningless without training" in row["mass_note"] and "state size" in row["mass_note"]
    sparse = fidelity.measure(az.get("moba", block_size=4, top_k=2), ref, torch.float32)
    assert sparse["rel_err"] > 0 and 0 < sparse["mass_kept"] < 1  # counted on its own selection
