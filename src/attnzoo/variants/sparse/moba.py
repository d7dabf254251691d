"""MoBA: Mixture of Block Attention. Keys are cut into blocks; each query scores every block by its
mean-pooled key (the gate), and reads its top_k blocks, its own block always among them; blocks after
the query's own are never chosen under causality (inside its own block causality masks the rest)."""
from __future__ import annotations

import torch

from ...core.info import Paper, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, block_gate_select


@register
class MoBA(SelectionVariant):
    name = "moba"
    summary = ("Mixture of Block Attention: keys in blocks of block_size; a query's gate score for a block is "
               "q . mean(k over the block); it reads its top_k blocks (its own block always, counted in "
               "top_k) with exact softmax over their keys; under causal masks later blocks are excluded. "
               "top_k >= number of blocks is full attention.")
    paper = Paper("MoBA: Mixture of Block Attention for Long-Context LLMs", 2025, "2502.13189")
    params = (
        positive_int("block_size", 64, "keys per block"),
        positive_int("top_k", 4, "blocks each query reads, its own block included"),
    )
    cost = "gate: O(Sq (Sk / block_size) D); attend: O(Sq top_k block_size D)"
    budget_param = "top_k"
    block_param = "block_size"

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        bs = self.config["block_size"]
        n = -(-s.sk // bs)
        acc = torch.promote_types(q.dtype, torch.float32)
        pad = n * bs - s.sk
        kp = torch.nn.functional.pad(k.to(acc), (0, 0, 0, pad))
        counts = torch.full((n,), bs, dtype=acc, device=k.device)
        counts[-1] = bs - pad
        means = kp.view(s.batch, s.kv_heads, n, bs, s.d).sum(3) / counts.view(1, 1, n, 1)   # (B, Hkv, n, D)
        means = means.repeat_interleave(s.group, dim=1) if s.group > 1 else means
        gate = q.to(acc) @ means.transpose(-1, -2)                                          # (B, Hq, Sq, n)
        return block_gate_select(gate, call, bs, self.config["top_k"])
