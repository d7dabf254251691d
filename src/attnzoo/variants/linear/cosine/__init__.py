"""Cottention: causal cosine-similarity linear attention with the paper's length normalisation."""
from __future__ import annotations

import math

import torch

from ....core.info import Paper, positive_int
from ....core.registry import register
from .._base import LinearVariant, per_head_param
from .._decay import per_head
from .chunk import cosine_chunk
from .naive import cosine_parallel, cosine_step


@register
class Cosine(LinearVariant):
    name = "cosine"
    summary = ("Cottention: o_i = scale * sum_{j<=i} cos(q_i, k_j) v_j / j^sigmoid(m) (q and k L2-normalised, no "
               "softmax, no normaliser); the value at position j is divided by j^sigmoid(m), the paper's length "
               "normalisation as the authors' causal implementation applies it (non-causally: the output over s^p). "
               "m is the paper's learned per-head scalar (here a parameter, default its initial 0.5). `scale` "
               "defaults to 1. State (B, Hkv, D + 1, Dv): the sum, then the count of tokens seen as the last row, "
               "so a state carried over pieces keeps absolute positions. Parallel, chunk and recurrent forms agree.")
    paper = Paper("Cottention: Linear Transformers With Cosine Attention", 2024, "2409.18747")
    params = (
        per_head_param("m", 0.5, "the paper's per-head scalar m: values are divided by position^sigmoid(m); one float "
                       "or one per KV head (the paper initialises the learned m at 0.5; sigmoid(0.5) = 0.62)",
                       -math.inf, math.inf, True, "a finite float or a non-empty tuple of finite floats "
                                                  "(one per KV head)", allow_none=False),
        positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"),
    )
    cost = "chunk: O(S C D + S D Dv) time, O(C^2 + D Dv) memory per head; step: O(D Dv) per token"
    state_size = "Hkv x (D + 1) x Dv per sequence (the sum and the token count), constant in S"
    state_doc = "(B, Hkv, D + 1, Dv) (the sum, then the number of tokens seen as the last row)"

    def state_shape(self, batch, heads, dk, dv):
        return (batch, heads, dk + 1, dv)

    def prepare(self, q, k, v, causal, scale, inputs):
        return super().prepare(q, k, v, causal, 1.0 if scale is None else scale, inputs)

    def validate_call(self, call):
        self.check_heads("m", self.config["m"], call.shapes.kv_heads)

    def powers(self, heads: int, like: torch.Tensor) -> torch.Tensor:
        """p = sigmoid(m) per KV head."""
        self.check_heads("m", self.config["m"], heads)
        return torch.sigmoid(per_head(self.config["m"], heads, like))

    def parallel(self, q, k, v, call, state, inputs):
        return cosine_parallel(q, k, v, self.powers(k.shape[1], state), call.scale, state)

    def chunk(self, q, k, v, call, state, inputs):
        return cosine_chunk(q, k, v, self.powers(k.shape[1], state), call.scale, state, self.config["chunk_size"])

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        _, hkv, d, _ = self.check_step(q_t, k_t, v_t, state, inputs)
        return cosine_step(q_t, k_t, v_t, self.powers(hkv, state), self.step_scale(scale, d, 1.0), state)
