"""The selection contract: content-sparse attention (the sparse family).

A `SelectionVariant` decides from q and k which keys each query reads (`select`), then attends
with exact softmax over exactly those keys. The choice is a `Selection`: per batch row, query head
and query, the indices of kept key blocks of `block` tokens (`block == 1`: single tokens), -1 for
unused slots. Causality (bottom-right, as everywhere) is applied on top of the selection.

- `attn.selection(q, k, causal=...)` shows the choice;
- `attn.dense_mask(sq, sk, causal=..., q=q, k=k)` is what it keeps, bool (B, Hq, Sq, Sk);
- the reference is dense softmax under that mask; the torch fast path gathers only the selected
  keys, tile of queries by tile, per (batch, head): memory O(tile x kept keys x D), never Sq x Sk,
  and heads never share (or widen) each other's selections.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .blocks import made_once
from .reference import masked_softmax_attention
from .variant import Call, Variant

QUERY_TILE = 64


@dataclass(frozen=True)
class Selection:
    """Kept key blocks: `indices` (B, Hq, Sq, n) long, block index or -1; block b covers keys
    [b * block, min((b + 1) * block, Sk)). `query_block`, when set, says that queries in the same aligned block of
    that many positions (position // query_block) share their row (SeerAttention): kernels may read one row per
    such block. `choices` holds the rows as made: `indices` itself, or with `rows` (Sq,) one row per query block,
    query t reading row rows[t]; then `indices` is expanded from them on first use (the kernels' forward never
    asks for it)."""

    choices: torch.Tensor
    block: int
    sk: int
    query_block: int | None = None
    rows: torch.Tensor | None = None

    @functools.cached_property
    def indices(self) -> torch.Tensor:
        return self.choices if self.rows is None else self.choices[:, :, self.rows]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, Hq, Sq, n): the shape of `indices`, without expanding it."""
        b, h, r, n = self.choices.shape
        return b, h, r if self.rows is None else self.rows.shape[0], n

    def token_indices(self, rows: slice = slice(None)) -> torch.Tensor:
        """(B, Hq, rows, n * block) key indices of the selected blocks, -1 where unused or past Sk."""
        idx = self.indices[:, :, rows]
        if self.block == 1:
            return idx
        offs = torch.arange(self.block, device=idx.device)
        tok = (idx.unsqueeze(-1) * self.block + offs).flatten(-2)
        valid = (idx >= 0).repeat_interleave(self.block, dim=-1) & (tok < self.sk)
        return torch.where(valid, tok, torch.full_like(tok, -1))

    def dense(self) -> torch.Tensor:
        """bool (B, Hq, Sq, Sk): True where a key is selected (before causality)."""
        tok = self.token_indices()
        out = torch.zeros(*tok.shape[:3], self.sk + 1, dtype=torch.bool, device=tok.device)
        out.scatter_(-1, torch.where(tok >= 0, tok, torch.full_like(tok, self.sk)), True)
        return out[..., : self.sk]

    def density(self) -> float:
        """Share of (query, key) pairs selected (before causality), counted from the block indices."""
        idx = self.indices
        nb = -(-self.sk // self.block)
        keys = (idx >= 0).sum() * self.block - (idx == nb - 1).sum() * (nb * self.block - self.sk)
        return float(keys) / (idx.shape[0] * idx.shape[1] * idx.shape[2] * self.sk)


class SelectionVariant(Variant):
    """Subclasses implement `select(q, k, call) -> Selection`; `block_param` names the parameter holding the
    size of the key blocks they select (None: single tokens or a size known only after selecting)."""

    family = "sparse"
    exact = False
    block_param: str | None = None
    state_size = "KV cache: Sk x (D + Dv) per kv head (every key is kept; each query reads its selection)"

    def select(self, q, k, call: Call) -> Selection:
        raise NotImplementedError

    @property
    def selection_block(self) -> int | None:
        """Keys per selected block, known from the parameters (kernels that tile by blocks need it up front)."""
        return self.config[self.block_param] if self.block_param else None

    # ---- public -----------------------------------------------------------------------------------
    def selection(self, q, k, *, causal: bool = False, scale: float | None = None, **inputs) -> Selection:
        """The keys each query would read (v is not needed to choose)."""
        call = self.prepare(q, k, k, causal, scale, inputs)
        return self.select(q, k, call)

    def dense_mask(self, sq: int, sk: int, *, causal: bool = False, q=None, k=None, scale=None, **inputs):
        """bool (B, Hq, Sq, Sk): the keys each query attends to (its selection and causality)."""
        if q is None or k is None:
            raise TypeError(f"{self.name} selects keys from the content: dense_mask needs q= and k=")
        if q.shape[2] != sq or k.shape[2] != sk:
            raise ValueError(f"{self.name}: dense_mask({sq}, {sk}) but q has Sq={q.shape[2]}, k has Sk={k.shape[2]}")
        call = self.prepare(q, k, k, causal, scale, inputs)
        return self._allowed(self.select(q, k, call), call)

    def _allowed(self, sel: Selection, call: Call) -> torch.Tensor:
        m = sel.dense()
        if call.causal:
            s = call.shapes
            q_pos = s.query_positions(device=m.device).view(-1, 1)
            m = m & (torch.arange(s.sk, device=m.device).view(1, -1) <= q_pos)
        return m

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        return masked_softmax_attention(q, k, v, call.scale, self._allowed(self.select(q, k, call), call))

    def forward_torch(self, q, k, v, call: Call) -> torch.Tensor:
        return attend_selected(q, k, v, self.select(q, k, call), call)


def attend_selected(q, k, v, sel: Selection, call: Call, tile: int = QUERY_TILE, key_bias=None) -> torch.Tensor:
    """Exact softmax of each query over its selected keys (and causality), gathering only those keys;
    `key_bias` (B, Hkv, Sk), when given, is added to every query's score of that key.

    Per tile of queries and per (batch, query head), the key blocks any query of the tile selected are
    gathered once (their union within the tile: nearby queries mostly agree, so this is a few times
    top_k blocks, never the union over heads or batch rows); each query then attends to the gathered
    keys it selected. Memory O(tile x union x block); the output is exact whatever the union's size."""
    s = call.shapes
    acc = torch.promote_types(q.dtype, torch.float32)
    bs = sel.block
    nb = -(-s.sk // bs)
    dev = q.device
    kv_head = (torch.arange(s.q_heads, device=dev) // s.group).view(1, -1, 1)   # no repeated k/v
    batch = torch.arange(s.batch, device=dev).view(-1, 1, 1)
    # Gathered from float32 copies: the gathers' backward then sums each key's share from every tile and query
    # head in float32 (summed in bf16, dk and dv of nsa had 2.4x the error of its definition's in bf16).
    k_acc, v_acc = k.to(acc), v.to(acc)
    outs = []
    for a in range(0, s.sq, tile):
        b = min(a + tile, s.sq)
        idx = sel.indices[:, :, a:b]                                         # (B, Hq, T, n) block ids, -1 unused
        chosen = torch.zeros(*idx.shape[:3], nb + 1, dtype=torch.bool, device=dev)
        chosen.scatter_(-1, torch.where(idx >= 0, idx, nb), True)
        chosen = chosen[..., :nb]                                            # (B, Hq, T, nb): query t chose block j
        needed = chosen.any(2)                                               # (B, Hq, nb): the tile's union
        count = needed.sum(-1)
        u = int(count.max())
        if u == 0:
            outs.append(q.new_zeros(s.batch, s.q_heads, b - a, s.dv))
            continue
        blocks = torch.sort((~needed).to(torch.uint8), dim=-1, stable=True).indices[..., :u]   # (B, Hq, U)
        member = chosen.gather(-1, blocks.unsqueeze(2).expand(-1, -1, b - a, -1))
        member &= (torch.arange(u, device=dev) < count.unsqueeze(-1)).unsqueeze(2)
        tok = (blocks.unsqueeze(-1) * bs + torch.arange(bs, device=dev)).flatten(-2)       # (B, Hq, U * bs)
        allowed = member.repeat_interleave(bs, dim=-1) & (tok < s.sk).unsqueeze(2)
        if call.causal:
            q_pos = s.query_positions(a, b, dev).view(1, 1, -1, 1)
            allowed &= tok.unsqueeze(2) <= q_pos
        safe = tok.clamp(max=s.sk - 1)
        keys = k_acc[batch, kv_head, safe]                                   # (B, Hq, U * bs, D)
        vals = v_acc[batch, kv_head, safe]
        scores = (q[:, :, a:b].to(acc) @ keys.transpose(-1, -2)) * call.scale
        if key_bias is not None:
            scores = scores + key_bias[batch, kv_head, safe].to(acc).unsqueeze(2)
        scores = scores.masked_fill(~allowed, -torch.inf)
        m = scores.amax(-1, keepdim=True)
        p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        denom = p.sum(-1, keepdim=True)
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))      # rows with nothing give zeros
        outs.append((p @ vals).to(q.dtype))
    return torch.cat(outs, dim=2)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest scores along the last axis, -1 where fewer than k are above -inf."""
    k = min(k, scores.shape[-1])
    val, idx = scores.topk(k, dim=-1)
    return idx.masked_fill_(val == -torch.inf, -1)



def block_gate_select(gate: torch.Tensor, call: Call, block: int, top_k: int, rows: torch.Tensor | None = None
                      ) -> Selection:
    """Blocks by gate score (B, Hq, Sq, n): each query's own block always, later blocks never under
    causality, then the highest-scoring others up to `top_k` blocks in all (MoBA, Quest). With `rows` (Sq,)
    the gate has one row per block of positions (query t uses row rows[t], the t-th query's position // block
    counted from the first query's; SeerAttention's query blocks): the choice is made once per row, the same as
    choosing per query from the expanded gate, and the Selection says so (query_block = block)."""
    s = call.shapes
    if rows is not None:   # row j holds the positions of block offset // block + j: one cached bias
        gate = gate + _row_bias(gate.shape[2], gate.shape[3], s.offset // block, call.causal, gate.dtype, gate.device)
        return Selection(topk_indices(gate, top_k), block, s.sk, query_block=block, rows=rows)
    own = (s.query_positions(device=gate.device) // block).view(1, 1, -1, 1)
    blocks = torch.arange(gate.shape[-1], device=gate.device).view(1, 1, 1, -1)
    gate = gate.masked_fill(blocks == own, torch.inf)
    if call.causal:
        gate = gate.masked_fill(blocks > own, -torch.inf)
    return Selection(topk_indices(gate, top_k), block, s.sk)


@made_once
def _row_bias(n_rows: int, n_blocks: int, first: int, causal: bool, dtype, device) -> torch.Tensor:
    """(n_rows, n_blocks): +inf on row j's own block first + j, -inf after it under causality, else 0 (made once;
    shared: never modify it)."""
    own = torch.arange(first, first + n_rows, device=device).view(-1, 1)
    blocks = torch.arange(n_blocks, device=device).view(1, -1)
    bias = torch.zeros(n_rows, n_blocks, dtype=dtype, device=device).masked_fill(blocks == own, torch.inf)
    return bias.masked_fill(blocks > own, -torch.inf) if causal else bias
