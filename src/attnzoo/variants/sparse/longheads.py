"""LongHeads: each head reads the chunks it picks. Keys sit in chunks of `chunk_size`; per query head a
chunk is represented by

- a pooled summary c: the mean over the chunk's queries of their softmax attention output within the
  chunk (non-causal, the chunk's keys only);
- a representative key c_k = the softmax(scale c . k_j) weighted mean of the chunk's keys k_j;

and a query scores chunk c by q . c_k. It reads `top_k` chunks: its own, the one before and the first
(the paper's always-kept local and initial chunks, in that priority when top_k < 3), then the
best-scoring others (earlier ones only under causality), with exact softmax over their keys. Heads
choose apart: together they cover a long context, each within a short span.

Two departures, both forced by attnzoo's contract: the paper pools the attention output over the chunk's
values, here over its keys (the selection is chosen from q and k, before values are read; the two spaces
have the same size in the paper's Llama); and the paper re-assigns RoPE positions to the gathered chunks,
which belongs to the model (attnzoo receives q and k after position encoding). Self-attention only: a
chunk's summary uses the queries at its positions."""
from __future__ import annotations

import torch

from ...core.info import CAUSAL_SELF, NONCAUSAL_SELF, Paper, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, block_gate_select

PAPER = Paper("LongHeads: Multi-Head Attention is Secretly a Long Context Processor", 2024, "2402.10685")
# Gate values below +inf (the own chunk) that force the chunk before and the first, in that order.
FORCE_PREVIOUS, FORCE_FIRST = 3e38, 2e38


def chunk_keys(q: torch.Tensor, k: torch.Tensor, chunk: int, scale: float) -> torch.Tensor:
    """Per query head, each chunk's representative key c_k (B, Hq, n, D) from q (B, Hq, S, D) and
    k (B, Hkv, S, D) of one self-attention (the last chunk may be partial; its padding counts nowhere)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    n = -(-s // chunk)
    pad = n * chunk - s
    real = (torch.arange(n * chunk, device=q.device) < s).view(n, 1, chunk)                  # (n, 1, c)
    qc = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(b, hkv, hq // hkv, n, chunk, d)
    kc = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, hkv, 1, n, chunk, d)
    p = torch.softmax(((qc @ kc.transpose(-1, -2)) * scale).masked_fill(~real, -torch.inf), dim=-1)
    counts = real.sum(-1).to(q.dtype)                                                        # (n, 1) real queries
    pooled = ((p @ kc) * real.transpose(-1, -2)).sum(-2) / counts                            # (B, Hkv, G, n, D)
    w = torch.softmax(((pooled.unsqueeze(-2) @ kc.transpose(-1, -2)) * scale).masked_fill(~real, -torch.inf), -1)
    return (w @ kc).squeeze(-2).reshape(b, hq, n, d)


@register
class LongHeads(SelectionVariant):
    name = "longheads"
    summary = ("Chunks of chunk_size keys, each represented per query head by a key: the chunk's queries' pooled "
               "in-chunk attention output, used as a query over the chunk's keys. A query reads top_k chunks: its "
               "own, the previous and the first always, then the best by q . representative key (earlier chunks "
               "only under causality), exact softmax over their keys; every head chooses its own. Self-attention.")
    paper = PAPER
    patterns = (CAUSAL_SELF, NONCAUSAL_SELF)
    params = (
        positive_int("chunk_size", 64, "keys per chunk (the paper's window_size)"),
        positive_int("top_k", 8, "chunks each query reads, its own, the previous and the first included (the "
                                 "paper's atten_length / window_size)"),
    )
    cost = "chunk keys: O(S chunk_size D); scores: O(S (S / chunk_size) D); attend: O(S top_k chunk_size D)"
    budget_param = "top_k"
    block_param = "chunk_size"

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        c = self.config["chunk_size"]
        acc = torch.promote_types(q.dtype, torch.float32)
        reps = chunk_keys(q.to(acc), k.to(acc), c, call.scale)                                 # (B, Hq, n, D)
        gate = q.to(acc) @ reps.transpose(-1, -2)                                              # (B, Hq, Sq, n)
        own = (s.query_positions(device=q.device) // c).view(-1, 1)
        chunks = torch.arange(gate.shape[-1], device=q.device).view(1, -1)
        gate = gate.masked_fill(chunks == 0, FORCE_FIRST).masked_fill(chunks == own - 1, FORCE_PREVIOUS)
        return block_gate_select(gate, call, c, self.config["top_k"])
