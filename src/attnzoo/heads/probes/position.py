"""Positional attention bias and its calibration ("Found in the Middle: Calibrating Positional
Attention Bias Improves Long Context Utilization", Hsieh et al., 2024).

The bias of a head: how much attention the question's tokens give each position of a context that
holds nothing relevant (real prose, no needle), as a curve over depth buckets. Calibration
subtracts that expected attention from the question rows' attention on the context (clipped at 0,
the context's total mass kept), so what remains is attention by relevance; passkey accuracy by
needle depth is measured with and without it.
"""
from __future__ import annotations

import functools

import torch

from ... import hf
from ...core.info import Paper
from .. import tasks
from ..capture import attention_probs, watch_attention
from ..session import Session
from .base import Probe, top_summary

BUCKETS = 10


def haystack_prompt(tokenizer, context_tokens: int, split: str, offset: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """A passkey prompt whose context holds no needle: (ids (1, S), context span)."""
    text = tasks.split_ids(tokenizer, split)
    enc = functools.partial(tokenizer, add_special_tokens=False)
    before, after = tasks.chat_frame(tokenizer)
    hay = list(text[offset:offset + context_tokens])
    tail = enc("\n\nWhat is the pass key? Answer with the number only.")["input_ids"] + after + enc("The pass key is ")["input_ids"]
    return torch.tensor([before + hay + tail]), (len(before), len(before) + context_tokens)


@torch.no_grad()
def positional_bias(session: Session, context_tokens: int, n: int = 3) -> torch.Tensor:
    """(layers, heads, context_tokens): mean attention of the question rows on each context position."""
    total = torch.zeros(session.layers, session.heads, context_tokens, dtype=torch.float64)
    step = 3 * context_tokens
    for i in session.progress(range(n), desc="positional bias"):
        ids, (lo, hi) = haystack_prompt(session.tokenizer, context_tokens, "train", i * step)

        def grab(rec):
            total[rec.layer] += rec.probs[0, :, :, lo:hi].double().mean(1)

        with watch_attention(session.model, grab, rows=torch.arange(hi, ids.shape[1])):
            session.forward(ids)
    return (total / n).float()


def calibration_hooks(model, bias: torch.Tensor, context: tuple[int, int]) -> hf.HookHandle:
    """Subtract the positional bias (layers, heads, positions) from the attention of the rows after the
    context on the context's keys, clip at 0, rescale to the context's original mass."""
    lo, hi = context

    def make(layer):
        def run(module, query, key, value, attention_mask, scaling, call_next):
            out = call_next(query, key, value, attention_mask).clone()
            rows = torch.arange(hi, query.shape[2])
            p = attention_probs(query, key, attention_mask, scaling, causal=True, rows=rows)
            ctx = p[..., lo:hi]
            b = bias[layer, :, : hi - lo]
            b = torch.cat([b, b[:, -1:].expand(-1, hi - lo - b.shape[1])], dim=1) if b.shape[1] < hi - lo else b
            cal = (ctx - b[None, :, None, :]).clamp_min(0)
            cal = cal * ctx.sum(-1, keepdim=True) / cal.sum(-1, keepdim=True).clamp_min(1e-30)
            p = torch.cat([p[..., :lo], cal, p[..., hi:]], dim=-1)
            v = value.float().repeat_interleave(query.shape[1] // value.shape[1], dim=1)
            out[:, :, rows] = (p @ v).to(out.dtype)
            return out

        return run

    return hf.hook(model, {i: make(i) for i, _ in hf.attention_modules(model)})


class PositionBias(Probe):
    name = "position_bias"
    paper = Paper("Found in the Middle: Calibrating Positional Attention Bias Improves Long Context Utilization", 2024,
                  "2406.16008")
    about = ("attention of the question's tokens over depth buckets of a needle-free real-prose context; score = "
             "attention per token in the first and last buckets over the middle ones (U-shape); passkey accuracy by "
             "needle depth with and without subtracting the bias (found-in-the-middle calibration)")
    models = "causal"

    def run(self, session):
        s = session.settings
        length = 2 * s.passkey_tokens
        bias = positional_bias(session, length)
        edges = torch.linspace(0, length, BUCKETS + 1).long()
        curve = torch.stack([bias[..., a:b].mean(-1) for a, b in zip(edges[:-1], edges[1:])], dim=-1)  # (L, H, K)
        middle = curve[..., 1:-1].mean(-1).clamp_min(1e-12)
        u_shape = ((curve[..., 0] + curve[..., -1]) / 2) / middle
        summary = {"context_tokens": length, "mean_curve": [round(float(x), 6) for x in curve.mean((0, 1))],
                   **top_summary(session, u_shape, "u_shaped")}
        if s.validate:
            summary["calibration"] = self.evaluate(session, bias, length)
        return self.result({"edge_over_middle": u_shape}, summary,
                           {"curves": [[[round(float(x), 6) for x in h] for h in layer] for layer in curve]})

    @torch.no_grad()
    def evaluate(self, session: Session, bias: torch.Tensor, length: int) -> dict:
        s = session.settings
        examples = tasks.passkey_examples(session.tokenizer, s.eval_examples, length, split="heldout", seed=s.seed + 3)
        rows = []
        for ex in session.progress(examples, desc="found-in-the-middle"):
            base = bool(tasks.answer_hits(session.forward(ex.ids).logits, ex).all())
            with calibration_hooks(session.model, bias, ex.context):
                cal = bool(tasks.answer_hits(session.forward(ex.ids).logits, ex).all())
            rows.append([round(ex.depth, 3), base, cal])
        return {"examples": len(rows), "accuracy_base": sum(r[1] for r in rows) / len(rows),
                "accuracy_calibrated": sum(r[2] for r in rows) / len(rows), "by_depth": rows}
