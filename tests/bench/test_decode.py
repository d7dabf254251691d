"""The structure behind O(1) decoding, for every recurrent variant: the state after any number of tokens has
the same size, and a decode step keeps it (RAT's grows by one row per chunk, by design); and the decode
benchmark runs end to end (timings are the benchmark's business, not a test's)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from attnzoo.bench import decode

GEO = decode.Geometry(batch=1, heads=2, head_dim=8)
CPU = torch.device("cpu")


@pytest.mark.parametrize("name", decode.recurrent_variants())
def test_state_size_does_not_depend_on_the_context_length(name):
    attn = decode.decoder(name)
    gen = torch.Generator().manual_seed(0)
    state = attn.init_state(1, 2, 8, 8)
    shapes = {}
    for seen, more in ((0, 40), (40, 160)):
        state = decode.prefill(attn, state, more, GEO, torch.float32, CPU, gen, piece=64)
        shapes[seen + more] = tuple(state.shape)
    q, k, v = (torch.randn(1, 2, 8) for _ in range(3))
    _, after = attn.step(q, k, v, state, **decode.step_inputs(attn, q, k, v))
    if name == "rat":  # one row per chunk of `chunk` tokens: the summaries softmax attends across
        chunk = attn.config["chunk"]
        assert [s[2] for s in shapes.values()] == [-(-40 // chunk), -(-200 // chunk)]
        assert after.shape[2] == -(-201 // chunk)
    else:
        assert shapes[40] == shapes[200] == tuple(after.shape) == attn.state_shape(1, 2, 8, 8)


def test_the_decode_benchmark_writes_times_state_sizes_and_ratios(tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "linear_decode.py"
    spec = importlib.util.spec_from_file_location("linear_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lindec.json"
    bench.main(["--contexts", "32", "96", "--steps", "2", "--variants", "gla", "titans", "rat", "--heads", "2",
                "--head-dim", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"full", "gla", "titans", "rat"} and result["contexts"] == [32, 96]
    for name in ("full", "gla", "titans", "rat"):
        for n in ("32", "96"):
            point = result["rows"][name]["by_context"][n]
            assert point["us_per_token"] > 0 and point["median_us"] >= point["us_per_token"]
    r = result["ratios"]
    assert r["full"]["state_growth"] == 3.0 and r["gla"]["state_growth"] == r["titans"]["state_growth"] == 1.0
    assert r["rat"]["state_growth"] == 6 / 2 and set(r["gla"]["speedup_vs_full"]) == {"32", "96"}
