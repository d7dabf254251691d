"""`attnzoo bench` end to end: capture, fidelity, in-model quality, speed and memory, results.

`run(config)` returns the results dictionary that `report` writes as results.json and HTML.
Every registered variant is covered unless `config.variants` names some; what a variant cannot
do is recorded with its reason (an `error` field), never raised.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import models
from ..core.api import variant_class, variants
from . import budget, capture, cases, fidelity, quality, speed

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Config:
    variants: list[str] | None = None  # None: every registered variant
    # Speed and memory. The default stops at 1024 to keep the run short; the CPU paths are compared at
    # 1k-16k with e.g. --speed-only --lengths 1024,2048,4096,8192,16384 --variants full,sliding_window,...
    lengths: tuple[int, ...] = (256, 1024)
    text_length: int = 512  # tokens of real text for capture, fidelity and in-model quality
    layers: list[int] | None = None  # None: LAYERS evenly spaced over the model
    model: str = models.DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    backends: tuple[str, ...] = ("torch", "sdpa")
    patterns: tuple[str, ...] | None = None  # None: each variant's fidelity pattern (causal self for most)
    modes: tuple[str, ...] = speed.MODES
    sweep_points: int = 3  # budget values swept for the error-vs-budget plot, besides KEEP_FRACTIONS
    # Per budget-comparable configuration, also time the torch engine's tiles and SDPA with the dense mask.
    paths: bool = True
    speed_only: bool = False  # skip fidelity and in-model quality
    timing: speed.Timing = field(default_factory=lambda: speed.Timing(repeats=5, min_repeats=2, max_seconds=0.25,
                                                                      slow_ms=1000.0))
    seed: int = 0
    cache_dir: Path | None = None
    quick: bool = False
    threads: int = 0  # CPU threads; 0: torch's default, or 1 when other work already fills the CPUs


LAYERS = 4


class BadConfig(ValueError):
    """A setting the model cannot serve (layers it lacks, text longer than its context)."""


def quick_config(**overrides) -> Config:
    """A smoke run of every step: one short length, 2 layers, 2 sweep points, one timed call a row."""
    base = dict(lengths=(128,), text_length=128, sweep_points=2, quick=True,
                timing=speed.Timing(repeats=1, min_repeats=1, max_seconds=0.0))
    return Config(**{**base, **overrides})


def default_backends(device: str) -> tuple[str, ...]:
    """Compiled Flex is timed on CUDA; on CPU it is forward-only and compiles for ~10 s per
    variant and shape, so it is timed there only when asked for (--backends torch,sdpa,flex)."""
    return ("torch", "sdpa", "flex") if device.startswith("cuda") else ("torch", "sdpa")


def evenly_spaced_layers(n_layers: int, count: int) -> list[int]:
    count = min(count, n_layers)
    return sorted({round(i * (n_layers - 1) / max(count - 1, 1)) for i in range(count)})


class Steps:
    """Progress of the run: one bar per section (rich), or nothing."""

    def __init__(self, progress=None):
        self.progress = progress
        self.task = None

    def start(self, label: str, total: int) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.update(self.task, completed=self.progress.tasks[self.task].total)
            self.task = self.progress.add_task(label, total=total)

    def tick(self) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)


def choose_threads(config: Config) -> tuple[int, str]:
    """(CPU threads, why). On a CPU that other processes already keep busy, several OpenMP threads
    spin waiting for each other and the run takes several times longer for noisier numbers."""
    if config.threads:
        return config.threads, "--threads"
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    default = torch.get_num_threads()
    free = max(1, int(cpus - load + 0.5))  # the CPUs other processes leave idle, rounded
    if config.device == "cpu" and free < default:
        return free, (f"1-minute load average {load:.1f} on {cpus} CPUs: {free} thread{'s' * (free > 1)}, one per "
                      "idle CPU (oversubscribed OpenMP threads spin against each other)")
    return default, "torch's default"


def run(config: Config, steps: Steps | None = None) -> dict:
    threads, why = choose_threads(config)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = _run(config, steps or Steps())
    finally:
        torch.set_num_threads(previous)
    results["meta"].update(cpu_threads=threads, cpu_threads_reason=why)
    return results


@dataclass
class _Model:
    """The loaded model, the layers captured, and the held-out tokens."""

    lm: object
    tok: object
    layers: list[int]
    held: torch.Tensor


def _run(config: Config, steps: Steps) -> dict:
    t_start = time.perf_counter()
    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    names = config.variants or [i.name for i in variants()]
    timings: dict[str, float] = {}
    with _timed(timings, "load_model"):
        steps.start("loading the model", 1)
        m = _load(config)
    steps.start("capturing q/k/v", 1)
    qkv, cap_info = capture.captured_qkv(config.model, config.text_length, m.layers, lambda: (m.lm, m.tok),
                                         cache_dir=config.cache_dir)
    timings["capture"] = cap_info["seconds"]
    q, k, v = (x.to(device) for x in capture.stacked(qkv, m.layers))
    fid, qual = [], {"tokens": 0, "baseline": None, "baselines_by_length": {}, "rows": []}
    if not config.speed_only:
        with _timed(timings, "fidelity"):
            fid = _fidelity(names, (q, k, v), config, dtype, steps)
        with _timed(timings, "quality"):
            configs = quality_configs(names, fid)
            steps.start("in-model quality", len(configs) + 1)
            with _placed(m.lm, device, dtype):
                qual = quality.run(m.lm, m.held.to(device), configs, steps.tick)
    with _timed(timings, "speed"):
        spd = _speed(names, (q[:1], k[:1], v[:1]), config, device, dtype, steps)
    steps.start("done", 1)
    steps.tick()
    timings["total"] = time.perf_counter() - t_start
    return {
        "schema": 1,
        "meta": _meta(config, device, dtype),
        "config": _config_dict(config, names, m.layers),
        "model": {"name": config.model, "layers": m.lm.config.num_hidden_layers, "q_heads": q.shape[1],
                  "kv_heads": k.shape[1], "head_dim": q.shape[3],
                  "context": getattr(m.lm.config, "max_position_embeddings", None)},
        "capture": {**cap_info, "length": config.text_length, "layers": m.layers, "split": "train"},
        "variants": {n: _variant_entry(n, config.text_length) for n in names},
        "fidelity": fid,
        "quality": qual,
        "speed": spd,
        "timings_s": timings,
    }


@contextlib.contextmanager
def _timed(timings: dict, key: str):
    t = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t


def _load(config: Config) -> _Model:
    lm, tok = models.load_causal_lm(config.model)
    n_layers = lm.config.num_hidden_layers
    layers = config.layers if config.layers is not None else evenly_spaced_layers(n_layers, 2 if config.quick else LAYERS)
    _check_layers(layers, n_layers)
    _check_text_length(config.text_length, lm)
    return _Model(lm, tok, layers, _held_out_ids(tok, config.text_length))


def _fidelity(names: list[str], captured: tuple, config: Config, dtype: torch.dtype, steps: Steps) -> list[dict]:
    """Fidelity rows of `names`, and of the top-k oracle where a content-sparse variant is measured without it
    (its sweep is the bound the budget plot draws; it is not ranked unless named)."""
    from ..core.selection import SelectionVariant

    if budget.ORACLE not in names and any(issubclass(variant_class(n), SelectionVariant) for n in names):
        names = [*names, budget.ORACLE]
    sources = {"captured": captured, "gaussian": _gaussian_like(*captured, config.seed)}
    steps.start("fidelity", sum(_case_count(n, config, captured, len(sources)) for n in names))
    return fidelity.run(names, sources, config.text_length, dtype, config.sweep_points, config.seed, steps.tick)


def _speed(names: list[str], captured: tuple, config: Config, device: torch.device, dtype: torch.dtype,
           steps: Steps) -> list[dict]:
    """Every speed row; `captured` (one layer's q/k/v) serves the lengths it covers."""
    q, k, _ = captured
    geometry = speed.Geometry(1, q.shape[1], k.shape[1], q.shape[3])
    rows = speed_rows(names, config, device)
    steps.start("speed and memory", len(rows))
    out = []
    for row in rows:
        out.append(speed.measure(row, geometry, dtype, device, config.timing, captured, config.seed))
        steps.tick()
    speed.add_ratios(out)
    return out


def quality_configs(names: list[str], fid: list[dict]) -> list[dict]:
    """What runs in the model: each budgeted variant at the budgets keeping cases.KEEP_FRACTIONS of
    the keys (as chosen by fidelity on the captured q/k/v), every other variant at its defaults."""
    out = []
    for name in names:
        keep = {}
        for r in fid:
            if r["variant"] == name and r["source"] == "captured" and r.get("keep_target") and not r["error"]:
                keep.setdefault(r["keep_target"], r["params"])
        if keep:
            out += [{"variant": name, "params": p, "keep_target": f} for f, p in sorted(keep.items(), reverse=True)]
        else:
            out.append({"variant": name, "params": {}, "keep_target": None})
    return out


def budget_configs(name: str, length: int) -> list[tuple[dict, float | None]]:
    """(params, keep_target) a variant is timed at, at `length`: its budgets keeping each of
    cases.KEEP_FRACTIONS of the keys there, or its defaults when it has no countable budget."""
    out = []
    for fraction in cases.KEEP_FRACTIONS:
        try:
            found = cases.budget_for(name, length, fraction)
        except Exception:  # the row records why the variant cannot run
            found = None
        if found is not None and all(p != {cases.budget_param(name): found[0]} for p, _ in out):
            out.append(({cases.budget_param(name): found[0]}, fraction))
    return out or [({}, None)]


def patterns_for(name: str, config: Config) -> list[str]:
    """The requested patterns the variant serves; by default its fidelity pattern alone."""
    served = variant_class(name).class_info().patterns
    if config.patterns is None:
        p = cases.fidelity_pattern(name)
        return [p] if p else []
    return [p for p in config.patterns if p in served]


def speed_rows(names: list[str], config: Config, device: torch.device) -> list[speed.Row]:
    """Anchors (SDPA's exact attention; on CUDA also its cuDNN and flash kernels) first, then every
    variant on every requested backend it lists, in its patterns (see patterns_for), at each
    length (fitted to the variant, see cases.fit; anchors are added at fitted lengths too), at the
    budgets keeping cases.KEEP_FRACTIONS of the keys there. With `config.paths`, the first of those
    budgets is also timed on the torch engine's tiles and as SDPA with the dense boolean mask."""
    rows, needed = [], set()
    for name in names:
        info = variant_class(name).class_info()
        for n in config.lengths:
            length = _fitted(name, n)
            for i, (params, keep) in enumerate(budget_configs(name, length)):
                backends = [b for b in config.backends if b in info.backends]
                if config.paths and i == 0 and "torch" in backends and _fused_capable(name):
                    backends += [speed.TILES] + ([speed.SDPA_MASK] if variant_class(name).has_mask else [])
                for backend in backends:
                    for p in patterns_for(name, config):
                        for m in config.modes:
                            rows.append(speed.Row(name, backend, p, length, m, params, keep))
                            needed.add((p, length, m))
    if config.patterns is not None:
        needed |= {(p, n, m) for p in config.patterns for n in config.lengths for m in config.modes}
    kernels = ["sdpa"] + (list(speed.SDPA_KERNELS) if device.type == "cuda" else [])
    anchors = [speed.Row("full", k, p, n, m) for k in kernels for p, n, m in sorted(needed)]
    unique = {}
    for row in anchors + rows:
        unique.setdefault(row.key, row)
    return list(unique.values())


def _fused_capable(name: str) -> bool:
    """A softmax variant defined by a mask alone (or none): the kind the torch backend's fused path and
    its tiles both compute (and, with a mask, SDPA given the dense mask)."""
    from ..core.variant import SoftmaxVariant

    cls = variant_class(name)
    return (issubclass(cls, SoftmaxVariant) and not cls.has_score and not cls.carries
            and cls.normalization == "softmax" and cls.forward_torch is SoftmaxVariant.forward_torch)


def _case_count(name: str, config: Config, captured: tuple, sources: int) -> int:
    """Fidelity rows of `name`: every case on the captured q/k/v, the compared ones on the other sources."""
    try:
        todo = fidelity.cases_for(name, config.text_length, config.sweep_points, captured[0], captured[1])
    except Exception:  # fidelity.run records the reason in one row
        return sources
    return len(todo) + (sources - 1) * sum(1 for c in todo if c["default"] or c["keep_target"])


def _fitted(name: str, length: int) -> int:
    try:
        return cases.fit(name, length)[0]
    except cases.Unrunnable:  # measure() records the reason on the row
        return length


def _gaussian_like(q, k, v, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g).to(t) for t in (q, k, v))


@contextlib.contextmanager
def _placed(model, device: torch.device, dtype: torch.dtype):
    """The model on `device`; on CUDA also in `dtype`. On CPU it stays float32 (fast matmuls)."""
    target = dtype if device.type == "cuda" else torch.float32
    before = next(model.parameters())
    moved = (before.device, before.dtype) != (device, target)
    if moved:
        model.to(device=device, dtype=target)
    try:
        yield model
    finally:
        if moved:
            model.to(device=before.device, dtype=before.dtype)


def _check_layers(layers: list[int], n_layers: int) -> None:
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise BadConfig(f"--layers {bad} do not exist: the model has layers 0..{n_layers - 1}")


def _check_text_length(length: int, lm) -> None:
    context = getattr(lm.config, "max_position_embeddings", None)
    if context and length > context:
        raise BadConfig(f"--text-length {length} exceeds the model's context of {context} tokens")


def _held_out_ids(tok, length: int) -> torch.Tensor:
    try:
        return models.real_token_ids(tok, length, "heldout")
    except ValueError as e:  # more tokens than the held-out text has
        raise BadConfig(f"--text-length {length}: {e}") from None


def _variant_entry(name: str, length: int) -> dict:
    entry = {"info": variant_class(name).class_info().as_dict(), "budget_param": cases.budget_param(name), "inputs": None,
             "fidelity_pattern": cases.fidelity_pattern(name)}
    try:
        entry["inputs"] = cases.describe_inputs(cases.configure(name, length))
    except Exception as e:
        entry["error"] = f"{type(e).__name__}: {e}"
    return entry


def _meta(config: Config, device: torch.device, dtype: torch.dtype) -> dict:
    versions = capture.versions()
    return {
        "versions": {**versions, "python": platform.python_version()},
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "dtype": str(dtype).removeprefix("torch."),
        "seed": config.seed,
        "memory_method": speed.memory_method(device),
        "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter",
    }


def _config_dict(config: Config, names: list[str], layers: list[int]) -> dict:
    d = asdict(config)
    d.update(variants=names, layers=layers, cache_dir=str(config.cache_dir or models.cache_dir()),
             lengths=list(config.lengths), backends=list(config.backends),
             patterns=None if config.patterns is None else list(config.patterns), modes=list(config.modes),
             keep_fractions=list(cases.KEEP_FRACTIONS))
    return d
