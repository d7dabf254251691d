"""SeerAttention's gate as a trainable module, and its self-distillation.

`SeerGate` holds the per-head projections of the `seer` variant's gate (pooled query: W_q (H, D, G);
pooled keys max/min/mean: W_k (H, 3, D, G)); `gate.inputs()` passes them to the variant. The paper
trains the gate alone, the model frozen: its block distribution softmax(q_g . k_g / sqrt(G)) over the
key blocks a query block may see is pulled (KL divergence) to the ground truth made from the model's
exact attention: the attention map max-pooled over each (query block, key block) tile, each row
normalised to sum to one (`block_attention_target`, computed a query block at a time: no Sq x Sk
tensor). `distill_seer_gate` runs that training on captured real activations with a progress bar.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..core.info import Paper
from ..variants.sparse.seer import PAPER, gate_scores
from .common import check_int


def _call(q: torch.Tensor, k: torch.Tensor, causal: bool):
    from ..core.api import get

    return get("seer").prepare(q, k, k, causal, None, {})


def visible_blocks(call, block: int, nk: int) -> torch.Tensor:
    """bool (nq, nk): key blocks a query block may see (causality: up to its own block)."""
    pos = call.shapes.query_positions(device=call.device)
    own = torch.unique_consecutive(pos // block).view(-1, 1)
    blocks = torch.arange(nk, device=call.device).view(1, -1)
    return blocks <= own if call.causal else torch.ones(own.shape[0], nk, dtype=torch.bool, device=call.device)


def block_attention_target(q: torch.Tensor, k: torch.Tensor, block: int, causal: bool = True) -> torch.Tensor:
    """The distillation target (B, Hq, nq, nk): exact softmax attention of q (B, Hq, Sq, D) over k (B, Hkv, Sk, D),
    max-pooled over each tile of (query block, key block), each row normalised to sum to one."""
    call = _call(q, k, causal)
    s = call.shapes
    acc = torch.promote_types(q.dtype, torch.float32)
    nk = -(-s.sk // block)
    pad = nk * block - s.sk
    kk = k.to(acc).repeat_interleave(s.group, dim=1)
    pos = s.query_positions(device=q.device)
    rel = pos // block - pos[0] // block
    keys = torch.arange(s.sk, device=q.device).view(1, -1)
    rows = []
    for r in range(int(rel[-1]) + 1):
        idx = (rel == r).nonzero().flatten()
        scores = (q[:, :, idx].to(acc) @ kk.transpose(-1, -2)) * call.scale
        if causal:
            scores = scores.masked_fill(keys > pos[idx].view(-1, 1), -torch.inf)
        probs = torch.nn.functional.pad(torch.softmax(scores, dim=-1), (0, pad))
        rows.append(probs.amax(2).view(s.batch, s.q_heads, nk, block).amax(-1))
    target = torch.stack(rows, dim=2)
    return target / target.sum(-1, keepdim=True)


class SeerGate(nn.Module):
    """The gate of SeerAttention for one layer: `forward(q, k, causal)` -> log-probabilities (B, H, nq, nk) over
    the key blocks each query block may see (-inf elsewhere); `inputs()` -> the `seer` variant's gate inputs."""

    paper: ClassVar[Paper] = PAPER

    def __init__(self, heads: int, head_dim: int, block_size: int = 64, gate_dim: int = 64):
        super().__init__()
        owner = type(self).__name__
        self.heads = check_int(owner, "heads", heads)
        self.head_dim = check_int(owner, "head_dim", head_dim)
        self.block_size = check_int(owner, "block_size", block_size)
        self.gate_dim = check_int(owner, "gate_dim", gate_dim)
        self.gate_q = nn.Parameter(torch.randn(heads, head_dim, gate_dim) / math.sqrt(head_dim))
        self.gate_k = nn.Parameter(torch.randn(heads, 3, head_dim, gate_dim) / math.sqrt(3 * head_dim))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, block_size={self.block_size}, gate_dim={self.gate_dim}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True) -> torch.Tensor:
        if q.dim() != 4 or q.shape[1] != self.heads or q.shape[3] != self.head_dim:
            raise ValueError(f"SeerGate: q must be (B, heads={self.heads}, Sq, head_dim={self.head_dim}), got "
                             f"{tuple(q.shape)}")
        call = _call(q, k, causal)
        scores, _ = gate_scores(q, k, call, self.block_size, self.gate_q, self.gate_k)
        allowed = visible_blocks(call, self.block_size, scores.shape[-1])
        return torch.log_softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1)

    def inputs(self) -> dict:
        """The `seer` variant's inputs: az.get("seer", block_size=gate.block_size, top_k=...)(q, k, v, **gate.inputs())."""
        return {"gate_q": self.gate_q, "gate_k": self.gate_k}


def distillation_loss(log_gate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || gate) per row, averaged over rows; entries the target gives no mass add nothing."""
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_gate), torch.zeros_like(target))
    return terms.sum(-1).mean()


def distill_seer_gate(gate: SeerGate, data, steps: int = 200, lr: float = 1e-2, causal: bool = True,
                      progress: bool = True) -> dict:
    """Trains `gate` by self-distillation on `data`, a list of (q, k) from one layer of a model (real text):
    Adam on the KL to `block_attention_target`, one pass over the list per step. Returns {"loss": [per step]}."""
    steps = check_int("distill_seer_gate", "steps", steps)
    if not data:
        raise ValueError("distill_seer_gate: data must hold at least one (q, k) pair")
    targets = [block_attention_target(q, k, gate.block_size, causal) for q, k in data]
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    history = []
    from rich.progress import track

    for _ in track(range(steps), description="seer gate distillation", disable=not progress):
        opt.zero_grad()
        loss = sum(distillation_loss(gate(q, k, causal), t) for (q, k), t in zip(data, targets)) / len(data)
        loss.backward()
        opt.step()
        history.append(loss.item())
    return {"loss": history}
