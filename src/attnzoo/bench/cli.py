"""`attnzoo bench`: every variant on a real model and real text, one command."""
from __future__ import annotations

from pathlib import Path

import typer

from .. import cli_options as opts
from ..core.info import ALL_PATTERNS
from ..models import ModelFolderError, ModelNotInstalled

# torch and the bench's modules are imported when the command runs, so `attnzoo --help` stays fast.
console = opts.console
BACKENDS = ("torch", "sdpa", "flex")


def _variants(text: str) -> list[str]:
    from ..core.api import variant_class

    names = [x.strip() for x in text.split(",") if x.strip()]
    for n in names:
        try:
            variant_class(n)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--variants") from None
    if not names:
        raise typer.BadParameter("name at least one variant (attnzoo list shows them)", param_hint="--variants")
    return names


def _dtype(text: str, device: str) -> str:
    from . import run as bench_run

    if text == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if text not in bench_run.DTYPES:
        raise typer.BadParameter(f"expected auto or one of {list(bench_run.DTYPES)}; got {text!r}", param_hint="--dtype")
    return text


def bench(
    quick: bool = typer.Option(False, "--quick", help="try this first: every step in about a minute (128 tokens, "
                                                      "2 layers, one timed call a row)"),
    speed_only: bool = typer.Option(False, "--speed-only", help="only speed and memory (no fidelity, no perplexity), "
                                                                "e.g. with --lengths 1024,2048,4096,8192,16384"),
    variants: str = typer.Option(None, help="comma-separated variant names (default: every registered variant)"),
    lengths: str = typer.Option(None, help="sequence lengths for speed and memory (default 256,1024), e.g. 1024,4096"),
    text_length: int = typer.Option(None, "--text-length", min=8, help="tokens of real text for fidelity and perplexity"),
    layers: str = typer.Option(None, help="model layers whose q/k/v are captured, e.g. 0,10,20 (default: 4 spread)"),
    model: str = opts.model_option(),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16, float64"),
    backends: str = typer.Option(None, help="comma-separated: torch, sdpa, flex (default: torch,sdpa on CPU; all on CUDA)"),
    modes: str = typer.Option(None, help="comma-separated: fwd, fwd+bwd (default both)"),
    patterns: str = typer.Option(None, help="comma-separated CAB patterns, or all (default: each variant's own, causal "
                                            f"self for most; all four: {','.join(ALL_PATTERNS)})"),
    out: Path = opts.out_option("results/bench"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="where captured q/k/v are cached (default ~/.cache/attnzoo)"),
    seed: int = opts.seed_option("seed of the Gaussian inputs"),
    threads: int = opts.threads_option(),
    task: str = typer.Option("bench", "--task", callback=opts.choice(("bench", "mqar")),
                             help="bench (default): the run above; mqar: recall across families (Zoology's "
                                  "multi-query associative recall, tiny models trained on CPU; --variants, --lengths, "
                                  "--quick, --out (default results/mqar), --seed, --threads apply)"),
    steps: int = typer.Option(None, "--steps", min=1, help="--task mqar: training steps per configuration"),
    mqar: str = typer.Option(None, "--mqar", help="--task mqar: sweep settings as KEY=VALUE, e.g. "
                                                  "'widths=32,64,128 windows=8,32 feature_dims=8,16 vocab_size=64'"),
):
    """Fidelity (real and noise q/k/v), in-model perplexity, speed and memory of every variant.

    Start with --quick (about a minute); the default run takes about 5 minutes on 2 idle CPU cores.
    --task mqar trains tiny models on Zoology's MQAR recall task instead (10-15 minutes on a busy 2-core CPU)."""
    if task == "mqar":
        from . import recall_cli

        recall_cli.main(quick, variants, lengths, steps, recall_cli.DEFAULT_OUT if out == Path("results/bench") else out,
                        seed, threads, mqar)
        return
    with opts.status("starting (importing torch) ..."):
        from . import run as bench_run

        dev = opts.device(device, auto=True)
    overrides = {"device": dev, "dtype": _dtype(dtype, dev), "model": model, "seed": seed, "threads": threads,
                 "speed_only": speed_only,
                 "cache_dir": cache_dir, "backends": tuple(opts.name_list(backends, "--backends", BACKENDS)) if backends
                 else bench_run.default_backends(dev)}
    if variants:
        overrides["variants"] = _variants(variants)
    if lengths:
        overrides["lengths"] = tuple(opts.int_list(lengths, "--lengths", 2))
    if text_length is not None:
        overrides["text_length"] = text_length
    if layers:
        overrides["layers"] = opts.int_list(layers, "--layers", 0)
    if modes:
        from . import speed

        overrides["modes"] = tuple(opts.name_list(modes, "--modes", speed.MODES))
    if patterns:
        overrides["patterns"] = ALL_PATTERNS if patterns.strip() == "all" else tuple(
            opts.name_list(patterns, "--patterns", ALL_PATTERNS))
    config = bench_run.quick_config(**overrides) if quick else bench_run.Config(**overrides)
    results = _run(config)
    from . import report

    if not console.is_terminal:  # a pipe or a log file: no reason to wrap at 80 columns
        console.width = 160
    report.print_leaderboard(results, console)
    json_path, html_path = report.write(results, out)
    meta = results["meta"]
    sweep = " (the budget sweep per family: budget_sweep.json beside them)" if results["fidelity"] else ""
    console.print(f"wrote {json_path} and {html_path}{sweep} in {results['timings_s']['total']:.0f} s "
                  f"({meta['cpu_threads']} CPU threads: {meta['cpu_threads_reason']})")


def _run(config) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import run as bench_run

    columns = (SpinnerColumn(), TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            return bench_run.run(config, bench_run.Steps(progress))
    except ModelNotInstalled as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    except bench_run.BadConfig as e:  # --layers / --text-length that the loaded model cannot serve
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    except ModelFolderError as e:  # a --model folder that transformers cannot load
        raise typer.BadParameter(str(e), param_hint="--model") from None


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)

