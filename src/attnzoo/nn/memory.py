"""Token mixers over the linear family's variants whose per-call inputs are learned: Titans' data-dependent
learning rate, momentum and forgetting, and Mega's multi-dimensional damped EMA. Both are MultiheadAttention
(projections, RoPE, a StateCache and the O(1) `step` for one decoded token) that make those inputs."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..core.info import Paper
from ..variants.linear.mega import Mega
from ..variants.linear.titans import Titans
from .common import check_float
from .mha import MultiheadAttention


class TitansMemory(MultiheadAttention):
    """MultiheadAttention over `titans` with theta_t = max_lr * sigmoid(.), eta_t = sigmoid(.) and
    alpha_t = sigmoid(.) of one linear map of x per KV head (the paper's data-dependent learning rate,
    momentum decay and forgetting). Initialised at a learning rate of 0.12 max_lr, momentum 0.88 and forgetting
    0.018 (biases -2, 2, -4). forward(x, cache=None, causal=True) -> (y, StateCache)."""

    paper: ClassVar[Paper] = Titans.paper

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 max_lr: float = 1.0, rope: bool = True, rope_base: float = 10000.0, bias: bool = False,
                 mini_batch: int = 16):
        super().__init__(dim, heads, kv_heads, head_dim, variant="titans", rope=rope, rope_base=rope_base, bias=bias,
                         mini_batch=mini_batch)
        self.max_lr = check_float(type(self).__name__, "max_lr", max_lr)
        self.hyper = nn.Linear(dim, 3 * self.kv_heads)
        with torch.no_grad():
            self.hyper.bias.copy_(torch.tensor([-2.0, 2.0, -4.0]).repeat_interleave(self.kv_heads))

    @property
    def config(self) -> dict:
        return {**{k: v for k, v in super().config.items() if k != "variant"}, "max_lr": self.max_lr}

    def memory_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """theta, eta, alpha (B, Hkv, S) for x (B, S, dim)."""
        b, s, _ = x.shape
        h = torch.sigmoid(self.hyper(x)).view(b, s, 3, self.kv_heads).permute(2, 0, 3, 1)
        return {"theta": self.max_lr * h[0], "eta": h[1], "alpha": h[2]}

    def forward(self, x, cache=None, causal: bool = True, **inputs):
        return super().forward(x, cache=cache, causal=causal, **{**self.memory_inputs(x), **inputs})


class MegaAttention(MultiheadAttention):
    """MultiheadAttention over `mega` with learned EMA parameters per head (H, head_dim, ema_dim): alpha and
    delta as sigmoids of logits initialised N(0, 0.2), beta at alternating +-1 plus N(0, 0.02), eta N(0, 1)
    (Mega's initialisation). Query heads = KV heads (Mega is single-head attention per head). Mega's reset
    and update gates and its output projection around the attention are not part of this module.
    forward(x, cache=None, causal=True) -> (y, StateCache)."""

    paper: ClassVar[Paper] = Mega.paper

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, ema_dim: int = 4, chunk: int = 64,
                 rope: bool = True, rope_base: float = 10000.0, bias: bool = False):
        super().__init__(dim, heads, None, head_dim, variant="mega", rope=rope, rope_base=rope_base, bias=bias,
                         ema_dim=ema_dim, chunk=chunk)
        shape = (self.heads, self.head_dim, ema_dim)
        sign = torch.ones(ema_dim)
        sign[1::2] = -1.0
        self.alpha_logit = nn.Parameter(0.2 * torch.randn(shape))
        self.delta_logit = nn.Parameter(0.2 * torch.randn(shape))
        self.beta = nn.Parameter(sign + 0.02 * torch.randn(shape))
        self.eta = nn.Parameter(torch.randn(shape))

    @property
    def config(self) -> dict:
        return {k: v for k, v in super().config.items() if k not in ("variant", "kv_heads")}

    def ema_inputs(self) -> dict[str, torch.Tensor]:
        return {"ema_alpha": torch.sigmoid(self.alpha_logit), "ema_delta": torch.sigmoid(self.delta_logit),
                "ema_beta": self.beta, "ema_eta": self.eta}

    def forward(self, x, cache=None, causal: bool = True, **inputs):
        return super().forward(x, cache=cache, causal=causal, **{**self.ema_inputs(), **inputs})
