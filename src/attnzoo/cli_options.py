"""What `attnzoo bench`, `attnzoo kv` and `attnzoo heads` share on the command line: their common
options, the validators of comma-separated lists, devices and model paths, the CPU-thread choice
(`--threads 0` = automatic everywhere), and model loading behind a status line with one-line
errors.

Importing this module imports neither torch nor transformers (nor does attnzoo.cli), so
`attnzoo --help` and `attnzoo kv --help` answer at once; a command imports them when it runs.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import typer
from rich.console import Console

from . import models

console = Console()

THREADS_HELP = ("CPU threads for torch; 0 (default) = automatic: torch's default, or 1 when the 1-minute load "
                "average shows the CPUs already busy (several OpenMP threads then spin waiting for each other)")


# ---- options shared by the commands --------------------------------------------------------------

def threads_option():
    return typer.Option(0, "--threads", min=0, help=THREADS_HELP)


def seed_option(help: str):
    return typer.Option(0, "--seed", min=0, help=help)


def out_option(default: str, help: str = "folder for results.json and report.html"):
    return typer.Option(Path(default), "--out", file_okay=False, help=help)


def model_option(help: str | None = None):
    return typer.Option(models.DEFAULT_MODEL, "--model", callback=check_model,
                        help=help or f"causal LM: {models.DEFAULT_MODEL!r} (embedded SmolLM2-135M-Instruct) or a "
                                     "local Hugging Face model folder")


def encoder_option():
    return typer.Option(models.DEFAULT_ENCODER, "--encoder", callback=check_encoder,
                        help=f"encoder for the encoder probes: {models.DEFAULT_ENCODER!r} (embedded all-MiniLM-L6-v2),"
                             " a local Hugging Face model folder, or 'none'")


# ---- validators ----------------------------------------------------------------------------------

def check_model(value: str) -> str:
    """--model: the embedded model's name, or a folder that holds a model (checked without loading it)."""
    if value != models.DEFAULT_MODEL:
        try:
            models.check_model_folder(value, repr(models.DEFAULT_MODEL))
        except models.ModelFolderError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def check_encoder(value: str) -> str:
    if value not in (models.DEFAULT_ENCODER, "none"):
        try:
            models.check_model_folder(value, f"{models.DEFAULT_ENCODER!r}, 'none'")
        except models.ModelFolderError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def _items(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def int_list(text: str, option: str, minimum: int) -> list[int]:
    """Comma-separated integers, each >= minimum."""
    try:
        values = [int(x) for x in _items(text)]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, e.g. 256,1024; got {text!r}",
                                 param_hint=option) from None
    if not values or min(values) < minimum:
        raise typer.BadParameter(f"expected comma-separated integers >= {minimum}; got {text!r}", param_hint=option)
    return values


def float_list(text: str, option: str, low: float, high: float, high_included: bool = False) -> list[float]:
    """Comma-separated numbers in [low, high) (or [low, high])."""
    try:
        values = [float(x) for x in _items(text)]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None
    if not values or not all(low <= v < high or (high_included and v == high) for v in values):
        closing = "]" if high_included else ")"
        raise typer.BadParameter(f"expected comma-separated numbers in [{low}, {high}{closing}; got {text!r}",
                                 param_hint=option)
    return values


def name_list(text: str, option: str, allowed, allow_all: bool = False) -> list[str]:
    """Comma-separated names from `allowed` (or "all" when `allow_all`)."""
    allowed = list(allowed)
    if allow_all and text.strip() == "all":
        return allowed
    names = _items(text)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        also = " (or all)" if allow_all else ""
        raise typer.BadParameter(f"unknown {bad or text!r}; choose from {', '.join(allowed)}{also}", param_hint=option)
    return names


def choice(allowed):
    """A callback for an option that takes one of `allowed`."""
    def check(value: str) -> str:
        if value not in allowed:
            raise typer.BadParameter(f"expected one of {', '.join(allowed)}; got {value!r}")
        return value

    return check


def device(text: str, auto: bool = False) -> str:
    """--device: cpu, cuda or cuda:N (and auto: CUDA when there is one), checked against what torch sees."""
    expected = f"expected {'auto, ' if auto else ''}cpu, cuda or cuda:N; got {text!r}"
    if not re.fullmatch(r"cpu|cuda(:\d+)?" + ("|auto" if auto else ""), text):
        raise typer.BadParameter(expected, param_hint="--device")
    if text == "cpu":
        return text
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or int(text.partition(":")[2] or 0) >= count:
        raise typer.BadParameter(f"{text!r} is not available here (torch sees {count} CUDA device(s))",
                                 param_hint="--device")
    return text


# ---- running ---------------------------------------------------------------------------------------

def resolve_threads(asked: int, device: str = "cpu") -> tuple[int, str]:
    """(CPU threads, why) for `--threads asked`; 0 = automatic. On a CPU other processes already
    keep busy, several OpenMP threads spin waiting for each other: one thread then runs several
    times faster."""
    import torch

    if asked:
        return asked, "--threads"
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if device == "cpu" and load >= cpus and torch.get_num_threads() > 1:
        return 1, f"1-minute load average {load:.1f} on {cpus} CPUs: one thread avoids oversubscription"
    return torch.get_num_threads(), "torch's default"


@contextlib.contextmanager
def status(message: str):
    """A spinner with `message` while a slow step runs (on a terminal; nothing in a pipe or a log)."""
    with console.status(message):
        yield


def load_causal_lm(spec: str, option: str = "--model"):
    """(model, tokenizer) behind a status line. A missing model package: its install command, exit 1;
    a folder that does not load: a one-line usage error on `option`, exit 2."""
    try:
        with status(f"loading {models.label(spec)} ..."):
            return models.load_causal_lm(spec)
    except models.ModelNotInstalled as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    except models.ModelFolderError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


def load_encoder(spec: str, option: str = "--encoder"):
    """(model, tokenizer) of an encoder behind a status line; a missing package raises ModelNotInstalled
    (the caller decides whether to skip the encoder), a folder that does not load is a usage error."""
    try:
        with status(f"loading {models.label(spec)} ..."):
            return models.load_encoder(spec)
    except models.ModelFolderError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None
