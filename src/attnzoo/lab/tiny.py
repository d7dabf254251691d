"""A tiny byte-level decoder built from attnzoo.nn head structures, trained on the standard library's
prose on CPU: a sanity check that each structure learns, and a side-by-side of their loss curves,
parameters and KV-cache bytes. `attnzoo train-tiny` runs it."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from .. import nn as azn

HEADS = ("gqa", "mla", "moh", "cla", "diff", "wgqa", "mae", "sa", "diffqkv", "tpla", "hybrid", "coca", "wide")
VOCAB = 256  # bytes


@dataclass
class Config:
    dim: int = 64
    layers: int = 4
    heads: int = 4
    seq: int = 128
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    eval_every: int = 25
    eval_batches: int = 4
    seed: int = 0
    moh_aux_weight: float = 0.01


def attention(kind: str, cfg: Config, layer: int) -> nn.Module:
    """The attention of block `layer` (0-based) for head structure `kind`, about the same size in each."""
    d, h = cfg.dim, cfg.heads
    if kind == "gqa":
        return azn.GroupedQueryAttention(d, h, max(1, h // 2))
    if kind == "mla":
        return azn.MLA(d, h, kv_rank=d // 2, rope_dim=8, head_dim=d // h)
    if kind == "moh":
        return azn.MoHAttention(d, h, shared_heads=1, top_k=max(1, (h - 1) // 2), gates="release")
    if kind == "cla":  # CLA2: even layers make the keys and values, odd layers read the previous layer's
        return azn.CrossLayerAttention(d, h, max(1, h // 2), owns_kv=layer % 2 == 0)
    if kind == "diff":
        return azn.DifferentialAttention(d, max(1, h // 2), layer=layer + 1)
    if kind == "wgqa":
        return azn.WeightedGroupedQueryAttention(d, h, max(1, h // 2))
    if kind == "mae":
        return azn.MixtureOfHeadsMinusOne(d, h)
    if kind == "sa":  # even layers compute the attention weights, odd layers reuse them
        return azn.SharedAttention(d, h, max(1, h // 2), computes_weights=layer % 2 == 0)
    if kind == "diffqkv":
        return azn.DiffQKVAttention(d, h, k_heads=1, v_heads=max(1, h // 2), head_dim=d // h)
    if kind == "tpla":
        return azn.TPLA(d, h, kv_rank=d // 2, rope_dim=8, head_dim=d // h, shards=2)
    if kind == "hybrid":
        return azn.HybridHeadAttention(d, max(1, h // 2), max(1, h - h // 2), head_dim=d // h)
    if kind == "coca":
        return azn.CollinearConstrainedAttention(d, h, max(1, h // 2))
    if kind == "wide":  # decoupled head dim: twice dim // heads
        return azn.DecoupledHeadAttention(d, h, head_dim=2 * d // h)
    raise ValueError(f"heads must be one of {list(HEADS)}, got {kind!r}")


class Block(nn.Module):
    def __init__(self, kind: str, cfg: Config, layer: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = attention(kind, cfg, layer)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim, bias=False), nn.GELU(),
                                 nn.Linear(4 * cfg.dim, cfg.dim, bias=False))

    def forward(self, x, previous=None):
        """`previous`: the cache the block before returned (what CLA and SA layers read)."""
        extra = {}
        if isinstance(self.attn, azn.CrossLayerAttention) and not self.attn.owns_kv:
            extra["kv"] = previous
        if isinstance(self.attn, azn.SharedAttention) and not self.attn.computes_weights:
            extra["weights_from"] = previous
        a, cache = self.attn(self.norm1(x), **extra)
        x = x + a
        return x + self.mlp(self.norm2(x)), cache


class TinyLM(nn.Module):
    """Byte embeddings, pre-norm blocks (attention of one head structure + GELU MLP), tied output."""

    def __init__(self, kind: str, cfg: Config):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(VOCAB, cfg.dim)
        self.blocks = nn.ModuleList(Block(kind, cfg, i) for i in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, cache = self.embed(ids), None
        for block in self.blocks:
            x, cache = block(x, cache)
        return self.norm(x) @ self.embed.weight.T

    def aux_loss(self) -> torch.Tensor | float:
        """MoH's load-balance losses of the last forward, summed (0 for other structures)."""
        return sum((b.attn.aux_loss for b in self.blocks if getattr(b.attn, "aux_loss", None) is not None), 0.0)

    def kv_bytes_per_token(self, dtype=torch.float32) -> int:
        return sum(b.attn.kv_bytes_per_token(dtype) for b in self.blocks)


def byte_data(split: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(models.stdlib_text(split).encode("utf-8")), dtype=torch.uint8).long()


def batches(data: torch.Tensor, cfg: Config, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - cfg.seq - 1, (cfg.batch,), generator=generator)
    return torch.stack([data[s:s + cfg.seq + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: TinyLM, chunks: torch.Tensor) -> float:
    model.eval()
    loss = F.cross_entropy(model(chunks[:, :-1]).flatten(0, 1), chunks[:, 1:].flatten()).item()
    model.train()
    return loss


def train(kind: str, cfg: Config, progress=None) -> dict:
    """Train one TinyLM; `progress()` is told after every step. Losses in nats per byte."""
    torch.manual_seed(cfg.seed)
    model = TinyLM(kind, cfg)
    train_data, heldout = byte_data("train"), byte_data("heldout")
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_chunks = batches(heldout, Config(**{**asdict(cfg), "batch": cfg.batch * cfg.eval_batches}),
                          torch.Generator().manual_seed(cfg.seed + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps)))
    curve, evals = [], [(0, evaluate(model, eval_chunks))]
    start = time.time()
    for step in range(1, cfg.steps + 1):
        chunk = batches(train_data, cfg, gen)
        loss = F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        (loss + cfg.moh_aux_weight * model.aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append((step, loss.item()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evals.append((step, evaluate(model, eval_chunks)))
        if progress is not None:
            progress()
    attn_params = sum(b.attn.num_parameters() for b in model.blocks)
    return dict(heads=kind, parameters=sum(p.numel() for p in model.parameters()), attention_parameters=attn_params,
                kv_bytes_per_token=model.kv_bytes_per_token(), train_curve=curve, heldout_curve=evals,
                first_heldout=evals[0][1], final_heldout=evals[-1][1],
                final_train=sum(v for _, v in curve[-10:]) / len(curve[-10:]),
                bits_per_byte=evals[-1][1] / math.log(2), seconds=round(time.time() - start, 1))


def sections(results: dict) -> list[str]:
    from .report import line_plot, table

    runs, cfg = results["runs"], results["meta"]["config"]
    smooth = max(1, cfg["steps"] // 50)

    def smoothed(curve):
        return [(curve[i][0], sum(v for _, v in curve[i:i + smooth]) / len(curve[i:i + smooth]))
                for i in range(0, len(curve), smooth)]

    train_plot = line_plot({r["heads"]: smoothed(r["train_curve"]) for r in runs}, "step",
                           f"train loss (nats/byte, mean of {smooth} steps)")
    held_plot = line_plot({r["heads"]: r["heldout_curve"] for r in runs}, "step", "held-out loss (nats/byte)")
    intro = (f"<p>A byte-level decoder ({cfg['layers']} pre-norm blocks, dim {cfg['dim']}, {cfg['heads']} heads, "
             f"GELU MLP, tied embeddings) per head structure, AdamW lr {cfg['lr']} (warmup, cosine), "
             f"{cfg['steps']} steps of {cfg['batch']} x {cfg['seq']} bytes of standard-library prose on CPU; held-out "
             f"loss on {cfg['batch'] * cfg['eval_batches']} windows of the held-out split. KV bytes per token: all "
             "layers, float32.</p>")
    rows = [[r["heads"], r["parameters"], r["attention_parameters"], r["kv_bytes_per_token"],
             f"{r['first_heldout']:.3f}", f"{r['final_train']:.3f}", f"{r['final_heldout']:.3f}",
             f"{r['bits_per_byte']:.3f}", r["seconds"]] for r in runs]
    head = ["heads", "parameters", "attention params", "KV bytes/token", "held-out loss at 0", "final train loss",
            "final held-out loss", "bits/byte", "seconds"]
    return [intro, table(head, rows), "<h2>Training loss</h2>", train_plot, "<h2>Held-out loss</h2>", held_plot]


def main(kinds: list[str], cfg: Config, out, threads: int) -> dict:
    """`attnzoo train-tiny`: train each structure with a progress bar, print the table, write the report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from .. import cli_options as opts
    from . import report

    for kind in kinds:  # sizes the structures refuse (dim not divisible by heads, ...) before any training
        try:
            TinyLM(kind, cfg)
        except ValueError as e:
            import typer

            raise typer.BadParameter(str(e)) from None
    n_threads, why = opts.resolve_threads(threads)
    torch.set_num_threads(n_threads)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=opts.console) as bar:
        runs = []
        for kind in kinds:
            task = bar.add_task(f"train {kind}", total=cfg.steps)
            runs.append(train(kind, cfg, lambda task=task: bar.advance(task)))
    results = dict(meta=dict(config=asdict(cfg), data="standard-library docstrings, bytes (train / heldout splits)",
                             torch=torch.__version__, threads=n_threads, threads_reason=why), runs=runs)
    t = Table(title=f"Tiny byte-level LM, {cfg.steps} steps (losses in nats/byte)")
    for col in ("heads", "params", "KV bytes/token", "held-out @0", "final train", "final held-out", "bits/byte", "s"):
        t.add_column(col)
    for r in runs:
        t.add_row(r["heads"], str(r["parameters"]), str(r["kv_bytes_per_token"]), f"{r['first_heldout']:.3f}",
                  f"{r['final_train']:.3f}", f"{r['final_heldout']:.3f}", f"{r['bits_per_byte']:.3f}",
                  str(r["seconds"]))
    opts.console.print(t)
    json_path, html_path = report.write(out, results, "Tiny LM: head structures trained on CPU", sections(results))
    opts.console.print(f"wrote {json_path} and {html_path}")
    return results
