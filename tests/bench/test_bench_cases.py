"""The bench builds every variant's run from what it declares: budget, sweep, grid, extra inputs."""
from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.bench import cases
from attnzoo.core.variant import Variant


def test_budget_param_is_declared_or_found_by_name(monkeypatch, fake_variants):
    assert Variant.budget_param is None and Variant.budget_sweep is None  # optional, off by default
    assert cases.budget_param("sliding_window") == "window"
    assert cases.budget_param("sink_window") == "window"  # window ranks before sinks
    assert cases.budget_param("full") is None
    assert cases.budget_param("_bench_test_needy") == "window"
    cls = az.core.registry.variant_class("sliding_window")
    monkeypatch.setattr(cls, "budget_param", "right")
    monkeypatch.setattr(cls, "budget_sweep", (0, 3, 9))
    assert cases.budget_param("sliding_window") == "right"
    assert cases.sweep_values("sliding_window", 64) == [0, 3, 9]


def test_sweep_values_are_valid_ascending_and_bounded_by_the_length():
    values = cases.sweep_values("sliding_window", 512)
    assert values == sorted(values) and len(values) >= 4
    assert max(values) <= 512 and 256 in values  # the default is swept too
    for v in values:
        az.get("sliding_window", window=v)
    assert cases.sweep_values("full", 512) == []


def test_grid_variants_get_a_length_that_fits(fake_variants):
    length, params = cases.fit("_bench_test_grid", 100)  # 10 x 10 is refused: box 3 must divide the sides
    assert (length, params) == (81, {"grid": (9, 9)})
    attn = cases.configure("_bench_test_grid", length)
    q = torch.randn(1, 2, length, 8)
    assert attn(q, q, q).shape == q.shape
    assert cases.fit("full", 100) == (100, {})


def test_generic_inputs_follow_their_declarations(fake_variants):
    attn = cases.configure("_bench_test_needy", 40)
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 40, 8)
    inputs = cases.make_inputs(attn, q, k, k)
    seg = inputs["segment_ids"]
    assert seg.shape == (2, 40) and seg.dtype == torch.long
    assert seg[0].tolist() == sorted(seg[0].tolist()) and len(set(seg[0].tolist())) == cases.DOCUMENTS  # contiguous
    assert inputs["keep"].all() and inputs["bias_table"].shape == (cases.FREE_DIM, 4)
    assert inputs["bias_table"].abs().max() < 1  # small values
    out = attn(q, k, k, causal=True, **inputs)
    ref = attn.reference(q.double(), k.double(), k.double(), causal=True,
                         **{n: t.double() if t.is_floating_point() else t for n, t in inputs.items()})
    assert (out.double() - ref).abs().max() < 1e-5
    doc = cases.make_inputs(az.get("document"), q, k, k)
    assert set(doc) == {"document_ids"}  # optional inputs are left to their defaults


def test_what_cannot_be_built_says_why(fake_variants):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(cases.Unrunnable, match="mystery.*known only at run time"):
        cases.make_inputs(cases.configure("_bench_test_impossible", 8), q, q, q)


def test_pattern_shapes():
    assert cases.pattern_shape("causal_self", 64) == (True, 64, 64)
    assert cases.pattern_shape("noncausal_cross", 64) == (False, 16, 64)
    assert cases.fidelity_pattern("prefix_lm") == "noncausal_self"
    assert cases.fidelity_pattern("full") == "causal_self"
    with pytest.raises(ValueError, match="pattern"):
        cases.pattern_shape("diagonal", 8)


def test_budgets_keep_a_share_of_the_keys_at_each_length():
    for length in (512, 4096):
        for fraction in cases.KEEP_FRACTIONS:
            value, kept = cases.budget_for("sliding_window", length, fraction)
            assert abs(kept - fraction) / fraction < 0.25, (length, fraction, value, kept)
            assert kept == cases.kept_fraction("sliding_window", length, {"window": value})
    assert cases.budget_for("sliding_window", 4096, 0.25)[0] > cases.budget_for("sliding_window", 512, 0.25)[0]
    # sink_window's default window (1024) keeps every key at 512 tokens: a copy of full attention
    assert cases.kept_fraction("sink_window", 512) == 1.0
    assert "keeps every pair" in cases.equals_full("sink_window", {}, 1.0)
    assert cases.budget_for("sink_window", 512, 0.25)[0] < 512
    # no mask: every key kept, but a score modifier is not full attention; no budget to set
    assert cases.kept_fraction("softcap", 512) == 1.0 and cases.equals_full("softcap", {}, 1.0) is None
    assert cases.budget_for("document", 512, 0.25) is None and 0.2 < cases.kept_fraction("document", 512) < 0.3
    assert cases.equals_full("full", {}, 1.0) is None  # the reference itself is not "equal to full" as a variant


def test_speed_rows_time_each_budget_and_the_cpu_paths():
    from attnzoo.bench import run as bench_run, speed

    config = bench_run.Config(variants=["full", "sliding_window", "softcap"], lengths=(512, 1024))
    rows = bench_run.speed_rows(config.variants, config, torch.device("cpu"))
    sw = [r for r in rows if r.variant == "sliding_window"]
    assert {r.pattern for r in sw} == {"causal_self"}  # its own pattern by default
    assert {(r.length, r.keep_target) for r in sw if r.backend == "torch"} == {
        (n, f) for n in (512, 1024) for f in cases.KEEP_FRACTIONS}
    assert {r.backend for r in sw if r.keep_target == cases.KEEP_FRACTIONS[0]} == {"torch", speed.TILES, speed.SDPA_MASK}
    assert {r.backend for r in rows if r.variant == "full"} == {"torch", "sdpa", speed.TILES}
    assert {r.backend for r in rows if r.variant == "softcap"} == {"torch"}  # one path: the tiles engine
    every = bench_run.Config(variants=["sliding_window"], lengths=(512,), patterns=("causal_self", "noncausal_cross"))
    assert {r.pattern for r in bench_run.speed_rows(every.variants, every, torch.device("cpu"))} == {
        "causal_self", "noncausal_cross"}


def test_the_sweep_spans_shares_of_the_keys_never_a_copy_of_full():
    values = cases.sweep_budgets("sink_window", 512, 3)
    kept = [cases.kept_fraction("sink_window", 512, {"window": v}) for v in values]
    assert len(values) == 3 and max(kept) < 0.75 and min(kept) > 0.01  # 1/2, 1/16, 1/32 of the keys
    assert cases.sweep_budgets("sink_window", 512, 0) == [] and cases.sweep_budgets("full", 512, 3) == []
