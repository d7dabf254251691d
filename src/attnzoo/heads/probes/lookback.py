"""Lookback Lens ("Lookback Lens: Detecting and Mitigating Contextual Hallucinations in Large
Language Models Using Only Attention Maps", Chuang et al., 2024).

Per head and generated token, the lookback ratio is the mean attention on the context over that
plus the mean attention on the tokens generated so far; averaged over a span, the (layers x heads)
ratios are the features of a logistic-regression detector of ungrounded text. Examples are built
from real prose: after a passage and the request to quote from it, the answer is either a span
copied from the passage (grounded) or a span of prose the passage does not contain (ungrounded).
The detector is trained on the train split and scored on held-out text.
"""
from __future__ import annotations

import functools

import torch

from ...core.info import Paper, Param
from ..capture import watch_attention
from ..session import Session
from ..tasks import chat_frame, split_ids
from .base import Probe, top_summary

PASSAGE_TOKENS = 120
SPAN_TOKENS = 16


def lookback_examples(tokenizer, n: int, split: str, seed: int) -> list[tuple[torch.Tensor, tuple[int, int], tuple[int, int], int]]:
    """`n` (ids (1, S), context span, answer span, label) with labels alternating 1 (grounded) / 0."""
    g = torch.Generator().manual_seed(seed)
    text = split_ids(tokenizer, split)
    enc = functools.partial(tokenizer, add_special_tokens=False)
    before, after = chat_frame(tokenizer)
    ask = enc("\n\nQuote a passage from the text above.")["input_ids"]
    out = []
    for i in range(n):
        start = int(torch.randint(0, len(text) - 4 * PASSAGE_TOKENS, (1,), generator=g))
        passage = list(text[start:start + PASSAGE_TOKENS])
        grounded = i % 2 == 0
        if grounded:
            at = int(torch.randint(0, PASSAGE_TOKENS - SPAN_TOKENS, (1,), generator=g))
            span = passage[at:at + SPAN_TOKENS]
        else:  # prose from further on in the same document stream: same style, not in the passage
            at = start + 2 * PASSAGE_TOKENS + int(torch.randint(0, PASSAGE_TOKENS, (1,), generator=g))
            span = list(text[at:at + SPAN_TOKENS])
        ids = before + passage + ask + after + span
        ctx = (len(before), len(before) + PASSAGE_TOKENS)
        out.append((torch.tensor([ids]), ctx, (len(ids) - SPAN_TOKENS, len(ids)), int(grounded)))
    return out


@torch.no_grad()
def lookback_features(model, ids: torch.Tensor, context: tuple[int, int], answer: tuple[int, int],
                      layers: int, heads: int) -> torch.Tensor:
    """(layers, heads) lookback ratio averaged over the answer tokens after the first."""
    lo, hi = answer
    feats = torch.zeros(layers, heads)

    def grab(rec):
        p = rec.probs[0].double()  # (H, rows, S) for the query rows lo+1 .. hi-1
        ctx = p[:, :, context[0]:context[1]].mean(-1)
        new = torch.stack([p[:, r, lo:lo + r + 2].mean(-1) for r in range(p.shape[1])], dim=1)  # answer tokens so far
        feats[rec.layer] = (ctx / (ctx + new).clamp_min(1e-30)).mean(-1).float()

    with watch_attention(model, grab, rows=torch.arange(lo + 1, hi)):
        model(input_ids=ids, use_cache=False)
    return feats


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1.0, steps: int = 200):
    """L2-regularised logistic regression on standardised features -> (predict_proba, weights)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.square().sum() / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return (lambda xs: torch.sigmoid(((xs - mean) / std) @ w + b)), w


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


class LookbackLens(Probe):
    name = "lookback_lens"
    paper = Paper("Lookback Lens: Detecting and Mitigating Contextual Hallucinations in Large Language Models Using "
                  "Only Attention Maps", 2024, "2407.07071")
    about = ("lookback ratio (attention on the context vs on the generated tokens) per head, as features of a "
             "logistic-regression detector of ungrounded answers; trained on real-prose examples (a quoted span "
             "copied from the passage vs prose the passage lacks), scored by AUROC on held-out prose")
    models = "causal"
    EXAMPLES = 16  # the default of `examples`
    params = (Param("examples", EXAMPLES, "examples per split (train, held-out), half of them grounded", (int,),
                    lambda v: v >= 2 and v % 2 == 0, "an even int >= 2"),)

    def run(self, session: Session):
        s = session.settings
        data = {}
        for split, seed in (("train", s.seed), ("heldout", s.seed + 1)):
            rows = lookback_examples(session.tokenizer, self.examples, split, seed)
            feats = [lookback_features(session.model, ids, ctx, ans, session.layers, session.heads)
                     for ids, ctx, ans, _ in session.progress(rows, desc=f"lookback ratios ({split})")]
            data[split] = (torch.stack(feats).double(), torch.tensor([r[3] for r in rows], dtype=torch.float64))
        (xtr, ytr), (xte, yte) = data["train"], data["heldout"]
        predict, w = fit_logistic(xtr.flatten(1), ytr)
        p = predict(xte.flatten(1))
        gap = (xtr[ytr == 1].mean(0) - xtr[ytr == 0].mean(0)).float()
        weights = w.view(session.layers, session.heads).float()
        summary = {"train_examples": len(ytr), "test_examples": len(yte),
                   "test_auroc": round(auroc(p, yte), 4), "test_accuracy": round(float(((p > 0.5) == (yte == 1)).double().mean()), 4),
                   "mean_lookback_grounded": round(float(xte[yte == 1].mean()), 4),
                   "mean_lookback_ungrounded": round(float(xte[yte == 0].mean()), 4),
                   **top_summary(session, gap, "lookback_gap")}
        return self.result({"lookback_gap": gap, "detector_weight": weights}, summary)
