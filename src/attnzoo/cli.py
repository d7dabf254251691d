"""The `attnzoo` command: list | info | bench | kv | heads | transmla | train-tiny.

This module and what it imports at the top (typer, rich, `attnzoo.cli_options`, `attnzoo.bench.cli`)
import neither torch nor transformers: `attnzoo --help` and `attnzoo <command> --help` answer at
once, and a command imports them when it runs. The options of `kv` and `heads` are declared here,
because their packages import torch as they load; their work is in `attnzoo.kv.cli` and
`attnzoo.heads.cli`. `bench` declares its options in `attnzoo.bench.cli` (its package is light).
Options the commands share (--model, --threads, --seed, --out, --device, comma lists) and their
checks live in `attnzoo.cli_options`.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import typer
from rich.table import Table

from . import cli_options as opts
from .bench import cli as bench_cli

app = typer.Typer(add_completion=False, no_args_is_help=True, help="attnzoo: the attention zoo.")
console = opts.console

PATTERN_SHORT = {"causal_self": "CS", "causal_cross": "CX", "noncausal_self": "NS", "noncausal_cross": "NX"}
# The same as attnzoo.kv.tasks.TASKS and attnzoo.kv.evaluate.SETTINGS (a test checks), written out
# here so `attnzoo kv --help` need not import the kv package.
KV_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vartrack", "qa")
KV_SETTINGS = ("query_agnostic", "query_aware")
ABLATIONS = ("zero", "mean")
# attnzoo.lab.tiny.HEADS (a test checks)
TINY_HEADS = ("gqa", "mla", "moh", "cla", "diff", "wgqa", "mae", "sa", "diffqkv", "tpla", "hybrid", "coca", "wide")


def _tool(module: str):
    """A command's working module, imported (with torch) behind a status line."""
    with opts.status("starting (importing torch) ..."):
        return importlib.import_module(module)


@app.command("list")
def list_cmd(
    family: str = typer.Option(None, help="only this family"),
    exact: bool = typer.Option(None, "--exact/--approx", help="only exact / only approximate variants"),
    pattern: str = typer.Option(None, help="only variants serving this pattern, e.g. causal_cross"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Every registered variant: name, family, paper, exact, patterns."""
    import attnzoo as az

    try:
        infos = az.variants(family=family, exact=exact, pattern=pattern)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        print(json.dumps([i.as_dict() for i in infos], indent=1))
        return
    t = Table(title=f"attnzoo: {len(infos)} variants   (CS/CX causal self/cross, NS/NX non-causal self/cross)")
    for col in ("name", "family", "paper", "exact", "patterns", "backends"):
        t.add_column(col, overflow="fold")
    for i in infos:
        paper = "" if i.paper is None else f"{i.paper.title} ({i.paper.year})"
        t.add_row(i.name, i.family, paper, "yes" if i.exact else "approx",
                  " ".join(PATTERN_SHORT[p] for p in i.patterns), " ".join(i.backends))
    console.print(t)


@app.command("info")
def info_cmd(name: str = typer.Argument(..., help="variant name"),
             as_json: bool = typer.Option(False, "--json", help="print JSON"),
             explain: bool = typer.Option(False, "--explain", help="which backend backend='auto' runs for a call "
                                          "(B=1, Hq=4, Hkv=2, D=64, --length tokens), and why the others do not"),
             length: int = typer.Option(1024, "--length", min=1, help="sequence length of the --explain call"),
             device: str = typer.Option("cpu", "--device", help="device of the --explain call (cpu, cuda)")):
    """One variant: parameters, inputs, paper, patterns, cost."""
    import attnzoo as az

    try:
        attn = az.get(name)
        info = attn.info
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None
    d = info.as_dict()
    if explain:
        d["explain"] = _explain_rows(attn, length, device)
    if as_json:
        print(json.dumps(d, indent=1))
        return
    console.print(f"[bold]{info.name}[/bold]  family={info.family}  {'exact' if info.exact else 'approximate'}")
    if info.summary:
        console.print(info.summary)
    if info.paper:
        arxiv = f"  arXiv:{info.paper.arxiv}" if info.paper.arxiv else ""
        console.print(f"paper: {info.paper.title} ({info.paper.year}){arxiv}")
    console.print(f"patterns: {', '.join(info.patterns)}")
    console.print(f"backends: {', '.join(info.backends)}")
    console.print(f"cost: {info.cost}")
    console.print(f"state: {info.state_size}")
    if info.params:
        t = Table(title="parameters")
        for col in ("name", "default", "expected", "doc"):
            t.add_column(col, overflow="fold")
        for p in info.params:
            t.add_row(p.name, repr(p.default), p.expected, p.doc)
        console.print(t)
    if info.inputs:
        t = Table(title="extra inputs (keyword tensors)")
        for col in ("name", "shape", "required", "doc"):
            t.add_column(col, overflow="fold")
        for i in info.inputs:
            t.add_row(i.name, i.shape, "yes" if i.required else "no", i.doc)
        console.print(t)
    if explain:
        t = Table(title=f"backends for one call ({length} tokens on {device}; auto takes the first that runs)")
        for col in ("backend", "priority", "auto", "why"):
            t.add_column(col, overflow="fold")
        for r in d["explain"]:
            t.add_row(r["backend"], str(r["priority"]), "chosen" if r["chosen"] else "", r["reason"])
        console.print(t)


def _explain_rows(attn, length: int, device: str) -> list[dict]:
    import torch

    from . import cli_options
    from .bench.cases import make_inputs

    dev = torch.device(cli_options.device(device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q = torch.randn(1, 4, length, 64, device=dev, dtype=dtype)
    k, v = (torch.randn(1, 2, length, 64, device=dev, dtype=dtype) for _ in range(2))
    causal = "causal_self" in attn.info.patterns
    try:
        inputs = make_inputs(attn, q, k, v) if any(i.required for i in attn.info.inputs) else {}
        return attn.explain(q, k, v, causal=causal, **inputs)
    except (ValueError, TypeError) as e:
        raise typer.BadParameter(f"cannot build a {length}-token call for {attn.name}: {e}") from None


bench_cli.register(app)


@app.command("kv")
def kv_cmd(
    methods: str = typer.Option("all", help="comma-separated methods (attnzoo kv --list), or all; 'a+b+int4' "
                                           "composes presses, stored in int8/int4/int2"),
    ratios: str = typer.Option("0.25,0.5,0.75,0.9", help="fractions of KV entries removed, each in [0, 1)"),
    lengths: str = typer.Option("1024", help="prompt lengths in tokens (each >= 128), e.g. 1024,2048"),
    tasks: str = typer.Option("passkey,niah_single,qa", help=f"comma-separated tasks from {', '.join(KV_TASKS)}, or all"),
    depths: str = typer.Option("0.2,0.8", help="needle depths, each in [0, 1]"),
    samples: int = typer.Option(1, min=1, help="samples per (task, length, depth)"),
    settings: str = typer.Option(",".join(KV_SETTINGS), help="query_agnostic and/or query_aware"),
    model: str = opts.model_option(),
    out: Path = opts.out_option("results/kv"),
    threads: int = opts.threads_option(),
    device: str = typer.Option("cpu", help="where the model runs: cpu, cuda or cuda:N"),
    list_methods: bool = typer.Option(False, "--list", help="list the methods and exit"),
    compare: str = typer.Option("", callback=opts.choice(("", "kvpress")),
                                help="kvpress: also run kvpress's versions of the methods, same samples and table "
                                     "(skipped with the reason when kvpress cannot run here)"),
):
    """Compress the KV cache of a Hugging Face causal LM with each method and ratio; measure accuracy on
    long-context tasks over real text, the KV bytes held and the latency, against the uncompressed model."""
    if list_methods:
        _tool("attnzoo.kv.cli").print_methods()
        return
    checked = dict(
        ratios=opts.float_list(ratios, "--ratios", 0.0, 1.0),
        lengths=opts.int_list(lengths, "--lengths", 128),
        task_list=opts.name_list(tasks, "--tasks", KV_TASKS, allow_all=True),
        depths=opts.float_list(depths, "--depths", 0.0, 1.0, high_included=True),
        settings=opts.name_list(settings, "--settings", KV_SETTINGS, allow_all=True),
    )
    kv = _tool("attnzoo.kv.cli")
    kv.run(methods, **checked, samples=samples, model=model, out=out, threads=threads, device=opts.device(device),
           compare=compare)


@app.command("heads")
def heads_cmd(
    model: str = opts.model_option(),
    probes: str = typer.Option(None, help="comma-separated probes for the causal LM (default: all that fit minutes)"),
    encoder: str = opts.encoder_option(),
    encoder_probes: str = typer.Option(None, help="comma-separated probes for the encoder"),
    out: Path = opts.out_option("results/heads"),
    passkey_tokens: int = typer.Option(384, min=32, help="haystack tokens of the passkey questions"),
    examples: int = typer.Option(8, min=1, help="passkey questions to score heads, and held-out ones to evaluate"),
    text_tokens: int = typer.Option(256, min=16, help="tokens per real-prose segment"),
    draws: int = typer.Option(3, min=1, help="random head sets ablated next to the top heads"),
    ablation: str = typer.Option("zero", callback=opts.choice(ABLATIONS),
                                 help="how heads are ablated: zero | mean"),
    validate: bool = typer.Option(True, help="run the ablation validations"),
    ablation_sweep: bool = typer.Option(False, help="also ablate every head alone (slow: one pass per head)"),
    seed: int = opts.seed_option("seed for question keys and random head draws"),
    threads: int = opts.threads_option(),
    list_probes: bool = typer.Option(False, "--list", help="list the probes and exit"),
):
    """Find what the attention heads of a model do: retrieval, sink, induction ... heads, checked by ablation."""
    heads = _tool("attnzoo.heads.cli")
    if list_probes:
        heads.print_probes()
        return
    settings = dict(passkey_tokens=passkey_tokens, passkey_examples=examples, eval_examples=examples,
                    text_tokens=text_tokens, random_draws=draws, ablation=ablation, validate=validate,
                    ablation_sweep=ablation_sweep, seed=seed)
    heads.run(model, probes, encoder, encoder_probes, out, settings, threads)


@app.command("transmla")
def transmla_cmd(
    ranks: str = typer.Option("256,192,128,64,32", help="latent ranks per layer (each rope_heads also runs its full "
                                                        "rank; larger ranks are skipped)"),
    rope_heads: str = typer.Option("1,3", help="RoRoPE slots (of head_dim channels) that keep RoPE, 1 .. kv_heads"),
    calibration_tokens: int = typer.Option(2048, min=16, help="tokens of real text (train split) for the PCAs"),
    eval_tokens: int = typer.Option(2048, min=16, help="held-out tokens for perplexity"),
    window: int = typer.Option(512, min=16, help="tokens per perplexity window"),
    model: str = opts.model_option(),
    out: Path = opts.out_option("results/transmla"),
    threads: int = opts.threads_option(),
):
    """Convert a GQA model's attention to MLA (TransMLA: RoRoPE, BKV-PCA latent) at several latent ranks;
    KV bytes per token, held-out perplexity and the logit change against the original."""
    lab = _tool("attnzoo.lab.transmla")
    settings = lab.Settings(ranks=opts.int_list(ranks, "--ranks", 1),
                            rope_heads=opts.int_list(rope_heads, "--rope-heads", 1), calibration_tokens=calibration_tokens, eval_tokens=max(eval_tokens, window), window=window)
    lab.main(settings, model, out, threads)


@app.command("train-tiny")
def train_tiny_cmd(
    heads: str = typer.Option("all", help=f"head structures, comma-separated from {', '.join(TINY_HEADS)}, or all"),
    steps: int = typer.Option(300, min=1, help="training steps per structure"),
    dim: int = typer.Option(64, min=8, help="model dimension"),
    layers: int = typer.Option(4, min=1, help="blocks"),
    n_heads: int = typer.Option(4, "--n-heads", min=2, help="attention heads per block"),
    seq: int = typer.Option(128, min=8, help="bytes per training window"),
    batch: int = typer.Option(16, min=1, help="windows per step"),
    lr: float = typer.Option(3e-3, min=0.0, help="peak AdamW learning rate"),
    seed: int = opts.seed_option("seed for initialisation and batches"),
    out: Path = opts.out_option("results/train-tiny"),
    threads: int = opts.threads_option(),
):
    """Train a tiny byte-level LM per head structure on real text on CPU; loss curves, parameters and KV bytes."""
    kinds = opts.name_list(heads, "--heads", TINY_HEADS, allow_all=True)
    lab = _tool("attnzoo.lab.tiny")
    cfg = lab.Config(dim=dim, layers=layers, heads=n_heads, seq=seq, batch=batch, steps=steps, lr=lr, seed=seed,
                     eval_every=max(1, steps // 12))
    lab.main(kinds, cfg, out, threads)
