"""Speed and memory measurement: timing rules, honest CPU peak memory, unmasked work, ratios."""
from __future__ import annotations

import torch

import attnzoo as az
from attnzoo.bench import speed

CPU = torch.device("cpu")
SMALL = speed.Geometry(1, 4, 2, 16)


def test_timing_takes_the_median_of_repeats_after_a_first_call():
    calls = []
    first, samples = speed.time_ms(lambda: calls.append(1), CPU, speed.Timing(repeats=4, min_repeats=2, warmup=2))
    assert len(samples) == 4 and len(calls) == 1 + 1 + 4 and first >= 0
    _, few = speed.time_ms(lambda: None, CPU, speed.Timing(repeats=9, min_repeats=2, max_seconds=0.0))
    assert len(few) == 2  # past the time cap, min_repeats is enough


def test_cpu_peak_memory_sees_torch_allocations():
    def allocate():
        x = torch.ones(64, 2**20 // 4 * 4)  # 64 MiB touched
        del x

    assert speed.peak_mib(allocate, CPU) > 60
    assert speed.peak_mib(lambda: None, CPU) < 8


def test_allowed_pairs_count_only_unmasked_work():
    full = az.get("full")
    assert speed.allowed_pairs(full, SMALL, True, 8, 8, {}, CPU) == (4 * 36, "pairs the mask allows")
    assert speed.allowed_pairs(full, SMALL, False, 4, 8, {}, CPU)[0] == 4 * 32
    window = az.get("sliding_window", window=2)
    # causal, window 2: rows see 1, 2, 3, 3, ... keys
    assert speed.allowed_pairs(window, SMALL, True, 8, 8, {}, CPU)[0] == 4 * (1 + 2 + 3 * 6)
    assert speed.tflops(10**12, speed.Geometry(head_dim=64), "fwd", 1000.0) == 256.0


def test_measure_records_rows_and_their_failures():
    ok = speed.measure(speed.Row("sliding_window", "torch", "causal_cross", 64, "fwd+bwd", {"window": 8}), SMALL,
                       torch.float32, CPU, speed.Timing(repeats=2, min_repeats=1))
    assert ok["error"] is None and ok["sq"] == 16 and ok["sk"] == 64 and ok["median_ms"] > 0
    assert ok["peak_mib"] is not None and ok["pairs"] > 0 and ok["inputs"] == "gaussian"
    bad = speed.measure(speed.Row("prefix_lm", "torch", "causal_self", 64, "fwd"), SMALL, torch.float32, CPU,
                        speed.Timing(repeats=1, min_repeats=1))
    assert "cannot serve the causal_self pattern" in bad["error"]


def test_ratios_are_to_anchors_of_the_same_shape():
    timing = speed.Timing(repeats=1, min_repeats=1)
    rows = [speed.measure(speed.Row(v, b, "causal_self", 64, "fwd"), SMALL, torch.float32, CPU, timing)
            for v, b in (("full", "sdpa"), ("full", "torch"), ("sliding_window", "torch"))]
    speed.add_ratios(rows)
    assert rows[0]["time_vs_sdpa"] == 1.0 and rows[0]["memory_vs_sdpa"] in (1.0, None)
    assert rows[2]["time_vs_sdpa"] == rows[2]["median_ms"] / rows[0]["median_ms"]
    assert rows[2]["time_vs_flex"] is None  # no flex row measured


def test_cpu_paths_and_the_masked_sdpa_anchor():
    """torch (fused), torch:tiles and SDPA given the dense mask time the same configuration; ratios pair them."""
    timing = speed.Timing(repeats=1, min_repeats=1)
    params = {"window": 16}
    rows = [speed.measure(speed.Row(v, b, "causal_self", 96, "fwd+bwd", p), SMALL, torch.float32, CPU, timing)
            for v, b, p in (("full", "sdpa", {}), ("sliding_window", "torch", params),
                            ("sliding_window", speed.TILES, params), ("sliding_window", speed.SDPA_MASK, params))]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    speed.add_ratios(rows)
    _, fused, tiles, masked = rows
    assert (fused["path"], tiles["path"], masked["path"]) == ("fused", "tiles", None)
    assert masked["mask_mib"] == 96 * 96 / 2**20
    assert fused["time_vs_sdpa_mask"] == fused["median_ms"] / masked["median_ms"]
    assert fused["time_vs_tiles"] == fused["median_ms"] / tiles["median_ms"]
    assert fused["memory_vs_sdpa_mask"] is not None and masked["time_vs_sdpa_mask"] == 1.0
    mask = speed.dense_mask(az.get("sliding_window", **params), *speed.make_qkv(SMALL, 96, 96, torch.float32, CPU,
                                                                                 torch.Generator().manual_seed(0))[0][:2],
                            True, {})
    assert torch.equal(mask[0, 0], az.get("sliding_window", **params).dense_mask(96, 96, causal=True))
    bad = speed.measure(speed.Row("softcap", speed.SDPA_MASK, "causal_self", 32, "fwd"), SMALL, torch.float32, CPU,
                        timing)
    assert "defined by a mask alone" in bad["error"]


def test_a_slow_first_call_needs_one_timed_call_and_the_peak_is_read_on_it():
    import time

    def slow():
        time.sleep(0.02)
        x = torch.ones(16, 2**20 // 4 * 4)  # 16 MiB touched
        del x

    first, samples, peak = speed.time_and_peak(slow, CPU, speed.Timing(repeats=5, min_repeats=3, max_seconds=0.0,
                                                                       slow_ms=10.0))
    assert first >= 20 and len(samples) == 1 and peak > 12
    _, samples, _ = speed.time_and_peak(slow, CPU, speed.Timing(repeats=5, min_repeats=3, max_seconds=0.0))
    assert len(samples) == 3
