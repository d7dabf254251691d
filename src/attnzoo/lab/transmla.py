"""TransMLA on a real checkpoint: every attention layer of a Hugging Face Llama-style GQA model
(SmolLM2 by default) converted to MLA form (`attnzoo.nn.transmla`), calibrated on the standard
library's prose; for each (rope_heads, latent rank): KV bytes per token, held-out perplexity and the
largest logit change against the original model. `attnzoo transmla` runs it."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import models
from ..nn.common import element_bytes
from ..nn.mla import MLA
from ..nn.transmla import TRANSMLA_PAPER, transmla


@dataclass
class Settings:
    ranks: list[int] = field(default_factory=lambda: [256, 192, 128, 64, 32])
    rope_heads: list[int] = field(default_factory=lambda: [1, 3])
    calibration_tokens: int = 2048
    eval_tokens: int = 2048
    window: int = 512


class ConvertedAttention(nn.Module):
    """An MLA module in the place of a transformers attention module: same call, whole unpadded
    sequences from position 0 without a transformers cache (perplexity and logit checks)."""

    def __init__(self, mla: MLA):
        super().__init__()
        self.mla = mla

    def forward(self, hidden_states, attention_mask=None, cache=None, past_key_values=None, **kwargs):
        if cache is not None or past_key_values is not None:
            raise ValueError("ConvertedAttention runs whole sequences: call the model with use_cache=False")
        if attention_mask is not None:  # transformers passes None for unpadded causal input
            raise ValueError("ConvertedAttention runs unpadded causal sequences; got an attention mask (padding?)")
        return self.mla(hidden_states)[0], None


def layers_of(lm):
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(lm).__name__}: expected a Llama-style model (model.layers[i].self_attn)")
    return layers


def gqa_layout(lm) -> dict:
    c = lm.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0),
                                                    "rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"transmla: only plain RoPE is converted, this model uses {rope.get('rope_type')!r}")
    if getattr(c, "attention_bias", False):
        raise ValueError("transmla: attention projections with biases are not converted")
    return dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, rope_base=float(rope["rope_theta"]),
                layers=c.num_hidden_layers)


@torch.no_grad()
def attention_inputs(lm, ids: torch.Tensor) -> list[torch.Tensor]:
    """What each attention layer reads (its normed hidden states), (N, dim) per layer, on ids (B, S)."""
    seen: list[torch.Tensor] = []

    def grab(_module, _args, kwargs):
        seen.append(kwargs["hidden_states"].reshape(-1, kwargs["hidden_states"].shape[-1]).detach())

    handles = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers_of(lm)]
    try:
        lm(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def convert(lm, inputs: list[torch.Tensor], kv_rank: int | None, rope_heads: int) -> list[MLA]:
    """The MLA form of every attention layer of lm, from its weights and calibration `inputs`."""
    lay = gqa_layout(lm)
    out = []
    for layer, x in zip(layers_of(lm), inputs, strict=True):
        a = layer.self_attn
        out.append(transmla(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, lay["heads"],
                            lay["kv_heads"], x, kv_rank, rope_heads, lay["rope_base"]))
    return out


@contextlib.contextmanager
def swapped(lm, converted: list[MLA]):
    """lm with its attention modules replaced by `converted` (restored on exit)."""
    layers = layers_of(lm)
    original = [layer.self_attn for layer in layers]
    try:
        for layer, m in zip(layers, converted, strict=True):
            layer.self_attn = ConvertedAttention(m)
        yield lm
    finally:
        for layer, a in zip(layers, original, strict=True):
            layer.self_attn = a


@contextlib.contextmanager
@torch.no_grad()
def pooled(lm, kv_heads: int):
    """lm with each group of its KV heads replaced by the group's mean (GQA's conversion to
    `kv_heads` KV heads, without uptraining; the same function as a model with that many KV heads),
    restored on exit: the baseline at the same KV bytes."""
    g, d = gqa_layout(lm)["kv_heads"], gqa_layout(lm)["head_dim"]
    saved = []
    for layer in layers_of(lm):
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            saved.append((proj, proj.weight.detach().clone()))
            w = proj.weight.view(kv_heads, g // kv_heads, d, -1)
            w.copy_(w.mean(dim=1, keepdim=True).expand_as(w))
    try:
        yield lm
    finally:
        for proj, w in saved:
            proj.weight.copy_(w)


@torch.no_grad()
def perplexity(lm, windows: torch.Tensor) -> float:
    """exp of the mean next-token loss over windows (W, S), each run alone."""
    total, count = 0.0, 0
    for w in windows:
        logits = lm(w[None], use_cache=False).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
    return float(torch.exp(torch.tensor(total / count)))


@torch.no_grad()
def logits(lm, ids: torch.Tensor) -> torch.Tensor:
    return lm(ids, use_cache=False).logits


def pooled_kv_heads(kv_heads: int) -> list[int]:
    """The smaller KV head counts GQA's mean pooling can reach: the divisors of kv_heads below it."""
    return [k for k in range(kv_heads - 1, 0, -1) if kv_heads % k == 0]


def run(lm, tokenizer, settings: Settings, model_label: str = "SmolLM2-135M-Instruct", progress=None) -> dict:
    """Every (rope_heads, rank) row of the sweep plus each rope_heads' full rank, then the GQA
    mean-pooling baseline at fewer KV heads; `progress(label)` is told before each row."""
    start = time.time()
    lay = gqa_layout(lm)
    d, g = lay["head_dim"], lay["kv_heads"]
    calib = models.real_token_ids(tokenizer, settings.calibration_tokens, "train")
    n_win = settings.eval_tokens // settings.window
    windows = models.real_token_ids(tokenizer, n_win * settings.window, "heldout").view(n_win, settings.window)
    inputs = attention_inputs(lm, calib)
    nbytes = element_bytes(next(lm.parameters()).dtype)
    base_elements = 2 * g * d
    reference = logits(lm, windows[:1])
    rows = [dict(config="GQA (original)", rope_heads=None, kv_rank=None, rope_dim=None,
                 kv_elements_per_layer=base_elements, kv_bytes_per_token=base_elements * nbytes * lay["layers"],
                 kv_fraction=1.0, perplexity=perplexity(lm, windows), max_logit_diff=0.0)]
    for rh in settings.rope_heads:
        full = (g - rh) * d + g * d
        for rank in sorted({full, *(r for r in settings.ranks if r <= full)}, reverse=True):
            if progress is not None:
                progress(f"rope_heads={rh} kv_rank={rank}")
            t0 = time.time()
            converted = convert(lm, inputs, rank, rh)
            with swapped(lm, converted):
                diff = (logits(lm, windows[:1]) - reference).abs().max().item()
                ppl = perplexity(lm, windows)
            elements = converted[0].kv_elements_per_token()
            rows.append(dict(config=f"MLA r={rank} rope={rh * d}", rope_heads=rh, kv_rank=rank, rope_dim=rh * d,
                             kv_elements_per_layer=elements, kv_bytes_per_token=elements * nbytes * lay["layers"],
                             kv_fraction=elements / base_elements, perplexity=ppl, max_logit_diff=diff,
                             full_rank=rank == full, seconds=round(time.time() - t0, 2)))
    for k in pooled_kv_heads(g):
        if progress is not None:
            progress(f"GQA pooled to {k} KV heads")
        with pooled(lm, k):
            diff = (logits(lm, windows[:1]) - reference).abs().max().item()
            ppl = perplexity(lm, windows)
        rows.append(dict(config=f"GQA mean-pooled to {k} KV head{'s' * (k > 1)}", rope_heads=None, kv_rank=None,
                         rope_dim=None, kv_elements_per_layer=2 * k * d, kv_bytes_per_token=2 * k * d * nbytes
                         * lay["layers"], kv_fraction=k / g, perplexity=ppl, max_logit_diff=diff))
    skipped = [dict(rope_heads=rh, kv_rank=r, reason=f"larger than the {(g - rh) * d + g * d} channels compressed")
               for rh in settings.rope_heads for r in settings.ranks if r > (g - rh) * d + g * d]
    return dict(meta=dict(model=model_label, paper=str(TRANSMLA_PAPER), **lay, dtype=str(next(lm.parameters()).dtype),
                          settings=asdict(settings), eval_windows=n_win, seconds=round(time.time() - start, 1),
                          torch=torch.__version__, threads=torch.get_num_threads()),
                rows=rows, skipped=skipped)


def sections(results: dict) -> list[str]:
    from .report import line_plot, table

    meta, rows = results["meta"], results["rows"]
    series: dict[str, list] = {}
    for r in rows:
        if r["kv_rank"] is None:
            continue
        series.setdefault(f"MLA, RoPE on {r['rope_dim']} channels", []).append((r["kv_bytes_per_token"] / 1024,
                                                                               r["perplexity"]))
    series["GQA: original and mean-pooled KV heads"] = [(r["kv_bytes_per_token"] / 1024, r["perplexity"])
                                                        for r in rows if r["kv_rank"] is None]
    s = meta["settings"]
    intro = (f"<p>{meta['model']}: {meta['layers']} layers, {meta['heads']} query heads, {meta['kv_heads']} KV heads "
             f"of dim {meta['head_dim']}, RoPE base {meta['rope_base']:g}, {meta['dtype']}. Every layer converted "
             f"to MLA as in <i>{meta['paper']}</i>: RoRoPE (per-frequency PCA over KV heads; the first rope_heads "
             "slots keep RoPE, the others drop it), then a joint latent from the PCA of the position-free key "
             "channels and the values, keys scaled to the values' norm (BKV-PCA). Baseline at the same KV bytes: "
             "GQA's mean pooling of KV heads (no uptraining). Calibration: "
             f"{s['calibration_tokens']} tokens of standard-library prose (train split); perplexity on "
             f"{meta['eval_windows']} held-out windows of {s['window']} tokens; logit difference on the first window. "
             f"No fine-tuning after conversion. KV bytes per token: all layers, in {meta['dtype']}.</p>")
    head = ["config", "rope dim", "latent rank", "KV elements / layer", "KV bytes / token", "of GQA",
            "perplexity", "max |logit diff|"]
    body = [[r["config"], r["rope_dim"] or "–", r["kv_rank"] or "–", r["kv_elements_per_layer"],
             r["kv_bytes_per_token"], f"{r['kv_fraction']:.2f}", f"{r['perplexity']:.3f}",
             f"{r['max_logit_diff']:.2e}"] for r in rows]
    plot = line_plot(series, "KV cache, KiB per token", "held-out perplexity", log_y=True)
    return [intro, "<h2>Perplexity against KV bytes</h2>", plot, "<h2>Rows</h2>", table(head, body)]


def main(settings: Settings, model: str, out, threads: int) -> dict:
    """`attnzoo transmla`: load the model, run the sweep with a progress bar, print the table, write
    results.json and report.html to `out`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .. import cli_options as opts
    from . import report

    n_threads, why = opts.resolve_threads(threads)
    torch.set_num_threads(n_threads)
    lm, tok = opts.load_causal_lm(model)
    lay = gqa_layout(lm)
    if max(settings.rope_heads) > lay["kv_heads"]:
        import typer

        raise typer.BadParameter(f"each must be <= the model's {lay['kv_heads']} KV heads, got {settings.rope_heads}",
                                 param_hint="--rope-heads")
    g, d = lay["kv_heads"], lay["head_dim"]
    total = len(pooled_kv_heads(g)) + sum(1 + sum(r < (g - rh) * d + g * d for r in set(settings.ranks))
                                          for rh in settings.rope_heads)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=opts.console) as bar:
        task = bar.add_task("calibrating", total=total)

        def step(label: str) -> None:
            if bar.tasks[task].description != "calibrating":
                bar.advance(task)
            bar.update(task, description=label)

        results = run(lm, tok, settings, models.label(model), step)
        bar.update(task, completed=total, description="done")
    results["meta"].update(threads=n_threads, threads_reason=why)
    t = Table(title=f"TransMLA on {results['meta']['model']} (held-out perplexity, KV bytes per token over all layers)")
    for col in ("config", "KV bytes/token", "of GQA", "perplexity", "max |logit diff|"):
        t.add_column(col)
    for r in results["rows"]:
        t.add_row(r["config"], str(r["kv_bytes_per_token"]), f"{r['kv_fraction']:.2f}", f"{r['perplexity']:.3f}",
                  f"{r['max_logit_diff']:.2e}")
    opts.console.print(t)
    json_path, html_path = report.write(out, results, f"TransMLA: {results['meta']['model']} as MLA",
                                        sections(results))
    opts.console.print(f"wrote {json_path} and {html_path}")
    return results
