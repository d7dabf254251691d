"""Ltri-LLM: spans found from triangles in the attention map, retrieved by their index vectors.

Streaming, as the paper: the sequence is read in chunks of `chunk_size`. Inside each chunk, local attention
(each query over the `max_span` keys up to itself, in the chunk; probabilities averaged over heads) shows
triangles: a span [x, y] whose queries attend within it. Its triangle score is
    S(x, y) = sum_{i=x..y} sum_{j=x..i} (A_ij - baseline),
positive when the span's queries look inside it more than the baseline (default 1 / max_span: uniform
local attention). Non-maximum suppression keeps the best-scoring spans that do not overlap, and the
uncovered runs become spans too (cut at max_span), so the chunk is partitioned; a span never crosses a
chunk boundary, so spans depend only on their own chunk's tokens (causal).

A query reads its own chunk up to itself and `top_k` spans of earlier chunks: the first span (the initial
tokens) always, then the spans whose index vector (the span's mean key, the paper's static vector) scores
highest against the query, with exact softmax over their keys. Not reproduced: the paper's dynamic index
vectors and its collaborative retrieval across layers and heads (persistent recall, head voting); here
each query head retrieves on its own. Causal self-attention (spans come from the queries at their
positions)."""
from __future__ import annotations

import numpy as np
import torch

from ...core.info import CAUSAL_SELF, Paper, Param, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, topk_indices

SCORE_DECIMALS = 9
PAPER = Paper("Ltri-LLM: Streaming Long Context Inference for LLMs with Training-Free Dynamic Triangular Attention "
              "Pattern", 2024, "2412.04757")


def triangle_scores(probs: torch.Tensor, width: int, baseline: float) -> torch.Tensor:
    """S(x, x + d) for local attention probabilities `probs` (..., c, c) (query i, key j, zero outside the
    band j in (i - width, i]): (..., c, width), entry [x, d]; -inf where x + d is past the chunk."""
    c = probs.shape[-1]
    i = torch.arange(c, device=probs.device).view(-1, 1)
    d = torch.arange(width, device=probs.device).view(1, -1)
    j = i - d                                                                   # key of row i at offset d
    band = probs.gather(-1, j.clamp(min=0).expand(*probs.shape[:-1], width)) - baseline
    row = band.masked_fill(j < 0, 0).cumsum(-1)                                 # row[i, d] = sum_{j=i-d..i}
    x = torch.arange(c, device=probs.device).view(-1, 1)
    rows = (x + d).clamp(max=c - 1)                                             # T[x, d] = row[x + d, d]
    tri = row.gather(-2, rows.expand(*row.shape[:-2], c, width)).cumsum(-1)
    return tri.masked_fill(x + d >= c, -torch.inf)


def partition(scores: np.ndarray, length: int, width: int) -> list[tuple[int, int]]:
    """Spans [start, end) covering [0, length): greedy non-maximum suppression over the positive triangle
    scores (`scores` (length, width), [x, d] for span [x, x + d]), no overlap allowed, then the uncovered
    runs cut into pieces of at most `width`. Scores are compared to SCORE_DECIMALS decimals."""
    taken = np.zeros(length, dtype=bool)
    spans = []
    # Rounded: with the default baseline a span's full-band last row adds exactly zero, so spans one apart
    # tie; rounding keeps floating-point noise from breaking such ties (they go to the earlier, shorter span).
    flat = np.round(scores[:length].ravel(), SCORE_DECIMALS)
    for f in np.argsort(-flat, kind="stable"):
        if not flat[f] > 0:
            break
        x, d = divmod(int(f), width)
        if not taken[x:x + d + 1].any():
            taken[x:x + d + 1] = True
            spans.append((x, x + d + 1))
    start = None
    for t in range(length + 1):
        free = t < length and not taken[t]
        if free and start is None:
            start = t
        elif not free and start is not None:
            spans += [(a, min(a + width, t)) for a in range(start, t, width)]
            start = None
    return sorted(spans)


@register
class Ltri(SelectionVariant):
    name = "ltri"
    summary = ("Ltri-LLM, streaming in chunks of chunk_size: each chunk is cut into spans (at most max_span) by "
               "non-maximum suppression over triangle scores of its local attention (heads averaged); a query reads "
               "its own chunk up to itself plus top_k spans of earlier chunks, the first span always, the others by "
               "q . mean key of the span, with exact softmax over their keys. Causal self-attention.")
    paper = PAPER
    patterns = (CAUSAL_SELF,)
    params = (
        positive_int("chunk_size", 64, "tokens per streaming chunk (spans never cross chunks)"),
        positive_int("max_span", 16, "longest span, and the local attention band spans are found in"),
        positive_int("top_k", 8, "spans of earlier chunks each query reads, the first span included"),
        Param("baseline", None, "the triangle score's per-entry baseline; None: 1 / max_span (uniform local "
                                "attention)", (int, float, type(None)), lambda v: v is None or 0 <= v < 1,
              "None or a number in [0, 1)"),
    )
    cost = "spans: O(S max_span D H); retrieval: O(S (S / span) D); attend: O(S (chunk_size + top_k max_span) D)"
    budget_param = "top_k"

    def validate_config(self) -> None:
        if self.config["max_span"] > self.config["chunk_size"]:
            raise ValueError(f"{self.name}: max_span={self.config['max_span']} must be at most chunk_size="
                             f"{self.config['chunk_size']} (spans lie inside chunks)")

    def spans(self, q, k, call) -> list[list[tuple[int, int]]]:
        """Per batch row, the spans [start, end) that partition the sequence, in order."""
        s = call.shapes
        c, w = self.config["chunk_size"], self.config["max_span"]
        baseline = 1.0 / w if self.config["baseline"] is None else float(self.config["baseline"])
        acc = torch.promote_types(q.dtype, torch.float32)
        n = -(-s.sk // c)
        pad = n * c - s.sk
        qc = torch.nn.functional.pad(q.to(acc), (0, 0, 0, pad)).view(s.batch, s.kv_heads, s.group, n, c, s.d)
        kc = torch.nn.functional.pad(k.to(acc), (0, 0, 0, pad)).view(s.batch, s.kv_heads, 1, n, c, s.d)
        i = torch.arange(c, device=q.device).view(-1, 1)
        j = torch.arange(c, device=q.device).view(1, -1)
        band = (j <= i) & (i - j < w)
        probs = torch.softmax(((qc @ kc.transpose(-1, -2)) * call.scale).masked_fill(~band, -torch.inf), dim=-1)
        tri = triangle_scores(probs.mean((1, 2)), w, baseline).detach().cpu().numpy()              # (B, n, c, w)
        out = []
        for b in range(s.batch):
            row = []
            for chunk in range(n):
                length = min(c, s.sk - chunk * c)
                row += [(chunk * c + a, chunk * c + e) for a, e in partition(tri[b, chunk], length, w)]
            out.append(row)
        return out

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        c, w, top_k = self.config["chunk_size"], self.config["max_span"], self.config["top_k"]
        acc = torch.promote_types(q.dtype, torch.float32)
        spans = self.spans(q, k, call)
        m = max(len(r) for r in spans)
        start = torch.tensor([[a for a, _ in r] + [0] * (m - len(r)) for r in spans], device=q.device)
        end = torch.tensor([[e for _, e in r] + [0] * (m - len(r)) for r in spans], device=q.device)   # (B, m)
        span_of = torch.zeros(s.batch, s.sk, dtype=torch.long, device=q.device)
        for b, r in enumerate(spans):
            for n_, (a, e) in enumerate(r):
                span_of[b, a:e] = n_
        sums = torch.zeros(s.batch, s.kv_heads, m, s.d, dtype=acc, device=q.device)
        sums.scatter_add_(2, span_of.view(s.batch, 1, -1, 1).expand(-1, s.kv_heads, -1, s.d), k.to(acc))
        means = sums / (end - start).clamp(min=1).view(s.batch, 1, m, 1).to(acc)
        means = means.repeat_interleave(s.group, dim=1)                                    # (B, Hq, m, D)
        gate = q.to(acc) @ means.transpose(-1, -2)                                         # (B, Hq, Sq, m)
        chunk_start = (s.query_positions(device=q.device) // c * c).view(1, 1, -1, 1)
        earlier = (end > start).view(s.batch, 1, 1, m) & (end.view(s.batch, 1, 1, m) <= chunk_start)
        gate = gate.masked_fill(torch.arange(m, device=q.device) == 0, torch.inf).masked_fill(~earlier, -torch.inf)
        chosen = topk_indices(gate, top_k)                                                 # (B, Hq, Sq, top_k)
        batch = torch.arange(s.batch, device=q.device).view(-1, 1, 1, 1)
        first, last = start[batch, chosen.clamp(min=0)], end[batch, chosen.clamp(min=0)]
        tok = (first.unsqueeze(-1) + torch.arange(w, device=q.device))                    # (B, Hq, Sq, top_k, w)
        tok = torch.where((tok < last.unsqueeze(-1)) & (chosen >= 0).unsqueeze(-1), tok, -1).flatten(-2)
        own = chunk_start.squeeze(-1).unsqueeze(-1) + torch.arange(c, device=q.device)     # (1, 1, Sq, c)
        own = torch.where(own < s.sk, own, -1).expand(s.batch, s.q_heads, -1, -1)
        return Selection(torch.cat([own, tok], dim=-1), 1, s.sk)
