"""A small learned in-context eviction gate per layer (Attention-Gate), trained here on real text."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from .. import hf
from ..core.info import Paper, nonneg_int, positive_int
from . import profile
from .base import KVPress, register, topk_mask
from .scorers import recent_slots


class EvictionGates(nn.Module):
    """Every layer's gate, with parameters stacked over layers so training runs all layers at once.
    Per layer and KV head: each entry's value and key norm (both position-free) plus a learned head
    embedding feed one causal attention head of width `width` over that head's entries, then a score.
    Higher = keep."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, width: int = 16):
        super().__init__()
        init = lambda *shape: nn.Parameter(torch.randn(*shape) / math.sqrt(shape[-2]))
        self.inp = init(layers, head_dim + 1, width)
        self.head = nn.Parameter(torch.zeros(layers, 1, kv_heads, 1, width))
        self.qkv = init(layers, width, 3 * width)
        self.out = init(layers, 2 * width, 1)
        self.bias = nn.Parameter(torch.zeros(layers, 4 * width + 1))

    def forward(self, keys, values, index, valid, layers=slice(None)) -> torch.Tensor:
        """keys/values (L, B, Hkv, S, D), index/valid (L, B, Hkv, S) for the gates of `layers` -> (L, B, Hkv, S)."""
        w = self.inp.shape[-1]
        bias = self.bias[layers].view(-1, 1, 1, 1, 4 * w + 1)
        feats = torch.cat([values, keys.norm(dim=-1, keepdim=True).log1p()], dim=-1)
        x = torch.nn.functional.gelu(torch.einsum("lbhsd,ldw->lbhsw", feats, self.inp[layers]) + bias[..., :w]
                                     + self.head[layers])
        q, k, v = (torch.einsum("lbhsw,lwx->lbhsx", x, self.qkv[layers]) + bias[..., w:4 * w]).chunk(3, dim=-1)
        visible = (index.unsqueeze(-2) <= index.unsqueeze(-1)) & valid.unsqueeze(-2)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(w)
        ctx = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1).nan_to_num(0.0) @ v
        out = torch.einsum("lbhsw,lwo->lbhso", torch.cat([x, ctx], dim=-1), self.out[layers])
        return (out + bias[..., 4 * w:]).squeeze(-1)


def received_attention(query, key, scaling, tail: int) -> torch.Tensor:
    """(Hkv, S) log of the mean attention each token receives from the queries after it (the gate's
    target), averaged over the query heads of each KV group."""
    p = profile.causal_probs(query, key, scaling, slice(None))[0]  # (Hq, S, S)
    s = p.shape[-1]
    later = (s - torch.arange(s, device=p.device)).clamp(min=1).float()
    mean = p.sum(1) / later
    hk = key.shape[1]
    return mean.view(hk, -1, s).mean(1).clamp(min=1e-6).log()[:, : s - tail]


def train_gates(model, tokenizer, sequences: int = 4, length: int = 160, steps: int = 60, tail: int = 24,
                seed: int = 0) -> tuple[EvictionGates, dict]:
    """Train one gate per layer to rank entries by the attention later queries give them (z-scored log
    mean attention received), on real text, with the LLM frozen. Returns (gates, report)."""
    start = time.perf_counter()
    n_layers = hf.layer_count(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    data = {i: [] for i in range(n_layers)}  # layer -> [(keys, values, target)]
    for j in range(sequences + 1):  # the last sequence is held out to measure the fit
        ids = profile.text_ids(model, tokenizer, length, offset=(17 + j) * length)

        def grab(layer, query, key, value, scaling):
            target = received_attention(query, key, scaling, tail)
            target = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True).clamp(min=1e-6)
            data[layer].append((key.float().cpu(), value.float().cpu(), target.cpu()))

        profile.run_with(model, ids, grab)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    gates = EvictionGates(n_layers, cfg.num_key_value_heads, head_dim)
    opt = torch.optim.Adam(gates.parameters(), lr=3e-3)

    def batch(rows):
        """(keys, values, targets) of sequences `rows`, stacked over layers: (L, B, Hkv, S, ...)."""
        return tuple(torch.stack([torch.cat([data[layer][r][i] for r in rows]) if i < 2 else
                                  torch.stack([data[layer][r][2] for r in rows]) for layer in range(n_layers)])
                     for i in range(3))

    def run(keys, values):
        index = torch.arange(length).expand(*keys.shape[:3], -1)
        return gates(keys, values, index, torch.ones_like(index, dtype=torch.bool))[..., : length - tail]

    train, heldout = batch(list(range(sequences))), batch([sequences])
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = ((run(*train[:2]) - train[2]) ** 2).mean()
            loss.backward()
            opt.step()
    with torch.no_grad():  # held-out rank correlation between gate scores and the target, per layer
        pred = run(*heldout[:2])
        corr = [float(_spearman(pred[i].flatten(), heldout[2][i].flatten())) for i in range(n_layers)]
    gates.eval()
    return gates, {"seconds": time.perf_counter() - start, "heldout_spearman": sum(corr) / len(corr),
                   "final_loss": float(loss.detach())}


def _spearman(a, b):
    ra = torch.argsort(torch.argsort(a)).float()
    rb = torch.argsort(torch.argsort(b)).float()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1]


@register
class AttentionGatePress(KVPress):
    name = "attention_gate"
    paper = Paper("In-context KV-Cache Eviction for LLMs via Attention-Gate", 2024, "2410.12876")
    stages = ("prefill", "decode")
    summary = ("A small learned gate per layer reads the context (values and key norms of every entry, one "
               "causal attention head of width 16) and scores each entry per KV head; the lowest are evicted "
               "in context, at prefill and as decoding adds tokens. Trained here on real text in under a "
               "minute on CPU with the LLM frozen, to predict the attention each token receives from later "
               "queries (the paper tunes gates by continual pre-training instead).")
    params = KVPress.params + (
        nonneg_int("recent", 8, "newest entries always kept (their future attention is not yet known)"),
        positive_int("steps", 60, "training steps (the gates are trained once per model and step count)"),
    )

    def __init__(self, ratio: float = 0.0, **params):
        super().__init__(ratio, **params)
        self.gates: EvictionGates | None = None
        self.training_report: dict = {}

    def prepare(self, model, tokenizer):
        self.gates, self.training_report = profile.cached(model, ("attention_gate", self.steps),
                                                          lambda: train_gates(model, tokenizer, steps=self.steps))
        self.gates.to(next(model.parameters()).device)

    def keep(self, step):
        count = step.n_keep(self.ratio) if step.prefill else step.budget
        held = step.valid.sum(-1)
        if bool((held <= (count if count.dim() == 2 else count.view(-1, 1))).all()):
            return None
        layer = slice(step.layer, step.layer + 1)
        scores = self.gates(step.keys.float()[None], step.values.float()[None], step.index[None], step.valid[None],
                            layer)[0]
        step.extra["gate"] = scores
        scores = scores.masked_fill(recent_slots(step, self.recent), math.inf)
        return topk_mask(scores.masked_fill(~step.valid, -math.inf), count)
