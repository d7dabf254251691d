"""Head importance and pruning ("Are Sixteen Heads Really Better than One?", Michel et al., 2019).

Each head's output is multiplied by a gate xi_h = 1; the importance of a head is E_x |dL(x)/dxi_h|
over real prose, normalised within each layer (as the paper does). The pruning curve removes
heads from the least important up and measures the loss on held-out prose, against removing heads
in a random order. With `Settings.ablation_sweep`, each head is also ablated alone (the loss it
costs), which takes one forward pass per head.
"""
from __future__ import annotations

import contextlib

import torch

from ...core.info import Paper
from .. import tasks
from ..ablate import gate_heads
from ..session import Session
from .base import Probe, top_summary

PRUNE_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


@contextlib.contextmanager
def frozen(model):
    """Stop weight gradients (only the gates need them), restoring the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gradient_importance(session: Session) -> torch.Tensor:
    """(layers, heads) mean over prose segments of |dLoss/dgate|."""
    total = torch.zeros(session.layers, session.heads)
    items = session.inputs("prose")
    with frozen(session.model):
        for item in session.progress(items, desc="gradient importance"):
            gates = torch.ones(session.layers, session.heads, requires_grad=True)
            with gate_heads(session.model, gates):
                out = session.forward(item.ids)
                loss = tasks.lm_loss(out.logits, item.ids) if hasattr(out, "logits") else out.last_hidden_state.norm()
                (grad,) = torch.autograd.grad(loss, gates)
            total += grad.abs()
    return total / len(items)


@torch.no_grad()
def ablation_importance(session: Session, ids: torch.Tensor, base: float) -> torch.Tensor:
    """(layers, heads) loss increase when each head alone is ablated."""
    out = torch.zeros(session.layers, session.heads)
    cells = [(l, h) for l in range(session.layers) for h in range(session.heads)]
    for l, h in session.progress(cells, desc="ablating each head"):
        with session.ablate([(l, h)]):
            out[l, h] = float(tasks.lm_loss(session.forward(ids).logits, ids)) - base
    return out


@torch.no_grad()
def pruning_curve(session: Session, order: list[tuple[int, int]], ids: torch.Tensor, desc: str) -> list[float]:
    """Held-out loss after pruning the first fraction of `order`, for each of PRUNE_FRACTIONS."""
    losses = []
    n = len(order)
    for frac in session.progress(PRUNE_FRACTIONS, desc=desc):
        with session.ablate(order[:round(frac * n)]):
            losses.append(round(float(tasks.lm_loss(session.forward(ids).logits, ids)), 4))
    return losses


class Importance(Probe):
    name = "importance"
    paper = Paper("Are Sixteen Heads Really Better than One?", 2019, "1905.10650")
    about = ("|dL/dgate| per head on real prose (normalised per layer), and the loss on held-out prose as heads "
             "are pruned from the least important up, against a random order")
    models = "causal"

    def run(self, session):
        raw = gradient_importance(session)
        normalized = raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        maps = {"gradient": normalized, "gradient_raw": raw}
        ids = tasks.prose_segments(session.tokenizer, 1, session.settings.text_tokens, split="heldout")[0]
        least_first = list(reversed(session.top_heads(normalized, session.layers * session.heads)))
        gen = torch.Generator().manual_seed(session.settings.seed)
        random_order = session.random_heads(session.layers * session.heads, [], gen)
        curves = {"fractions": list(PRUNE_FRACTIONS),
                  "by_gradient": pruning_curve(session, least_first, ids, "pruning (gradient order)"),
                  "random": pruning_curve(session, random_order, ids, "pruning (random order)")}
        if session.settings.ablation_sweep:
            maps["ablation"] = ablation_importance(session, ids, curves["by_gradient"][0])
            by_ablation = list(reversed(session.top_heads(maps["ablation"], session.layers * session.heads)))
            curves["by_ablation"] = pruning_curve(session, by_ablation, ids, "pruning (ablation order)")
        summary = {"loss_intact": curves["by_gradient"][0],
                   "pruned_half_loss": {"by_gradient": curves["by_gradient"][-1], "random": curves["random"][-1]},
                   **top_summary(session, normalized, "important")}
        return self.result(maps, summary, {"pruning_curve": curves})
