"""The tiny LM learns real text with every head structure; `attnzoo train-tiny` and `attnzoo transmla`
on the command line; the report's plots."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from attnzoo import cli
from attnzoo.lab import report, tiny

SMALL = tiny.Config(dim=32, layers=2, heads=4, seq=64, batch=8, steps=30, eval_every=10)


@pytest.mark.parametrize("kind", tiny.HEADS)
def test_loss_falls_within_a_tiny_budget(kind):
    r = tiny.train(kind, SMALL)
    assert r["heads"] == kind and len(r["train_curve"]) == 30 and [s for s, _ in r["heldout_curve"]] == [0, 10, 20, 30]
    assert r["first_heldout"] > 5.0  # about ln 256 at initialisation
    assert r["final_heldout"] < r["first_heldout"] - 1.0, r["heldout_curve"]
    assert r["final_train"] < r["train_curve"][0][1] - 1.0


def test_structures_differ_where_they_should():
    models = {k: tiny.TinyLM(k, SMALL) for k in tiny.HEADS}
    gqa, cla = models["gqa"], models["cla"]
    assert [b.attn.owns_kv for b in cla.blocks] == [True, False]
    assert cla.blocks[1].attn.k_proj is None
    assert cla.kv_bytes_per_token() * 2 == gqa.kv_bytes_per_token() == 2 * (2 * 2 * 8) * 4
    assert models["mla"].kv_bytes_per_token() == 2 * (16 + 8) * 4
    ids = torch.randint(0, 256, (2, 9))
    assert all(m(ids).shape == (2, 9, 256) for m in models.values())
    models["moh"](ids)
    assert models["moh"].aux_loss().item() > 0 and models["gqa"].aux_loss() == 0.0


def test_cli_heads_match_the_lab():
    assert cli.TINY_HEADS == tiny.HEADS


def test_train_tiny_command_writes_curves_and_report(tmp_path):
    out = tmp_path / "tiny"
    result = CliRunner().invoke(cli.app, ["train-tiny", "--heads", "gqa,cla", "--steps", "4", "--dim", "16",
                                          "--layers", "2", "--seq", "16", "--batch", "2", "--threads", "1",
                                          "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [r["heads"] for r in data["runs"]] == ["gqa", "cla"]
    assert all(len(r["train_curve"]) == 4 for r in data["runs"])
    page = (out / "report.html").read_text()
    assert page.count("Plotly.newPlot") == 2 and "cla" in page


@pytest.mark.parametrize("args,message", [
    (["train-tiny", "--heads", "gqa,xyz"], "unknown"),
    (["train-tiny", "--heads", "gqa", "--dim", "18", "--n-heads", "4"], "divisible"),
    (["transmla", "--ranks", "0"], "--ranks"),
])
def test_bad_options(args, message):
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_line_plot_draws_each_series_with_a_legend():
    fig = report.line_figure({"a": [(0, 1.0), (1, 10.0)], "b": [(0, 2.0), (2, float("nan")), (3, 3.0)]},
                             "x", "y", log_y=True)
    assert [t.name for t in fig.data] == ["a", "b"] and list(fig.data[1].y) == [2.0, 3.0]
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.title.text == "x"
    assert "Plotly.newPlot" in report.line_plot({"a": [(0, 1.0)]}, "x", "y")


@pytest.mark.parametrize("command", ["transmla", "train-tiny"])
def test_help_answers_without_torch(command):
    import subprocess
    import sys

    code = ("import sys\nfrom attnzoo.cli import app\ntry:\n    app([%r, '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))" % command)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--out" in out.stdout and out.stdout.strip().endswith("[]"), out.stdout + out.stderr
