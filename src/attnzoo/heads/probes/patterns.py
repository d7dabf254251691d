"""Probes read straight off attention maps: previous-token, induction and duplicate-token heads on
repeated real text; entropy and mean attention distance on prose; and the head patterns of
"What Does BERT Look At?" on an encoder."""
from __future__ import annotations

import torch

from ...core.info import Paper
from .. import tasks
from ..capture import LayerAttention
from ..session import Item, Session
from .base import MapProbe, top_summary

INDUCTION_PAPER = Paper("In-context Learning and Induction Heads", 2022, "2209.11895")
BERT_PAPER = Paper("What Does BERT Look At? An Analysis of BERT's Attention", 2019, "1906.04341")
DISTANCE_PAPER = Paper("Analyzing the Structure of Attention in a Transformer Language Model", 2019, "1906.04284")


def _diagonal_mean(probs: torch.Tensor, offset: int, start: int = 0) -> torch.Tensor:
    """(H,) mean of probs[0, h, i, i + offset] over the diagonal's entries from `start` on."""
    return torch.diagonal(probs[0], offset=offset, dim1=-2, dim2=-1)[:, start:].double().mean(-1)


class _MeanOfMaps(MapProbe):
    """A MapProbe whose score is the mean over inputs of a per-layer (heads,) statistic."""

    def statistic(self, rec: LayerAttention, item: Item) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, rec, item):
        self.total[rec.layer] += self.statistic(rec, item)
        if rec.layer == 0:
            self.count += 1

    def mean(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()


class PreviousToken(_MeanOfMaps):
    name = "previous_token"
    paper = INDUCTION_PAPER
    about = "attention from each token to the token just before it, on repeated real text"
    inputs = ("repeated",)

    def statistic(self, rec, item):
        return _diagonal_mean(rec.probs, -1)

    def finish(self, session):
        scores = self.mean()
        return self.result({"previous_token": scores}, top_summary(session, scores, "previous_token"))


class Induction(_MeanOfMaps):
    name = "induction"
    paper = INDUCTION_PAPER
    about = ("in the second copy of a repeated real-text chunk, attention from a token to the token that "
             "followed its earlier occurrence; validated by ablating the top heads (loss on repeats)")
    inputs = ("repeated",)
    models = "causal"

    def statistic(self, rec, item):
        half = item.meta["half"]
        return _diagonal_mean(rec.probs, -(half - 1), start=1)

    def finish(self, session):
        scores = self.mean()
        summary = top_summary(session, scores, "induction")
        if session.settings.validate:
            summary["validation"] = validate_induction(session, scores)
        return self.result({"induction": scores}, summary)


class DuplicateToken(_MeanOfMaps):
    name = "duplicate_token"
    paper = INDUCTION_PAPER
    about = "in the second copy of a repeated chunk, attention from a token to its own earlier occurrence"
    inputs = ("repeated",)

    def statistic(self, rec, item):
        return _diagonal_mean(rec.probs, -item.meta["half"])

    def finish(self, session):
        scores = self.mean()
        return self.result({"duplicate_token": scores}, top_summary(session, scores, "duplicate_token"))


def _first_visible_row(session: Session) -> int:
    """Row 0 of a causal map sees only itself, so its statistics are trivial: skip it."""
    return 1 if session.causal else 0


class Entropy(_MeanOfMaps):
    name = "entropy"
    paper = BERT_PAPER
    about = ("mean entropy (nats) of each attention row on real prose (broad vs focused attention); normalized by "
             "log(visible keys) in the second map")

    def start(self, session):
        super().start(session)
        self.normalized = torch.zeros_like(self.total)

    def observe(self, rec, item):
        start = _first_visible_row(self.session)
        p = rec.probs[0, :, start:].double()
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (H, rows)
        sq, sk = rec.query.shape[2], rec.probs.shape[-1]
        visible = (rec.rows[start:] + sk - sq + 1).double() if self.session.causal else torch.full((len(rec.rows) - start,), float(sk))
        self.total[rec.layer] += ent.mean(-1)
        self.normalized[rec.layer] += (ent / visible.clamp_min(2).log()).mean(-1)
        if rec.layer == 0:
            self.count += 1

    def finish(self, session):
        n = max(self.count, 1)
        scores = self.mean()
        return self.result({"entropy": scores, "normalized_entropy": (self.normalized / n).float()},
                           {"mean_entropy": round(float(scores.mean()), 4), **top_summary(session, scores, "focused", lowest=True)})


class Distance(_MeanOfMaps):
    name = "distance"
    paper = DISTANCE_PAPER
    about = ("mean |query position - key position| weighted by attention, on real prose (also in Clark et al., "
             "2019, \"What Does BERT Look At?\")")

    def statistic(self, rec, item):
        s = rec.probs.shape[-1]
        pos = torch.arange(s, dtype=torch.float64)
        dist = (rec.rows.double()[:, None] + (s - rec.probs.shape[-2]) - pos[None, :]).abs()
        start = _first_visible_row(self.session)
        return (rec.probs[0, :, start:].double() * dist[start:]).sum(-1).mean(-1)

    def finish(self, session):
        scores = self.mean()
        return self.result({"distance": scores},
                           {"mean_distance": round(float(scores.mean()), 3), **top_summary(session, scores, "longest_range")})


class BertPatterns(MapProbe):
    name = "bert_patterns"
    paper = BERT_PAPER
    about = ("per head: attention to [CLS], to [SEP], to punctuation, to the next and previous token, and "
             "broad attention (entropy), on pairs of real sentences")
    models = "encoder"
    PATTERNS = ("sep", "cls", "punctuation", "next_token", "previous_token", "broad_entropy")

    def start(self, session):
        super().start(session)
        self.totals = {k: torch.zeros(session.layers, session.heads, dtype=torch.float64) for k in self.PATTERNS}
        tok = session.tokenizer
        self.punct = {i for i in range(len(tok)) if tok.convert_ids_to_tokens(i) in (".", ",")}

    def observe(self, rec, item):
        p = rec.probs[0].double()  # (H, S, S)
        ids = item.ids[0]
        tok = self.session.tokenizer

        def to(mask):
            return p[:, :, mask].sum(-1).mean(-1)

        t = self.totals
        t["sep"][rec.layer] += to(ids == tok.sep_token_id)
        t["cls"][rec.layer] += to(ids == tok.cls_token_id)
        t["punctuation"][rec.layer] += to(torch.tensor([int(i) in self.punct for i in ids]))
        t["next_token"][rec.layer] += _diagonal_mean(rec.probs, 1)
        t["previous_token"][rec.layer] += _diagonal_mean(rec.probs, -1)
        t["broad_entropy"][rec.layer] += -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)
        if rec.layer == 0:
            self.count += 1

    def finish(self, session):
        maps = {k: (v / max(self.count, 1)).float() for k, v in self.totals.items()}
        summary = {k: top_summary(session, v, k)[f"top_{k}"] for k, v in maps.items()}
        summary["sep_by_layer"] = [round(float(x), 4) for x in maps["sep"].mean(-1)]
        return self.result(maps, summary)


@torch.no_grad()
def validate_induction(session: Session, scores: torch.Tensor) -> dict:
    """Loss on the second copy of held-out repeated real text: intact, with the top induction heads
    ablated, and with as many random other heads ablated (several draws)."""
    s = session.settings
    seqs = tasks.repeated_sequences(session.tokenizer, s.repeat_sequences, s.repeat_half, split="heldout")

    def loss() -> float:
        return float(tasks.lm_loss(session.forward(seqs).logits, seqs, s.repeat_half))

    k = session.n_ablate
    top = session.top_heads(scores, k)
    gen = torch.Generator().manual_seed(s.seed)
    draws = [session.random_heads(k, top, gen) for _ in range(s.random_draws)]
    runs = [("intact", [])] + [("top", top)] + [(f"random_{i}", d) for i, d in enumerate(draws)]
    out = {}
    for label, heads in session.progress(runs, desc="induction ablation"):
        with session.ablate(heads):
            out[label] = loss()
    return {"heads_ablated": k, "mode": s.ablation, "top_heads": [list(h) for h in top],
            "loss_intact": round(out["intact"], 4), "loss_top_ablated": round(out["top"], 4),
            "loss_random_ablated": [round(out[f"random_{i}"], 4) for i in range(len(draws))],
            "random_heads": [[list(h) for h in d] for d in draws]}
