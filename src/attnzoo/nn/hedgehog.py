"""Hedgehog's feature maps as a trainable module, and their attention distillation.

`HedgehogFeatureMap` holds one map per head, phi(x) = softmax([x W + b, -(x W + b)]), for queries
(Hq maps) and keys (Hkv maps), initialised to the identity (W = I, b = 0, as fla's
HedgehogFeatureMap). `maps.attention(q, k, v, ...)` is the `hedgehog` variant with these weights
(every mode, state and packing option of the linear family; gradients reach the weights).

The paper trains the maps alone, the model frozen, so that Hedgehog's attention weights mimic
softmax's: the loss is the cross-entropy between the softmax attention of the model's q and k
(the teacher) and Hedgehog's weights phi_q(q_i) . phi_k(k_j) / sum_j' phi_q(q_i) . phi_k(k_j')
on the same q and k (`distillation_loss`, per query row, averaged). `distill` runs that with Adam
and a progress bar; `attnzoo.lab.hedgehog` fits it on SmolLM2's activations on real text.

`HedgehogAttention` is the drop-in token mixer: `MultiheadAttention` (projections, GQA, RoPE, the
state cache and O(1) decoding steps) whose core is `hedgehog` with its own learned maps.
"""
from __future__ import annotations

import torch
from torch import nn

from ..variants.linear._decay import safe_divide
from ..variants.linear._feature import repeat_kv
from ..variants.linear.hedgehog import Hedgehog, hedgehog_features
from .common import check_int
from .mha import MultiheadAttention


def _mask(sq: int, sk: int, causal: bool, device) -> torch.Tensor | None:
    """Bottom-right causal mask (Sq, Sk), True = attend; None when non-causal."""
    if not causal:
        return None
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)


def softmax_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = True, scale: float | None = None):
    """The teacher: softmax(scale q k^T) (B, Hq, Sq, Sk), masked causally (queries are the last Sq positions)."""
    scores = (q @ repeat_kv(k, q.shape[1]).transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    mask = _mask(q.shape[2], k.shape[2], causal, q.device)
    return (scores if mask is None else scores.masked_fill(~mask, -torch.inf)).softmax(-1)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy -sum_j teacher_ij log student_ij per query row, averaged over rows (the paper's loss)."""
    terms = torch.where(teacher > 0, teacher * student.clamp_min(1e-30).log(), torch.zeros_like(teacher))
    return -terms.sum(-1).mean()


class HedgehogFeatureMap(nn.Module):
    """Per-head feature maps phi(x) = softmax([x W + b, -(x W + b)]) for queries (`heads`) and keys
    (`kv_heads`), from `head_dim` to 2 `feature_dim` features (default feature_dim = head_dim)."""

    paper = Hedgehog.paper

    def __init__(self, heads: int, kv_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        owner = type(self).__name__
        self.heads, self.kv_heads = check_int(owner, "heads", heads), check_int(owner, "kv_heads", kv_heads)
        self.head_dim = check_int(owner, "head_dim", head_dim)
        self.feature_dim = head_dim if feature_dim is None else check_int(owner, "feature_dim", feature_dim)
        if heads % kv_heads:
            raise ValueError(f"{owner}: heads % kv_heads must be 0, got heads={heads}, kv_heads={kv_heads}")
        eye = torch.eye(self.head_dim, self.feature_dim)
        self.weight_q = nn.Parameter(eye.repeat(heads, 1, 1))
        self.bias_q = nn.Parameter(torch.zeros(heads, self.feature_dim))
        self.weight_k = nn.Parameter(eye.repeat(kv_heads, 1, 1))
        self.bias_k = nn.Parameter(torch.zeros(kv_heads, self.feature_dim))

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"feature_dim={self.feature_dim}")

    def variant_params(self) -> dict:
        """The `hedgehog` variant's parameters: az.get('hedgehog', **maps.variant_params())."""
        return {"weight_q": self.weight_q, "bias_q": self.bias_q, "weight_k": self.weight_k, "bias_k": self.bias_k}

    def forward(self, x: torch.Tensor, role: str = "q") -> torch.Tensor:
        """x (B, H, S, D) queries (role 'q') or keys ('k') -> phi(x) (B, H, S, 2F)."""
        if role not in ("q", "k"):
            raise ValueError(f"{type(self).__name__}: role must be 'q' or 'k', got {role!r}")
        weight, bias = (self.weight_q, self.bias_q) if role == "q" else (self.weight_k, self.bias_k)
        if x.dim() != 4 or x.shape[1] != weight.shape[0] or x.shape[-1] != self.head_dim:
            raise ValueError(f"{type(self).__name__}: x must be (B, {weight.shape[0]}, S, {self.head_dim}) for role "
                             f"{role!r}, got {tuple(x.shape)}")
        return hedgehog_features(x, weight, bias)

    def attention(self, q, k, v, *, causal: bool = True, **options):
        """The `hedgehog` variant with these maps (options: scale, mode, initial_state, cu_seqlens...)."""
        return Hedgehog(**self.variant_params())(q, k, v, causal=causal, **options)

    def weights(self, q: torch.Tensor, k: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Hedgehog's attention weights (B, Hq, Sq, Sk): the student of the distillation (dense; short S)."""
        kern = self(q, "q") @ repeat_kv(self(k, "k"), q.shape[1]).transpose(-1, -2)
        mask = _mask(q.shape[2], k.shape[2], causal, q.device)
        kern = kern if mask is None else kern * mask
        return safe_divide(kern, kern.sum(-1, keepdim=True))


def distill(maps: HedgehogFeatureMap, data: list[tuple[torch.Tensor, torch.Tensor]], steps: int = 200,
            lr: float = 1e-2, causal: bool = True, progress: bool = True) -> dict:
    """Fits `maps` to softmax attention on `data`, a list of (q (B, Hq, S, D), k (B, Hkv, S, D)) of one layer
    of a model on real text: Adam on `distillation_loss`, one pass over the list per step. Returns
    {"loss": [per step]}."""
    steps = check_int("distill", "steps", steps)
    if not data:
        raise ValueError("distill: data must hold at least one (q, k) pair")
    teachers = [softmax_weights(q, k, causal) for q, k in data]
    opt = torch.optim.Adam(maps.parameters(), lr=lr)
    history = []
    from rich.progress import track

    for _ in track(range(steps), description="hedgehog distillation", disable=not progress):
        opt.zero_grad()
        loss = sum(distillation_loss(maps.weights(q, k, causal), t) for (q, k), t in zip(data, teachers)) / len(data)
        loss.backward()
        opt.step()
        history.append(loss.item())
    return {"loss": history}


class HedgehogAttention(MultiheadAttention):
    """MultiheadAttention over the `hedgehog` variant with learned maps `self.maps` (feature_dim F per head,
    default head_dim). forward(x, cache=None, causal=True) -> (y, StateCache), as MultiheadAttention."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 feature_dim: int | None = None, rope: bool = True, rope_base: float = 10000.0, bias: bool = False,
                 chunk_size: int = 64):
        super().__init__(dim, heads, kv_heads, head_dim, variant="hedgehog", rope=rope, rope_base=rope_base,
                         bias=bias, chunk_size=chunk_size)
        self.maps = HedgehogFeatureMap(self.heads, self.kv_heads, self.head_dim, feature_dim)
        self.attn = Hedgehog(**self.maps.variant_params(), chunk_size=chunk_size)

    @property
    def config(self) -> dict:
        c = super().config
        return {**{k: v for k, v in c.items() if k != "variant"}, "feature_dim": self.maps.feature_dim}

    def forward(self, x, cache=None, causal: bool = True, **inputs):
        # the variant reads the maps' current tensors (conversions such as .double() may replace them)
        self.attn = Hedgehog(**self.maps.variant_params(), chunk_size=self.params["chunk_size"])
        return super().forward(x, cache=cache, causal=causal, **inputs)
