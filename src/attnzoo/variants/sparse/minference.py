"""MInference: per-head sparse patterns for long-context prefill, chosen offline, indexed online.

Each query head has one of three patterns, and every query reads `budget` keys (before causality):
- A-shape: the first `sink` keys and the `budget - sink` keys ending at the query (static);
- vertical-slash: `vertical` key columns and `budget - vertical` diagonals (offsets p - j) estimated
  per call from the attention of the last `last_q` queries (their softmax summed per column and per
  diagonal); column 0 and diagonal 0 (the query itself) always;
- block-sparse: blocks of `block_size` keys ranked by mean-pooled query block . mean-pooled key block,
  the query's own block and the best others, budget // block_size blocks in all.
`heads` gives each query head its pattern and the share of the budget its first part takes (sink keys of
A-shape, vertical columns of vertical-slash; block-sparse ignores it), or one (pattern, share) for all.
Exact softmax over the selected keys. Causal only, as the paper's prefill.

The offline search (`search_patterns`, `search_model`) picks each head's pattern and share on real
activations: the candidate keeping the most exact attention mass at the same budget (the paper's
search by attention recall at equal cost); the result is saved as JSON and `load_patterns` gives the
parameters of one layer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ...core.info import CAUSAL_PATTERNS, Paper, Param, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, block_gate_select

PAPER = Paper("MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", 2024,
              "2407.02490")
PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
# The search's candidates: (pattern, share of the budget for sinks / vertical columns).
CANDIDATES = (("a_shape", 0.0625), ("a_shape", 0.25), ("vertical_slash", 0.1), ("vertical_slash", 0.3),
              ("vertical_slash", 0.5), ("vertical_slash", 0.7), ("vertical_slash", 0.9), ("block_sparse", 0.0))
QUERY_TILE = 128


def _is_spec(x) -> bool:
    return (isinstance(x, (tuple, list)) and len(x) == 2 and x[0] in PATTERNS and isinstance(x[1], (int, float))
            and not isinstance(x[1], bool) and 0.0 <= x[1] <= 1.0)


def _heads_ok(v) -> bool:
    return _is_spec(v) or (isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_spec(x) for x in v))


def split(pattern: str, share: float, budget: int) -> tuple[int, int]:
    """(first, second) part of the budget: A-shape (sink, local >= 1), vertical-slash (vertical, slash >= 1)."""
    second = max(1, budget - round(share * budget))
    return budget - second, second


# ---- the three patterns: token indices (B, H, Sq, n) for one group of heads, -1 unused ---------------------


def a_shape(call, sink: int, local: int, batch: int, heads: int, device) -> torch.Tensor:
    sk = call.shapes.sk
    pos = call.shapes.query_positions(device=device).view(-1, 1)
    sinks = torch.arange(min(sink, sk), device=device).view(1, -1).expand(pos.shape[0], -1)
    window = pos - torch.arange(min(local, sk), device=device).view(1, -1)
    window = torch.where((window >= sink), window, torch.full_like(window, -1))      # sinks counted once
    return torch.cat([sinks, window], dim=-1).expand(batch, heads, -1, -1)


def vertical_slash(q, k, call, vertical: int, slash: int, last_q: int) -> torch.Tensor:
    """q (B, h, Sq, D) of heads reading k (B, h, Sk, D): columns and diagonals from the last queries."""
    s = call.shapes
    acc = torch.promote_types(q.dtype, torch.float32)
    n = min(last_q, s.sq)
    pos = s.query_positions(s.sq - n, s.sq, q.device).view(-1, 1)
    keys = torch.arange(s.sk, device=q.device).view(1, -1)
    scores = (q[:, :, s.sq - n:].to(acc) @ k.to(acc).transpose(-1, -2)) * call.scale    # (B, h, n, Sk)
    probs = torch.softmax(scores.masked_fill(keys > pos, -torch.inf), dim=-1)
    columns = probs.sum(2)
    offsets = (pos - keys).clamp_min(0).expand_as(probs)                                   # masked probs are 0
    diagonals = torch.zeros_like(columns).scatter_add_(-1, offsets.flatten(2, 3).expand(*probs.shape[:2], -1),
                                                      probs.flatten(2, 3))
    columns[..., 0] = torch.inf
    diagonals[..., 0] = torch.inf
    cols = columns.topk(min(vertical, s.sk), dim=-1).indices                              # (B, h, v)
    offs = diagonals.topk(min(slash, s.sk), dim=-1).indices                               # (B, h, sl)
    qpos = s.query_positions(device=q.device).view(1, 1, -1, 1)
    diag = qpos - offs.unsqueeze(2)
    diag = torch.where(diag >= 0, diag, torch.full_like(diag, -1))
    cols = cols.unsqueeze(2).expand(-1, -1, s.sq, -1)
    chosen = torch.zeros_like(columns, dtype=torch.bool).scatter_(-1, offs, True)          # (B, h, Sk) by offset
    gap = qpos - cols
    on_diagonal = (gap >= 0) & chosen.unsqueeze(2).expand(-1, -1, s.sq, -1).gather(-1, gap.clamp_min(0))
    return torch.cat([cols.masked_fill(on_diagonal, -1), diag], dim=-1)


def block_sparse(q, k, call, blocks: int, block: int) -> torch.Tensor:
    """Mean-pooled query blocks (by absolute position) against mean-pooled key blocks; own block forced."""
    s = call.shapes
    acc = torch.promote_types(q.dtype, torch.float32)
    nb = -(-s.sk // block)
    member = (torch.arange(s.sk, device=q.device).view(1, -1) // block) == torch.arange(nb, device=q.device).view(-1, 1)
    k_mean = (member.to(acc) / member.sum(-1, keepdim=True)) @ k.to(acc)                   # (B, h, nb, D)
    q_block = s.query_positions(device=q.device) // block
    first = int(q_block[0])
    q_member = (q_block.view(1, -1) == torch.arange(first, nb, device=q.device).view(-1, 1)).to(acc)
    q_mean = (q_member / q_member.sum(-1, keepdim=True).clamp_min(1)) @ q.to(acc)          # (B, h, nb - first, D)
    gate = (q_mean @ k_mean.transpose(-1, -2))[:, :, q_block - first]                      # (B, h, Sq, nb)
    return block_gate_select(gate, call, block, blocks).token_indices()


@register
class MInference(SelectionVariant):
    name = "minference"
    summary = ("MInference: each query head has a pattern, every query reads `budget` keys: A-shape (first sinks + "
               "local window), vertical-slash (columns and diagonals with the most attention from the last last_q "
               "queries; column 0 and the query's own diagonal always), block-sparse (top blocks by mean-pooled "
               "q . k, own block always). `heads`: (pattern, share) for all heads or one per head, share = the "
               "budget's part for sinks / vertical columns; search_model picks them on real activations "
               "(load_patterns reads the JSON). Exact softmax over the selected keys; causal only.")
    paper = PAPER
    patterns = CAUSAL_PATTERNS
    params = (
        positive_int("budget", 1024, "keys each query reads (before causality)"),
        Param("heads", ("vertical_slash", 0.5), "(pattern, share) for every head, or a sequence of one per query "
              "head; pattern in a_shape, vertical_slash, block_sparse; share in [0, 1]", (tuple, list), _heads_ok,
              "(pattern, share) or a non-empty sequence of them, pattern in " + ", ".join(PATTERNS) +
              ", share a float in [0, 1]"),
        positive_int("block_size", 64, "keys per block of the block-sparse pattern"),
        positive_int("last_q", 64, "last queries whose attention estimates the vertical-slash indices"),
    )
    cost = ("vertical-slash estimate: O(last_q Sk D); block-sparse gate: O(Sq Sk / block_size D); attend: "
            "O(Sq budget D)")
    budget_param = "budget"

    def head_specs(self, heads: int) -> list[tuple[str, float]]:
        spec = self.config["heads"]
        return [tuple(spec)] * heads if _is_spec(spec) else [tuple(x) for x in spec]

    def validate_call(self, call) -> None:
        spec = self.config["heads"]
        if not _is_spec(spec) and len(spec) != call.shapes.q_heads:
            raise ValueError(f"minference: heads gives {len(spec)} per-head patterns, but q has "
                             f"Hq={call.shapes.q_heads} heads")

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        budget, block = self.config["budget"], self.config["block_size"]
        specs = self.head_specs(s.q_heads)
        rows = [None] * s.q_heads
        for spec in sorted(set(specs)):
            heads = [h for h in range(s.q_heads) if specs[h] == spec]
            hq = torch.tensor(heads, device=q.device)
            qh, kh = q[:, hq], k[:, hq // s.group]
            pattern, share = spec
            first, second = split(pattern, share, budget)
            if pattern == "a_shape":
                idx = a_shape(call, first, second, s.batch, len(heads), q.device)
            elif pattern == "vertical_slash":
                idx = vertical_slash(qh, kh, call, first, second, self.config["last_q"])
            else:
                idx = block_sparse(qh, kh, call, max(1, budget // block), block)
            for i, h in enumerate(heads):
                rows[h] = idx[:, i]
        width = max(r.shape[-1] for r in rows)
        rows = [torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=-1) for r in rows]
        return Selection(torch.stack(rows, dim=1), 1, s.sk)


# ---- the offline search --------------------------------------------------------------------------------


def mass_kept(q, k, sel: Selection, causal: bool = True) -> torch.Tensor:
    """(Hq,): mean over batch rows and queries of the exact softmax mass on the selected keys, a tile of
    queries at a time (no Sq x Sk tensor)."""
    return masses_kept(q, k, [sel], causal)[0]


def masses_kept(q, k, selections: list[Selection], causal: bool = True) -> list[torch.Tensor]:
    """`mass_kept` of each selection, each tile's exact softmax computed once for all of them."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    kk = k.to(acc).repeat_interleave(hq // k.shape[1], dim=1)
    totals = [torch.zeros(hq, dtype=acc, device=q.device) for _ in selections]
    keys = torch.arange(sk, device=q.device).view(1, -1)
    for a in range(0, sq, QUERY_TILE):
        e = min(a + QUERY_TILE, sq)
        scores = (q[:, :, a:e].to(acc) @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
        pos = (torch.arange(a, e, device=q.device) + sk - sq).view(-1, 1)
        if causal:
            scores = scores.masked_fill(keys > pos, -torch.inf)
        probs = torch.softmax(scores, dim=-1)
        for total, sel in zip(totals, selections):
            tok = sel.token_indices(slice(a, e))
            chosen = torch.zeros(*tok.shape[:3], sk + 1, dtype=torch.bool, device=q.device)
            chosen.scatter_(-1, torch.where(tok >= 0, tok, sk), True)
            total += (probs * chosen[..., :sk]).sum((-1, -2)).sum(0)
    return [total / (b * sq) for total in totals]


def search_patterns(q, k, budget: int, candidates=CANDIDATES, block_size: int = 64, last_q: int = 64) -> dict:
    """Each head's best candidate (pattern, share) at `budget` on q (B, Hq, S, D), k (B, Hkv, S, D) of one layer
    (causal self-attention): {"heads": [[pattern, share], ...], "mass": {candidate: [mass per head]}}."""
    from ...core.api import get

    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"search_patterns: budget must be a positive int, got {budget!r}")
    if not candidates or not all(_is_spec(c) for c in candidates):
        raise ValueError(f"search_patterns: candidates must be (pattern, share) pairs, pattern in {PATTERNS}")
    mass = {}
    for cand in candidates:
        attn = get("minference", budget=budget, heads=tuple(cand), block_size=block_size, last_q=last_q)
        mass[cand] = mass_kept(q, k, attn.selection(q, k, causal=True)).tolist()
    heads = [list(max(candidates, key=lambda c: mass[c][h])) for h in range(q.shape[1])]
    return {"heads": heads, "mass": {f"{p}:{s:g}": m for (p, s), m in mass.items()}}


def search_model(model: str = "smollm2", length: int = 512, budget: int = 64, layers=None, path=None,
                 candidates=CANDIDATES, block_size: int = 16, last_q: int = 64, progress: bool = True) -> dict:
    """The offline search on real activations: q/k captured from `model` on `length` tokens of real text
    (attnzoo.bench.capture, cached on disk), each head of each layer given its best pattern at `budget`;
    written to `path` as JSON when given. Default layers: 4 evenly spaced."""
    from ... import models
    from ...bench import capture
    from ...bench.run import LAYERS, evenly_spaced_layers
    from ...hf import layer_count

    def load():
        return models.load_causal_lm(model)

    if layers is None:
        lm, tok = load()
        layers = evenly_spaced_layers(layer_count(lm), LAYERS)
        load = lambda: (lm, tok)   # noqa: E731 - loaded once
    layers = [int(x) for x in layers]
    qkv, _ = capture.captured_qkv(model, length, layers, load)
    result = {"model": model, "length": length, "budget": budget, "block_size": block_size, "last_q": last_q,
              "candidates": [list(c) for c in candidates], "layers": {}}
    from rich.progress import track

    for layer in track(layers, description="minference pattern search", disable=not progress):
        q, k, _ = qkv[layer]
        result["layers"][str(layer)] = search_patterns(q, k, budget, candidates, block_size, last_q)
    if path is not None:
        Path(path).write_text(json.dumps(result, indent=1))
    return result


def load_patterns(source, layer: int) -> dict:
    """Parameters of `az.get("minference", **params)` for one layer of a search result (a dict or a JSON path)."""
    result = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else source
    layers = result.get("layers", {})
    if str(layer) not in layers:
        raise ValueError(f"load_patterns: layer {layer} was not searched; layers: {sorted(layers, key=int)}")
    heads = tuple(tuple(h) for h in layers[str(layer)]["heads"])
    return {"budget": result["budget"], "heads": heads, "block_size": result["block_size"],
            "last_q": result["last_q"]}
