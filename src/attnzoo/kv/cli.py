"""What `attnzoo kv` does once its options are checked: load the model, run every method and ratio on
the long-context tasks, write results.json and report.html. The options themselves live in
`attnzoo.cli` (with `attnzoo.cli_options`), which imports neither torch nor this package."""
from __future__ import annotations

import os
import platform
import signal
import time
from pathlib import Path

import torch
import typer
from rich.table import Table

from .. import cli_options as opts
from . import evaluate as kv_eval
from . import methods as all_methods
from . import report, tasks

console = opts.console


def method_rows() -> list[dict]:
    return [{"name": m.name, "kind": m.kind, "stages": list(m.stages), "paper": str(m.paper) if m.paper else None,
             "summary": m.summary} for m in all_methods()]


def print_methods() -> None:
    t = Table(title="attnzoo kv methods (kind: evict = entries removed from memory, read = whole cache kept, "
                    "sparse reads; quantize = stored in fewer bits)")
    for col in ("name", "kind", "stages", "paper"):
        t.add_column(col, overflow="fold")
    for m in method_rows():
        t.add_row(m["name"], m["kind"], "+".join(m["stages"]), m["paper"] or "–")
    console.print(t)


def method_names(text: str) -> list[str]:
    """The --methods text: registered methods, "all", or compositions "a+b+int4" of eviction presses and
    an optional int8/int4/int2 storage part last."""
    known = [m.name for m in all_methods()]
    plain = [t.strip() for t in text.split(",") if t.strip()]
    if any("+" in t for t in plain):
        for t in plain:
            parts = t.split("+")
            opts.name_list(",".join(p for p in parts if p not in kv_eval.QUANT_PARTS), "--methods", known)
        return plain
    return opts.name_list(text, "--methods", known, allow_all=True)


def run(methods: str, ratios: list[float], lengths: list[int], task_list: list[str], depths: list[float],
        samples: int, settings: list[str], model: str, out: Path, threads: int, device: str,
        compare: str = "") -> None:
    """`methods`: the --methods text, checked here against the registered methods; `compare`: "kvpress"
    runs kvpress's versions of the methods too, in the same table (skipped, with the reason, when kvpress
    cannot run here)."""
    names = method_names(methods)
    torch_device = torch.device(device)
    n_threads, why = opts.resolve_threads(threads, torch_device.type)
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    console.print(f"{n_threads} CPU thread(s): {why}")
    try:
        _run(names, ratios, lengths, task_list, depths, samples, settings, model, out, torch_device, why, compare)
    finally:
        torch.set_num_threads(previous)


def _run(names, ratios, lengths, task_list, depths, samples, settings, model, out, torch_device, why,
         compare="") -> None:
    start = time.perf_counter()
    lm, tok = opts.load_causal_lm(model)
    lm.to(torch_device)
    presses = kv_eval.presses_for(names, ratios)
    compared = {}
    if compare == "kvpress":
        from .compare import kvpress_presses, quantized_cache_note

        adapters, note = kvpress_presses([n for n in names if "+" not in n], ratios)
        compared = {"kvpress": {"presses": len(adapters), "note": note, "quantized_cache": quantized_cache_note()}}
        console.print(f"--compare kvpress: {len(adapters)} kvpress presses" + (f" ({note})" if note else "")
                      + f"; {compared['kvpress']['quantized_cache']}")
        presses += adapters
    with opts.status("building the prompts ..."):
        sample_list = tasks.make_samples(task_list, tok, lengths, depths, samples)
    console.print(f"{len(sample_list)} samples x {len(settings)} settings x {len(presses) + 1} configurations "
                  f"(uncompressed + {len(presses)}) on {model}")
    records, interrupted = [], False
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` and job schedulers stop runs with SIGTERM
    try:
        kv_eval.evaluate(lm, tok, presses, sample_list, settings, records=records)
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
                   f"{torch.get_num_threads()} torch threads: {why}), torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name(torch_device)}" if torch_device.type == "cuda" else ""),
        "config": {"methods": names, "ratios": ratios, "lengths": lengths, "tasks": task_list,
                   "depths": depths, "samples": samples, "settings": settings},
        "methods": [m for m in method_rows() if m["name"] in names],
        "presses": [repr(p) for p in presses],
        "samples": [{"task": s.task, "length": s.length, "depth": s.depth, "seed": s.seed, "answers": list(s.answers)}
                    for s in sample_list],
        "summary": kv_eval.summarize(records), "records": records, "interrupted": interrupted, "compare": compared,
    }
    results["wall_s"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, out / "results.json")
    report.write_html(results, out / "report.html")
    report.print_table(results, console)
    console.print(f"wrote {out / 'results.json'} and {out / 'report.html'} in {results['wall_s']:.0f} s")


def _interrupt(signum, frame):
    raise KeyboardInterrupt
