"""SeerAttention: a learned gate on pooled q and k picks the key blocks each query block reads.

Queries are grouped in blocks of `block_size` positions (absolute positions, so a query block lines up
with the key block holding the same positions) and average-pooled; keys are pooled per block into their
channel-wise max, min and mean. The gate projects both per query head (W_q (H, D, G) on the pooled
query, W_k (H, 3, D, G) on the three pooled keys) and scores block pairs by q_g . k_g / sqrt(G); every
query of a block reads the block's `top_k` key blocks by that score, its own block always among them
(later blocks never under causality), with exact softmax over their keys.

The gate weights are inputs `gate_q`, `gate_k`, learned by `attnzoo.nn.SeerGate` through the paper's
self-distillation (`attnzoo.nn.distill_seer_gate`: KL to the block-max-pooled exact attention). Without
them the gate is untrained: identity projections of the pooled query and the mean key (G = D). The
paper's gate also rotates the pooled q/k by block position; here q and k arrive after RoPE already.
"""
from __future__ import annotations

import torch

from ...core.blocks import made_once
from ...core.info import Input, Paper, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, block_gate_select

PAPER = Paper("SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", 2024, "2410.13276")


def _block_reduce(x: torch.Tensor, lead: int, block: int, reduce) -> torch.Tensor:
    """reduce(x (..., S, D) over dim -2 in blocks of positions) -> (..., n, D): a first block of `block - lead`
    rows when lead > 0 (the call starts inside a block), whole blocks, then a shorter last block. Views of x, no
    padded copy."""
    s = x.shape[-2]
    first = min((block - lead) % block, s)
    whole = (s - first) // block
    parts = [x[..., :first, :]] if first else []
    if whole:
        mid = x[..., first:first + whole * block, :]
        parts.append(mid.reshape(*x.shape[:-2], whole, block, x.shape[-1]))
    if first + whole * block < s:
        parts.append(x[..., first + whole * block:, :])
    out = [reduce(p, -2) if p.dim() == x.dim() + 1 else reduce(p, -2).unsqueeze(-2) for p in parts]
    return out[0] if len(out) == 1 else torch.cat(out, dim=-2)


def _mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.mean(dim, dtype=torch.promote_types(x.dtype, torch.float32))


def pool_keys(k: torch.Tensor, block: int) -> torch.Tensor:
    """(B, Hkv, n, 3, D) in float32 or wider: the channel-wise max, min and mean of k (B, Hkv, Sk, D) over blocks
    of `block` keys (the last one shorter when block does not divide Sk)."""
    acc = torch.promote_types(k.dtype, torch.float32)
    return torch.stack([_block_reduce(k, 0, block, lambda x, d: x.amax(d).to(acc)),
                        _block_reduce(k, 0, block, lambda x, d: x.amin(d).to(acc)),
                        _block_reduce(k, 0, block, _mean)], dim=3)


def pool_queries(q: torch.Tensor, call, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, H, nq, D) in float32 or wider, block of each query (Sq,) counted from the call's first query
    block): the mean of the call's queries in each block of absolute positions."""
    lead = call.shapes.offset % block                         # positions of the first block before the first query
    return _block_reduce(q, lead, block, _mean), _query_rows(call.shapes.sq, lead, block, q.device)


@made_once
def _query_rows(sq: int, lead: int, block: int, device) -> torch.Tensor:
    """(Sq,): the block of each query counted from the first query's (made once; shared: never modify it)."""
    return (torch.arange(sq, device=device) + lead) // block


def gate_scores(q, k, call, block: int, wq: torch.Tensor | None = None, wk: torch.Tensor | None = None):
    """(scores (B, Hq, nq, nk), block of each query): the gate's q_g . k_g / sqrt(G) per query block and key
    block, before any masking, in float32 or wider. wq (Hq, D, G), wk (Hq, 3, D, G); None: the untrained identity
    gate (pooled query . mean key: the max and min are not computed)."""
    s = call.shapes
    q_pool, rel = pool_queries(q, call, block)                                    # (B, Hq, nq, D)
    if wq is None:
        qg = q_pool
        kg = _block_reduce(k, 0, block, _mean)                                    # (B, Hkv, nk, D)
        kg = kg.repeat_interleave(s.group, dim=1) if s.group > 1 else kg
    else:
        k_pool = pool_keys(k, block).repeat_interleave(s.group, dim=1)            # (B, Hq, nk, 3, D)
        qg = torch.einsum("bhnd,hdg->bhng", q_pool, wq.to(q_pool.dtype))
        kg = torch.einsum("bhnsd,hsdg->bhng", k_pool, wk.to(k_pool.dtype))
    return (qg @ kg.transpose(-1, -2)) * qg.shape[-1] ** -0.5, rel


@register
class Seer(SelectionVariant):
    name = "seer"
    summary = ("SeerAttention: a gate scores (query block, key block) pairs from the mean-pooled queries and the "
               "max/min/mean-pooled keys, projected per head (inputs gate_q (H, D, G), gate_k (H, 3, D, G), learned "
               "by attnzoo.nn.SeerGate's self-distillation from block-max-pooled exact attention; absent: identity "
               "projections of the pooled query and mean key); each query block reads its top_k key blocks, its own "
               "block always, with exact softmax over their keys.")
    paper = PAPER
    params = (
        positive_int("block_size", 64, "positions per query block and per key block"),
        positive_int("top_k", 4, "key blocks each query block reads, its own block included"),
    )
    inputs = (
        Input("gate_q", "(H, D, G)", "the gate's per-head projection of the pooled query (G: gate dim)", required=False),
        Input("gate_k", "(H, 3, D, G)", "the gate's per-head projection of the pooled keys (max, min, mean)",
              required=False),
    )
    cost = "gate: O(Sq D G + Sk D G + (Sq / block_size) (Sk / block_size) G); attend: O(Sq top_k block_size D)"
    budget_param = "top_k"
    block_param = "block_size"

    def input_shape(self, spec, sizes, value=None):
        """G is the gate's own width: taken from the tensor given."""
        g = value.shape[-1] if isinstance(value, torch.Tensor) and value.dim() else 1
        return super().input_shape(spec, {**sizes, "G": g}, value)

    def validate_call(self, call) -> None:
        wq, wk = call.inputs.get("gate_q"), call.inputs.get("gate_k")
        if (wq is None) != (wk is None):
            raise TypeError("seer: give both gate_q and gate_k (a trained gate), or neither (the untrained gate)")
        if wq is not None and wq.shape[-1] != wk.shape[-1]:
            raise ValueError(f"seer: gate_q (H, D, G) and gate_k (H, 3, D, G) must share G, got {wq.shape[-1]} "
                             f"and {wk.shape[-1]}")

    def select(self, q, k, call) -> Selection:
        scores, rel = gate_scores(q, k, call, self.config["block_size"],
                                  call.inputs.get("gate_q"), call.inputs.get("gate_k"))
        return block_gate_select(scores.detach(), call, self.config["block_size"], self.config["top_k"], rows=rel)
