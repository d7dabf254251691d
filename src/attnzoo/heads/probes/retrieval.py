"""Retrieval heads ("Retrieval Head Mechanistically Explains Long-Context Factuality", Wu et al.,
2024) and decoding that contrasts them away (DeCoRe, Gema et al., 2024).

Retrieval score of a head: over needle-in-a-haystack questions on real prose, the share of the
needle tokens the model copies into its answer for which the head's top attention lands on that
same token inside the needle (the paper's copy-paste criterion). Answers are teacher-forced;
only steps where the model's own argmax is the gold token count, so it is the model copying.
"""
from __future__ import annotations

import math

import torch

from ...core.info import Paper, Param
from .. import tasks
from ..capture import head_grid, watch_attention
from ..session import Session
from .base import Probe, top_summary

RETRIEVAL_PAPER = Paper("Retrieval Head Mechanistically Explains Long-Context Factuality", 2024, "2404.15574")
DECORE_PAPER = Paper("DeCoRe: Decoding by Contrasting Retrieval Heads to Mitigate Hallucinations", 2024, "2410.18860")


@torch.no_grad()
def copy_counts(model, example: tasks.PasskeyExample) -> tuple[torch.Tensor, torch.Tensor]:
    """((layers, heads) answer tokens each head copy-pasted from the needle, (answer,) bool: the
    model's argmax was the gold token) for one teacher-forced example."""
    ids = example.ids[0]
    rows = torch.arange(example.answer_start - 1, len(ids) - 1)
    answer = ids[example.answer_start:]
    lo, hi = example.needle
    n_layers, n_heads = head_grid(model)
    counts = torch.zeros(n_layers, n_heads)
    tops: dict[int, torch.Tensor] = {}

    def grab(rec):
        tops[rec.layer] = rec.probs[0].argmax(-1)  # (heads, answer): key each head attends to most

    with watch_attention(model, grab, rows=rows):
        logits = model(input_ids=example.ids, use_cache=False).logits
    hits = tasks.answer_hits(logits, example)
    for layer, top in tops.items():
        copied = (top >= lo) & (top < hi) & (ids[top] == answer[None, :]) & hits[None, :]
        counts[layer] = copied.sum(-1).float()
    return counts, hits


def retrieval_scores(model, tokenizer, n_examples: int = 8, context_tokens: int = 384, split: str = "train",
                     seed: int = 0, progress=None) -> torch.Tensor:
    """(layers, heads) retrieval scores of a causal LM on `n_examples` passkey questions over real
    prose. Heads scoring above 0.1 are retrieval heads in the paper's sense. `progress`: an
    optional wrapper over the examples (e.g. tqdm)."""
    examples = tasks.passkey_examples(tokenizer, n_examples, context_tokens, split=split, seed=seed)
    total, tokens = None, 0
    for ex in (progress(examples) if progress else examples):
        counts, _ = copy_counts(model, ex)
        total = counts if total is None else total + counts
        tokens += ex.ids.shape[1] - ex.answer_start
    return total / tokens


class Retrieval(Probe):
    name = "retrieval"
    paper = RETRIEVAL_PAPER
    about = ("share of the needle tokens copied into the answer for which the head's top attention is on "
             "that token in the needle (passkey questions over real prose); validated by ablating the top "
             "heads against random heads on held-out questions")
    models = "causal"

    def run(self, session):
        s = session.settings
        scores = retrieval_scores(session.model, session.tokenizer, s.passkey_examples, s.passkey_tokens,
                                  split="train", seed=s.seed,
                                  progress=lambda xs: session.progress(xs, desc="retrieval scores"))
        n = int((scores > s.retrieval_threshold).sum())
        summary = {"threshold": s.retrieval_threshold, "retrieval_heads": n,
                   "share_of_heads": round(n / scores.numel(), 4), **top_summary(session, scores, "retrieval", 10)}
        if s.validate:
            summary["validation"] = validate_retrieval(session, scores)
        return self.result({"retrieval": scores}, summary)


@torch.no_grad()
def validate_retrieval(session: Session, scores: torch.Tensor) -> dict:
    """Passkey accuracy on held-out questions: intact, with the top retrieval heads ablated, and with
    as many random non-top heads ablated (several draws)."""
    s = session.settings
    k = session.n_ablate
    top = session.top_heads(scores, k)
    gen = torch.Generator().manual_seed(s.seed)
    draws = [session.random_heads(k, top, gen) for _ in range(s.random_draws)]
    intact = session.passkey_baseline()
    with session.ablate(top):
        top_acc = session.passkey_accuracy("passkey (top retrieval heads ablated)")
    rand = []
    for i, heads in enumerate(draws):
        with session.ablate(heads):
            rand.append(session.passkey_accuracy(f"passkey (random heads {i + 1}/{len(draws)})"))
    return {"heads_ablated": k, "mode": s.ablation, "examples": s.eval_examples, "context_tokens": s.passkey_tokens,
            "top_heads": [list(h) for h in top], "accuracy_intact": intact, "accuracy_top_ablated": top_acc,
            "accuracy_random_ablated": rand, "random_heads": [[list(h) for h in d] for d in draws]}


def contrast(base: torch.Tensor, masked: torch.Tensor, alpha: float | None, plausibility: float = 0.1) -> torch.Tensor:
    """DeCoRe's next-token scores from base and masked-model logits (..., V): (1 + a) log p_base -
    a log p_masked, with a = `alpha`, or with alpha None the base model's entropy (nats, capped at 1:
    contrast more where the base model is unsure). Tokens far less likely than the base model's top
    token (p < plausibility * p_max, contrastive decoding's plausibility constraint) are excluded."""
    lp_base, lp_masked = base.float().log_softmax(-1), masked.float().log_softmax(-1)
    if alpha is None:
        a = (-(lp_base.exp() * lp_base).sum(-1, keepdim=True)).clamp(max=1.0)
    else:
        a = torch.full_like(lp_base[..., :1], alpha)
    scores = (1 + a) * lp_base - a * lp_masked
    implausible = lp_base < lp_base.max(-1, keepdim=True).values + math.log(plausibility)
    return scores.masked_fill(implausible, float("-inf"))


class DeCoRe(Probe):
    name = "decore"
    paper = DECORE_PAPER
    about = ("greedy decoding contrasting the model with itself with its retrieval heads masked, on a grounded "
             "QA task (which of several boxes' pass keys, in real prose); exact-match accuracy of plain greedy "
             "decoding, of DeCoRe with a static alpha, and with the entropy-scaled alpha")
    models = "causal"
    DISTRACTORS = 3  # the default of `distractors`
    ALPHA = 0.5  # the default of `alpha`
    params = (Param("distractors", DISTRACTORS, "keyed needles besides the one asked for (one colour each)", (int,),
                    lambda v: 0 <= v < len(tasks._COLOURS), f"an int in [0, {len(tasks._COLOURS) - 1}]"),
              Param("alpha", ALPHA, "static contrast strength (the entropy-scaled run sets its own)", (int, float),
                    lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"))

    @torch.no_grad()
    def run(self, session):
        s = session.settings
        retrieval = session.result("retrieval").scores
        n_masked = max(session.n_ablate, int((retrieval > s.retrieval_threshold).sum()))
        masked_heads = session.top_heads(retrieval, n_masked)
        examples = tasks.passkey_examples(session.tokenizer, s.eval_examples, 2 * s.passkey_tokens, split="heldout",
                                          seed=s.seed + 2, distractors=self.distractors)
        right = {"greedy": [], "decore_static": [], "decore_entropy": [], "masked_model": []}
        for ex in session.progress(examples, desc="DeCoRe"):
            rows = slice(ex.answer_start - 1, -1)
            base = session.forward(ex.ids).logits[0, rows]
            with session.ablate(masked_heads):
                masked = session.forward(ex.ids).logits[0, rows]
            gold = ex.ids[0, ex.answer_start:]
            for label, scores in (("greedy", base), ("masked_model", masked),
                                  ("decore_static", contrast(base, masked, self.alpha)),
                                  ("decore_entropy", contrast(base, masked, None))):
                right[label].append(bool((scores.argmax(-1) == gold).all()))
        acc = {k: round(sum(v) / len(v), 4) for k, v in right.items()}
        summary = {"task": f"{self.distractors + 1} keyed needles in {2 * s.passkey_tokens} tokens of held-out prose",
                   "examples": len(examples), "masked_heads": n_masked, "alpha_static": self.alpha,
                   "accuracy": acc}
        return self.result({}, summary, {"masked_heads": [list(h) for h in masked_heads]})
