"""attnzoo kv evaluation: tasks on real text, the evaluation loop, the report and the command line."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import attnzoo.kv as kv
from attnzoo.cli import app
from attnzoo.kv import evaluate, report, tasks

pytestmark = pytest.mark.model


@pytest.mark.parametrize("task", tasks.TASKS)
def test_every_task_builds_a_prompt_of_the_asked_length_with_its_needles(tok, task):
    sample = tasks.make_sample(task, tok, 600, 0.3, seed=2)
    prompt = tasks.make_prompt(sample, tok)
    assert abs(prompt.n_tokens - 600) <= 0.08 * 600
    context = tok.decode(prompt.context_ids[0])
    question = tok.decode(prompt.question_ids[0])
    assert all(a in context for a in sample.answers)  # the facts are in the context...
    assert not any(a in question for a in sample.answers)  # ...and only there
    assert question.rstrip().endswith(sample.question.rsplit("\n", 1)[1].rstrip())
    first = min(context.find(a) for a in sample.answers[:1])
    if task in ("passkey", "niah_single", "qa"):
        assert 0.15 < first / len(context) < 0.5  # the needle sits near depth 0.3 of the haystack
    assert tasks.make_sample(task, tok, 600, 0.3, seed=2) == sample  # deterministic


def test_string_match_needs_every_answer(tok):
    sample = tasks.make_sample("niah_multivalue", tok, 300, 0.5)
    assert tasks.is_correct(sample, " ".join(sample.answers).upper())
    assert not tasks.is_correct(sample, " ".join(sample.answers[:-1]))
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_sample("sudoku", tok, 300, 0.5)
    with pytest.raises(ValueError, match="depth"):
        tasks.make_sample("passkey", tok, 300, 1.5)


def test_evaluation_summary_and_report(tiny, tok, tmp_path):
    samples = tasks.make_samples(["passkey"], tok, [300], [0.25, 0.75], 1)
    presses = evaluate.presses_for(["snapkv", "kv_quant"], [0.5])
    records = evaluate.evaluate(tiny, tok, presses, samples, progress=False)
    assert len(records) == 2 * 2 * 4  # samples x settings x (uncompressed + snapkv + int8 + int4)
    summary = evaluate.summarize(records)
    rows = {(r["method"], r["setting"]): r for r in summary}
    full = rows[("full", "query_aware")]
    assert full["bytes_fraction"] == 1.0 and full["removed"] == 0.0
    snap = rows[("snapkv", "query_aware")]
    assert 0.45 < snap["bytes_fraction"] < 0.55 and abs(snap["removed"] - 0.5) < 0.01
    agnostic = rows[("snapkv", "query_agnostic")]
    assert agnostic["bytes_fraction"] > snap["bytes_fraction"]  # the question's entries come in uncompressed
    assert rows[("kv_quant(int4)", "query_aware")]["bytes_fraction"] < rows[("kv_quant(int8)", "query_aware")][
        "bytes_fraction"] < 0.35
    for r in summary:
        assert r["prefill_vs_full"] > 0 and r["decode_ms"] is None or r["decode_ms"] > 0
    results = {"model": "tiny", "machine": "test", "config": {"methods": ["snapkv", "kv_quant"], "ratios": [0.5],
               "lengths": [300], "tasks": ["passkey"], "depths": [0.25, 0.75], "samples": 1,
               "settings": list(evaluate.SETTINGS)},
               "methods": [{"name": m.name, "kind": m.kind, "stages": list(m.stages), "paper": str(m.paper),
                            "summary": m.summary} for m in kv.methods()],
               "samples": [{"task": s.task} for s in samples], "summary": summary, "records": records}
    report.write_json(results, tmp_path / "results.json")
    report.write_html(results, tmp_path / "report.html")
    assert json.loads((tmp_path / "results.json").read_text())["summary"]
    page = (tmp_path / "report.html").read_text()
    for plot in ("plot-acc-ratio", "plot-acc-bytes", "plot-depth", "plot-latency"):
        assert f'id="{plot}"' in page
    assert "<script src=" not in page and "plotly" in page.split("<body>")[0]  # plotly inlined: renders offline


def test_command_line_runs_end_to_end(tiny, tok, tmp_path):
    folder = tmp_path / "tiny"
    tiny.save_pretrained(folder)
    tok.save_pretrained(folder)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["kv", "--model", str(folder), "--methods", "snapkv,streaming_llm", "--ratios", "0.5",
                              "--lengths", "256", "--tasks", "passkey", "--depths", "0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "results.json").exists() and (out / "report.html").exists()
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert {r["method"] for r in summary} == {"full", "snapkv", "streaming_llm"}
    listed = runner.invoke(app, ["kv", "--list"])
    assert listed.exit_code == 0 and "duo_attention" in listed.output
    bad = runner.invoke(app, ["kv", "--ratios", "1.2"])
    assert bad.exit_code == 2 and "[0.0, 1.0)" in bad.output
    bad = runner.invoke(app, ["kv", "--methods", "nope"])
    assert bad.exit_code == 2 and "unknown" in bad.output


def test_generate_helper_rejects_unknown_settings(tiny, tok):
    prompt = tasks.make_prompt(tasks.make_sample("passkey", tok, 200, 0.5), tok)
    with pytest.raises(ValueError, match="setting must be one of"):
        evaluate.generate(tiny, tok, prompt, "sometimes", None, 4)
    run = evaluate.generate(tiny, tok, prompt, "query_aware", kv.get("streaming_llm", ratio=0.5), 4)
    assert run["new_tokens"] <= 4 and run["bytes_end"] >= run["bytes"] and torch.isfinite(
        torch.tensor(run["prefill_s"]))


def test_an_interrupted_run_writes_what_it_finished(tiny, tok, tmp_path, monkeypatch):
    folder = tmp_path / "tiny"
    tiny.save_pretrained(folder)
    tok.save_pretrained(folder)
    real, calls = evaluate.generate, []

    def stop_on_the_fourth_run(*args, **kwargs):  # Ctrl-C (or `timeout`'s SIGTERM) in the middle of a run
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", stop_on_the_fourth_run)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["kv", "--model", str(folder), "--methods", "snapkv,streaming_llm", "--ratios",
                                   "0.5", "--lengths", "256", "--tasks", "passkey", "--depths", "0.3,0.7",
                                   "--settings", "query_aware", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data["interrupted"] is True and len(data["records"]) == 3
    assert {r["method"] for r in data["summary"]} == {"full", "snapkv", "streaming_llm"}
    assert "Interrupted" in (out / "report.html").read_text()


def test_unavailable_or_unknown_devices_are_refused_before_loading_the_model():
    runner = CliRunner()
    bad = runner.invoke(app, ["kv", "--device", "gpu0"])
    assert bad.exit_code == 2 and "expected cpu, cuda or cuda:N" in bad.output
    if not torch.cuda.is_available():
        bad = runner.invoke(app, ["kv", "--device", "cuda"])
        assert bad.exit_code == 2 and "not available here" in bad.output
