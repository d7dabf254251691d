"""MQAR (attnzoo.bench.recall): the generator's answers by construction, seeds, the power law, argument
checks, the model's sizes, the sweep's plan and skips, a softmax model learning the task, and the
command (`attnzoo bench --task mqar`) writing results.json and report.html."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from attnzoo.bench import recall
from attnzoo.bench.recall import IGNORE, MQAR, Mixer, RecallModel, Sweep, Train, mqar_batch, parse_mixer
from attnzoo.cli import app
from attnzoo.core import registry

SETTINGS = [  # (seq_len, num_pairs, vocab_size, power_a, random_non_queries)
    (32, 4, 64, 0.01, True), (64, 16, 64, 0.01, True), (128, 8, 256, 1.0, False), (16, 4, 10, 0.5, True),
    (256, 16, 8192, 0.01, True),
]


def check_answers(b, seq_len, num_pairs, vocab_size):
    """Every row: P distinct keys of [1, V/2) and P distinct values of [V/2, V) as k v k v ...; every key
    queried exactly once after them at an even offset; each answer is the value paired with its key."""
    half = vocab_size // 2
    assert b.inputs.shape == b.targets.shape == (b.inputs.shape[0], seq_len)
    assert b.inputs.dtype == b.targets.dtype == torch.long
    assert int(b.inputs.min()) >= 0 and int(b.inputs.max()) < vocab_size
    for row, tgt in zip(b.inputs.tolist(), b.targets.tolist()):
        keys, values = row[0:2 * num_pairs:2], row[1:2 * num_pairs:2]
        assert len(set(keys)) == num_pairs and all(1 <= k < half for k in keys)
        assert len(set(values)) == num_pairs and all(half <= v < vocab_size for v in values)
        pairs = dict(zip(keys, values))
        answered = [i for i, t in enumerate(tgt) if t != IGNORE]
        assert len(answered) == num_pairs
        assert all(i >= 2 * num_pairs and (i - 2 * num_pairs) % 2 == 0 for i in answered)
        assert sorted(row[i] for i in answered) == sorted(keys)  # every key queried once
        for i in answered:
            assert tgt[i] == pairs[row[i]], f"position {i}: key {row[i]} answered {tgt[i]}, paired with {pairs[row[i]]}"


@pytest.mark.parametrize("setting", SETTINGS)
def test_answers_are_the_paired_values(setting):
    s, p, v, a, rnq = setting
    b = mqar_batch(64, s, p, v, a, seed=3, random_non_queries=rnq)
    check_answers(b, s, p, v)
    # the returned pairs and positions describe the same sequences
    assert torch.equal(b.inputs[:, 0:2 * p:2], b.keys) and torch.equal(b.inputs[:, 1:2 * p:2], b.values)
    assert torch.equal(b.inputs.gather(1, b.query_positions), b.keys)
    assert torch.equal(b.targets.gather(1, b.query_positions), b.values)
    if not rnq:  # Zoology's zero filler: only pairs and queries are non-zero
        filler = torch.ones_like(b.inputs, dtype=torch.bool)
        filler[:, :2 * p] = False
        filler.scatter_(1, b.query_positions, False)
        assert int(b.inputs[filler].abs().sum()) == 0


def test_seeds_reproduce():
    task = MQAR(64, 4, 64)
    a, b, c = task.batch(8, seed=5), task.batch(8, seed=5), task.batch(8, seed=6)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    first = [task.batch(4, generator=g1).inputs for _ in range(3)]
    again = [task.batch(4, generator=g2).inputs for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], first[1])  # a generator stream moves on


def test_power_law_placement():
    """One pair: the gap g (query at 2P + 2g) follows P(g = i - 1) ~ a i^(a - 1)."""
    s, a, n = 64, 0.3, 20000
    b = mqar_batch(n, s, 1, 64, a, seed=0)
    gaps = (b.query_positions[:, 0] - 2) // 2
    space = (s - 2) // 2
    i = torch.arange(1, space + 1, dtype=torch.float64)
    p = a * i ** (a - 1)
    p /= p.sum()
    freq = torch.bincount(gaps, minlength=space).double() / n
    assert (freq - p).abs().max() < 4 * math.sqrt(p.max() / n)
    # smaller power_a puts queries nearer the pairs; 1 is uniform
    near = mqar_batch(2000, 128, 8, 64, 0.01, seed=1).query_positions.float().mean()
    uniform = mqar_batch(2000, 128, 8, 64, 1.0, seed=1).query_positions.float().mean()
    assert near < uniform - 10


@pytest.mark.parametrize("kwargs, name", [
    ({"seq_len": 33}, "seq_len"), ({"seq_len": 2}, "seq_len"), ({"num_pairs": 17}, "num_pairs"),
    ({"num_pairs": 0}, "num_pairs"), ({"vocab_size": 8}, "vocab_size"), ({"power_a": 0.0}, "power_a"),
    ({"power_a": float("nan")}, "power_a"), ({"batch_size": 0}, "batch_size"),
])
def test_bad_settings_name_the_argument(kwargs, name):
    args = {"batch_size": 2, "seq_len": 64, "num_pairs": 16, "vocab_size": 64, "power_a": 0.01} | kwargs
    with pytest.raises(ValueError, match=name):
        mqar_batch(args.pop("batch_size"), **args, seed=0)
    if name != "batch_size":
        args.pop("batch_size", None)
        with pytest.raises(ValueError, match=name):
            MQAR(**args)


def test_bad_types_and_seeds():
    with pytest.raises(TypeError, match="seq_len"):
        MQAR(seq_len=64.0)
    with pytest.raises(TypeError, match="random_non_queries"):
        MQAR(random_non_queries=1)
    with pytest.raises(ValueError, match="seed"):
        mqar_batch(2, 64, 4, 64)  # neither seed nor generator
    with pytest.raises(ValueError, match="seed"):
        mqar_batch(2, 64, 4, 64, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="seed"):
        mqar_batch(2, 64, 4, 64, seed=-1)


@pytest.mark.parametrize("kwargs, name", [
    ({"steps": 0}, "steps"), ({"tokens": 0}, "tokens"), ({"lr": 0.0}, "lr"), ({"target": 1.5}, "target"),
    ({"batch_size": 0}, "batch_size"), ({"warmup": -0.1}, "warmup"),
])
def test_bad_training_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Train(**kwargs)


def test_bad_sweeps_and_models():
    with pytest.raises(ValueError, match="feature_dims"):
        Sweep(width=64, feature_dims=(24,))
    with pytest.raises(ValueError, match="widths"):
        Sweep(widths=())
    with pytest.raises(ValueError, match="num_pairs"):
        Sweep(lengths=(16,), pairs=(8,))
    with pytest.raises(ValueError, match="pairs"):
        Sweep(lengths=(64, 128), pairs=(4,))
    with pytest.raises(ValueError, match="variants"):
        recall.plan(Sweep(variants=["no_such_variant"]))
    with pytest.raises(ValueError, match="hybrid"):
        recall.plan(Sweep(variants=["full+full+full"]))
    with pytest.raises(ValueError, match="mixers"):
        RecallModel(64, 32, ["full"] * 3, layers=2)
    with pytest.raises(ValueError, match="dim"):
        RecallModel(64, 0, "full")
    with pytest.raises(ValueError, match="window"):
        RecallModel(64, 32, "sliding_window(window=-1)")
    with pytest.raises(ValueError, match="mixer"):
        parse_mixer("sliding_window(window)")


def test_parse_mixer():
    assert parse_mixer("full") == Mixer("full", {})
    m = parse_mixer("sink_window(sinks=2, window=16)")
    assert m.variant == "sink_window" and m.params == {"sinks": 2, "window": 16} and m.label == "sink_window(sinks=2, window=16)"
    assert parse_mixer(("linear", {"feature_map": "relu"})).params == {"feature_map": "relu"}


def test_model_outputs_and_state_sizes():
    d, s, v = 32, 48, 64
    tokens = MQAR(s, 4, v).batch(3, seed=0).inputs
    full = RecallModel(v, d, "full")
    assert full(tokens).shape == (3, s, v)
    assert full.state_elements(s) == 2 * (2 * d * s)  # K and V of every token, two layers
    window = RecallModel(v, d, "sliding_window(window=7)")
    assert window.state_elements(s) == 2 * (2 * d * 8)  # the query and 7 keys before it
    sink = RecallModel(v, d, "sink_window(sinks=2, window=7)")
    assert sink.state_elements(s) == 2 * (2 * d * 10)
    lin = RecallModel(v, d, Mixer("linear", heads=4, head_dim=8))
    assert lin.state_elements(s) == lin.state_elements(4 * s) == 2 * (4 * 8 * (8 + 1))  # S and z, constant in S
    hybrid = RecallModel(v, d, ["sliding_window(window=3)", Mixer("based", heads=2, head_dim=16)])
    assert hybrid(tokens).shape == (3, s, v)
    assert hybrid.state_elements(s) == 2 * d * 4 + 2 * (1 + 16 + 256) * (16 + 1)
    moba = RecallModel(v, d, "moba(block_size=16, top_k=2)")
    assert moba.state_elements(s) == 2 * (2 * d * s)  # content-sparse: every key is kept


def test_recurrent_forms_agree_in_the_model():
    torch.manual_seed(0)
    m = RecallModel(64, 32, Mixer("gla", {"chunk_size": 16}, heads=2)).double()
    x = MQAR(40, 4, 64).batch(2, seed=0).inputs
    outs = []
    for mode in recall.MODES:
        m.set_mode(mode)
        outs.append(m(x))
    assert m.mode == "recurrent"
    assert all(torch.allclose(outs[0], o, atol=1e-9) for o in outs[1:])


def test_plan_covers_families_and_skips_with_reasons():
    todo, skipped = recall.plan(Sweep(variants=["full", "sliding_window", "linear", "sliding_window+based",
                                                "biformer", "nsa", "document"], widths=(32, 64), windows=(4, 16),
                                      feature_dims=(8, 16)))
    got = {(c["name"], c["knob"], c["value"]) for c in todo}
    assert got == {("full", "width", 32), ("full", "width", 64), ("sliding_window", "window", 4),
                   ("sliding_window", "window", 16), ("linear", "feature_dim", 8), ("linear", "feature_dim", 16),
                   ("sliding_window+based", "feature_dim", 8), ("sliding_window+based", "feature_dim", 16)}
    hybrid = next(c for c in todo if c["name"] == "sliding_window+based" and c["value"] == 8)
    assert hybrid["layers"][0].variant == "sliding_window" and hybrid["layers"][0].params["window"] == 2
    assert hybrid["layers"][1].variant == "based" and hybrid["layers"][1].head_dim == 8
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert set(reasons) == {"biformer", "nsa", "document"}
    assert "causal self" in reasons["biformer"] and "gates" in reasons["nsa"] and "document_ids" in reasons["document"]


def test_default_sweep_takes_every_linear_variant_and_new_ones(monkeypatch):
    import attnzoo as az
    from attnzoo.variants.linear.linear import Linear

    class Newcomer(Linear):
        name = "_recall_test_newcomer"

    registry._load_all()
    monkeypatch.setitem(registry._REGISTRY, Newcomer.name, Newcomer)
    names = Sweep().names()
    assert {"full", "sliding_window", "sink_window", "moba", "sliding_window+based"} <= set(names)
    assert {i.name for i in az.variants(family="linear")} <= set(names)
    assert Newcomer.name in names
    todo, skipped = recall.plan(Sweep(variants=[Newcomer.name]))
    assert not skipped and {c["knob"] for c in todo} == {"feature_dim"}


def test_unbuildable_variant_is_recorded_not_raised(fake_variants):
    """A variant that declares causal self-attention but cannot be built or run here (a grid that must
    hold S tokens) is skipped with its error; a variant needing an input no module learns is skipped
    before training."""
    sweep = Sweep(variants=["_bench_test_grid", "_bench_test_impossible"], lengths=(16,), widths=(16,),
                  train=Train(steps=1))
    res = recall.run(sweep)
    reasons = {s["name"]: s["reason"] for s in res["skipped"]}
    assert set(reasons) == {"_bench_test_grid", "_bench_test_impossible"}
    assert "mystery" in reasons["_bench_test_impossible"]
    assert "grid" in reasons["_bench_test_grid"].lower()
    assert res["runs"] == []


@pytest.fixture
def one_thread():
    """Training on a CPU that others keep busy: two OpenMP threads made this test 5 s -> 90 s here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_softmax_learns_small_mqar(one_thread):
    """Full attention reaches 99% on 4 pairs in 32 tokens (vocabulary 64) well within the budget (it
    stops after 170-300 of the 500 steps over seeds 0-3)."""
    torch.manual_seed(0)
    model = RecallModel(64, 64, "full", mlp_ratio=1)
    out = recall.train(model, MQAR(32, 4, 64), Train(steps=500, tokens=1024, seed=0))
    assert out["early_stop"] and out["accuracy"] >= 0.99, out["curve"][-3:]
    assert out["steps"] < 500 and out["curve"][-1][1] == [out["accuracy"]]
    fresh = MQAR(32, 4, 64).batch(256, seed=777)  # an unseen set agrees
    assert recall.evaluate(model, fresh) >= 0.97


def test_sweep_results_report_and_claims(tmp_path):
    from attnzoo.bench import recall_report

    sweep = Sweep(variants=["full", "linear", "sliding_window+based", "biformer"], lengths=(16, 32), widths=(16,),
                  feature_dims=(8,), windows=(4,), width=16, train=Train(steps=3, check_every=2))
    res = recall.run(sweep)
    assert [r["label"] for r in res["runs"]] == ["full d=16", "linear f=8", "sliding_window+based f=8"]
    for r in res["runs"]:
        assert [x["seq_len"] for x in r["by_length"]] == [16, 32] and r["steps"] == 3
        assert all(0 <= x["accuracy"] <= 1 and x["state_elements"] > 0 for x in r["by_length"])
    assert [s["name"] for s in res["skipped"]] == ["biformer"]
    assert set(res["claims"]["verdicts"]) == {"softmax_solves_linear_does_not", "based_mix_closes_gap"}
    assert res["meta"]["load_average_start"] is None or len(res["meta"]["load_average_start"]) == 3
    json_path, html_path = recall_report.write(res, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["task"] == "mqar" and len(data["table"]) == 6 and data["config"]["lengths"] == [16, 32]
    page = html_path.read_text()
    assert "Every run" in page and "What could not run" in page and "biformer" in page
    pytest.importorskip("plotly")
    assert "plot-state" in page and "plot-length" in page and "Plotly.newPlot" in page


def test_claims_on_made_up_numbers():
    def row(name, layers, acc, state):
        return {"name": name, "label": name, "layers": [{"variant": v} for v in layers],
                "by_length": [{"seq_len": 64, "accuracy": acc, "state_elements": state}]}

    res = {"config": {"lengths": [64]}, "runs": [
        row("full", ["full", "full"], 0.995, 16000), row("full", ["full", "full"], 0.4, 8000),
        row("linear", ["linear", "linear"], 0.2, 20000), row("based", ["based", "based"], 0.3, 4000),
        row("sliding_window+based", ["sliding_window", "based"], 0.8, 19000)]}
    c = recall.claims(res)
    e = c["per_length"][0]
    assert e["softmax"]["accuracy"] == 0.995 and e["linear"]["accuracy"] == 0.2  # based's 4000 < 16000 / 2
    assert e["gap_closed"] == pytest.approx((0.8 - 0.2) / (0.995 - 0.2))
    assert c["verdicts"]["softmax_solves_linear_does_not"]["verdict"] == "reproduced"
    assert c["verdicts"]["based_mix_closes_gap"]["verdict"] == "reproduced"


def test_command(tmp_path):
    runner = CliRunner()
    out = tmp_path / "mq"
    r = runner.invoke(app, ["bench", "--task", "mqar", "--quick", "--variants", "full,biformer", "--lengths", "16",
                            "--steps", "2", "--mqar", "widths=16 vocab_size=32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["lengths"] == [16] and data["config"]["train"]["steps"] == 2
    assert data["config"]["vocab_size"] == 32 and data["runs"][0]["width"] == 16
    assert (out / "report.html").exists() and "skipped biformer" in r.output
    for args, hint in ((["--mqar", "bogus=1"], "--mqar"), (["--variants", "nope"], "--variants"),
                       (["--lengths", "15"], "--lengths"), (["--task", "other"], "--task")):
        bad = runner.invoke(app, ["bench", "--task", "mqar", "--quick", "--out", str(out), *args])
        assert bad.exit_code == 2 and hint in bad.output, (args, bad.output)


def test_worker_processes_give_the_serial_results():
    """Two single-threaded worker processes (the command's way on two idle CPUs) train the same
    configurations to the same numbers as one process, rows in the sweep's order, with progress per run."""
    sweep = Sweep(variants=["full", "linear"], lengths=(16,), widths=(16,), feature_dims=(8,), width=16,
                  train=Train(steps=3, check_every=2, mode_probe=False))  # the probe picks a form by timing
    events = []

    class Steps:
        def start(self, label, total, key=None):
            events.append(("start", key))

        def tick(self, accuracy, key=None):
            events.append(("tick", key))

        def done(self, key=None):
            events.append(("done", key))

    serial = recall.run(sweep, threads=1)
    parallel = recall.run(sweep, threads=2, steps=Steps(), parallel=True)
    assert serial["meta"]["worker_processes"] == 1 and parallel["meta"]["worker_processes"] == 2
    assert [r["label"] for r in parallel["runs"]] == [r["label"] for r in serial["runs"]] == ["full d=16", "linear f=8"]
    for a, b in zip(serial["runs"], parallel["runs"]):
        assert a["by_length"] == b["by_length"] and a["final_loss"] == b["final_loss"]
    assert sorted(k for e, k in events if e == "done") == [0, 1]
    assert sum(e == "tick" for e, _ in events) == 6
