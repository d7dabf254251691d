"""`attnzoo bench --task mqar`: the MQAR recall sweep from the command line (options parsed in
`attnzoo.bench.cli`, which calls `main` here when the command runs)."""
from __future__ import annotations

from pathlib import Path

import typer

from .. import cli_options as opts

console = opts.console
DEFAULT_OUT = Path("results/mqar")
# `--mqar KEY=VALUE ...`: the Sweep / Train fields a user may set, and how each is read.
TUPLES = ("lengths", "pairs", "widths", "windows", "feature_dims")
INTS = ("vocab_size", "width", "hybrid_window", "mlp_ratio", "final_eval_answers")
TRAIN_INTS = ("steps", "tokens", "batch_size", "eval_answers", "check_every", "lr_width")
TRAIN_FLOATS = ("lr", "weight_decay", "warmup", "target")


class Progress:
    """The sweep's progress: one bar for the configurations, one for the steps of each run under way
    (several when worker processes train side by side; `key` names the run)."""

    def __init__(self, progress, total: int):
        self.progress = progress
        self.overall = progress.add_task("configurations", total=total, acc="")
        self.tasks: dict = {}

    def start(self, label: str, total: int, key=None) -> None:
        if key is None:  # one run at a time: a new one ends the last
            self.finish()
        self.tasks[key] = self.progress.add_task(label, total=total, acc="")

    def tick(self, accuracy: float, key=None) -> None:
        self.progress.update(self.tasks[key], advance=1, acc=f"held-out {accuracy:.3f}")

    def done(self, key=None) -> None:
        task = self.tasks.pop(key, None)
        if task is not None:
            self.progress.remove_task(task)
            self.progress.advance(self.overall)

    def finish(self) -> None:
        for key in list(self.tasks):
            self.done(key)


def parse_settings(text: str | None) -> dict:
    """`--mqar "steps=600 widths=32,64 vocab_size=128 random_non_queries=false"` -> {"steps": 600, ...}."""
    out = {}
    for item in (text or "").replace(";", " ").split():
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--mqar")
        try:
            if key in TUPLES:
                out[key] = tuple(int(v) for v in value.split(",") if v)
            elif key in INTS or key in TRAIN_INTS:
                out[key] = int(value)
            elif key in TRAIN_FLOATS or key == "power_a":
                out[key] = float(value)
            elif key == "schedule":
                out[key] = value
            elif key == "random_non_queries":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            else:
                known = sorted(TUPLES + INTS + TRAIN_INTS + TRAIN_FLOATS + ("power_a", "random_non_queries", "schedule"))
                raise typer.BadParameter(f"unknown setting {key!r}; known: {', '.join(known)}", param_hint="--mqar")
        except ValueError:
            raise typer.BadParameter(f"{key}: cannot read {value!r}", param_hint="--mqar") from None
    return out


def build_sweep(quick: bool, variants: str | None, lengths: str | None, steps: int | None, seed: int,
                settings: str | None):
    """The Sweep the options describe; a bad value is a typer.BadParameter naming the option."""
    from . import recall

    given = parse_settings(settings)
    train_kw = {k: given.pop(k) for k in list(given) if k in TRAIN_INTS or k in TRAIN_FLOATS or k == "schedule"}
    base = recall.quick_sweep() if quick else recall.Sweep()
    train_kw = {**vars(base.train), **train_kw, "seed": seed}
    if steps is not None:
        train_kw["steps"] = steps
    kw = {**given}
    if lengths:
        kw["lengths"] = tuple(opts.int_list(lengths, "--lengths", 4))
    if variants:
        names = [x.strip() for x in variants.split(",") if x.strip()]
        kw["variants"] = _all_variants() if names == ["all"] else names
    try:
        train = recall.Train(**train_kw)
        sweep = (recall.quick_sweep if quick else recall.Sweep)(**kw, train=train)
        recall.plan(sweep)
    except (ValueError, TypeError) as e:
        hint = "--variants" if str(e).startswith("variants") else "--lengths" if "seq_len" in str(e) else "--mqar"
        raise typer.BadParameter(str(e), param_hint=hint) from None
    return sweep


def _all_variants() -> list[str]:
    from ..core.api import variants

    return [i.name for i in variants()]


def main(quick: bool, variants: str | None, lengths: str | None, steps: int | None, out: Path, seed: int,
         threads: int, settings: str | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    with opts.status("starting (importing torch) ..."):
        from . import recall, recall_report

    sweep = build_sweep(quick, variants, lengths, steps, seed, settings)
    todo, _ = recall.plan(sweep)
    columns = (SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[acc]}"), TimeElapsedColumn())
    with RichProgress(*columns, console=console, transient=False) as progress:
        steps_ = Progress(progress, len(todo))
        results = recall.run(sweep, threads=threads, steps=steps_, parallel=True)
        steps_.finish()
    if not console.is_terminal:
        console.width = 160
    recall_report.print_table(results, console)
    json_path, html_path = recall_report.write(results, out)
    meta = results["meta"]
    console.print(f"wrote {json_path} and {html_path} in {results['timings_s']['total']:.0f} s "
                  f"({meta['cpu_threads']} CPU threads, {meta['worker_processes']} worker processes: "
                  f"{meta['cpu_threads_reason']}; load average "
                  f"{meta['load_average_start']} -> {meta['load_average_end']})")
