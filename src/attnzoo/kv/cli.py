"""`attnzoo kv`: KV-cache compression methods on long-context tasks with a real model, one command."""
from __future__ import annotations

import os
import platform
import signal
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..models import DEFAULT_MODEL, ModelNotInstalled
from . import evaluate as kv_eval
from . import methods as all_methods
from . import report, tasks

console = Console()


def _floats(text: str, option: str, low: float, high: float) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None
    if not values or not all(low <= v < high or (option == "--depths" and v == high) for v in values):
        closing = "]" if option == "--depths" else ")"
        raise typer.BadParameter(f"expected comma-separated numbers in [{low}, {high}{closing}; got {text!r}",
                                 param_hint=option)
    return values


def _names(text: str, option: str, allowed) -> list[str]:
    if text == "all":
        return list(allowed)
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise typer.BadParameter(f"unknown {bad or text!r}; choose from {', '.join(allowed)} (or all)",
                                 param_hint=option)
    return names


def method_rows() -> list[dict]:
    return [{"name": m.name, "kind": m.kind, "stages": list(m.stages), "paper": str(m.paper) if m.paper else None,
             "summary": m.summary} for m in all_methods()]


def kv(
    methods: str = typer.Option("all", help="comma-separated methods (attnzoo kv --list), or all"),
    ratios: str = typer.Option("0.25,0.5,0.75,0.9", help="fractions of KV entries removed, each in [0, 1)"),
    lengths: str = typer.Option("1024", help="prompt lengths in tokens, e.g. 1024,2048"),
    task_names: str = typer.Option("passkey,niah_single,qa", "--tasks",
                                   help=f"comma-separated tasks from {', '.join(tasks.TASKS)}, or all"),
    depths: str = typer.Option("0.2,0.8", help="needle depths in [0, 1]"),
    samples: int = typer.Option(1, min=1, help="samples per (task, length, depth)"),
    settings: str = typer.Option("query_agnostic,query_aware", help="query_agnostic and/or query_aware"),
    model: str = typer.Option(DEFAULT_MODEL, help=f"{DEFAULT_MODEL!r} or a local Hugging Face causal-LM folder"),
    out: Path = typer.Option(Path("results/kv"), help="folder for results.json and report.html"),
    threads: int = typer.Option(None, min=1, help="torch CPU threads (default: torch's choice)"),
    device: str = typer.Option("cpu", help="where the model runs: cpu, cuda or cuda:N"),
    list_methods: bool = typer.Option(False, "--list", help="list the methods and exit"),
):
    """Compress the KV cache of a Hugging Face causal LM with each method and ratio; measure accuracy on
    long-context tasks over real text, the KV bytes held and the latency, against the uncompressed model."""
    if list_methods:
        t = Table(title="attnzoo kv methods (kind: evict = entries removed from memory, read = whole cache kept, "
                        "sparse reads; quantize = stored in fewer bits)")
        for col in ("name", "kind", "stages", "paper"):
            t.add_column(col, overflow="fold")
        for m in method_rows():
            t.add_row(m["name"], m["kind"], "+".join(m["stages"]), m["paper"] or "–")
        console.print(t)
        return
    names = _names(methods, "--methods", [m.name for m in all_methods()])
    ratio_list = _floats(ratios, "--ratios", 0.0, 1.0)
    try:
        length_list = [int(x) for x in lengths.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {lengths!r}",
                                 param_hint="--lengths") from None
    if not length_list or min(length_list) < 128:
        raise typer.BadParameter("prompt lengths must be >= 128 tokens", param_hint="--lengths")
    task_list = _names(task_names, "--tasks", tasks.TASKS)
    depth_list = _floats(depths, "--depths", 0.0, 1.0)
    setting_list = _names(settings, "--settings", kv_eval.SETTINGS)
    if model != DEFAULT_MODEL and not Path(model).is_dir():
        raise typer.BadParameter(f"{model!r} is neither {DEFAULT_MODEL!r} nor a local folder", param_hint="--model")

    import torch

    from ..models import load_causal_lm

    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise typer.BadParameter(f"expected cpu, cuda or cuda:N; got {device!r}", param_hint="--device") from None
    if torch_device.type not in ("cpu", "cuda") or (torch_device.type == "cuda" and not torch.cuda.is_available()):
        raise typer.BadParameter(f"{device!r} is not available here (CUDA available: {torch.cuda.is_available()})",
                                 param_hint="--device")
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        lm, tok = load_causal_lm(model)
    except ModelNotInstalled as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    lm.to(torch_device)
    presses = kv_eval.presses_for(names, ratio_list)
    sample_list = tasks.make_samples(task_list, tok, length_list, depth_list, samples)
    console.print(f"{len(sample_list)} samples x {len(setting_list)} settings x {len(presses) + 1} configurations "
                  f"(uncompressed + {len(presses)}) on {model}")
    records, interrupted = [], False
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` and job schedulers stop runs with SIGTERM
    try:
        kv_eval.evaluate(lm, tok, presses, sample_list, setting_list, records=records)
    except KeyboardInterrupt:
        interrupted = True
        console.print(f"[yellow]interrupted: writing the {len(records)} runs finished so far[/yellow]")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not records:
        raise typer.Exit(130)
    results = {
        "model": model, "device": str(torch_device),
        "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} CPUs, "
                   f"{torch.get_num_threads()} torch threads), torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name(torch_device)}" if torch_device.type == "cuda" else ""),
        "config": {"methods": names, "ratios": ratio_list, "lengths": length_list, "tasks": task_list,
                   "depths": depth_list, "samples": samples, "settings": setting_list},
        "methods": [m for m in method_rows() if m["name"] in names],
        "presses": [repr(p) for p in presses],
        "samples": [{"task": s.task, "length": s.length, "depth": s.depth, "seed": s.seed, "answers": list(s.answers)}
                    for s in sample_list],
        "summary": kv_eval.summarize(records), "records": records, "interrupted": interrupted,
    }
    results["wall_s"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, out / "results.json")
    report.write_html(results, out / "report.html")
    report.print_table(results, console)
    console.print(f"wrote {out / 'results.json'} and {out / 'report.html'} in {results['wall_s']:.0f} s")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    app.command("kv")(kv)
