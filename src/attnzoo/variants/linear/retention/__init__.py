"""RetNet's retention: linear attention with a fixed scalar decay per head."""
from __future__ import annotations

import torch

from ....core.info import Paper, positive_int
from ....core.registry import register
from .._base import LinearVariant, per_head_param
from .._decay import per_head
from .chunk import retention_chunk
from .naive import retention_parallel, retention_step, retnet_decays


@register
class Retention(LinearVariant):
    name = "retention"
    affine_state = True
    summary = ("RetNet's retention operator: o = (Q K^T ⊙ D) V * scale with D_nm = gamma^(n-m) (n >= m), i.e. "
               "S_n = gamma S_{n-1} + k_n^T v_n, o_n = scale * q_n S_n; one decay per KV head, by default RetNet's "
               "gamma_h = 1 - 2^(-5-h) (override with `decay`). No normaliser: as fla's retention op, RetNet's "
               "D-row scaling, score normalisation by max(|row sum|, 1) and GroupNorm belong to the layer, not to "
               "this operator. Parallel, chunk and recurrent forms give the same outputs.")
    paper = Paper("Retentive Network: A Successor to Transformer for Large Language Models", 2023, "2307.08621")
    params = (
        per_head_param("decay", None, "gamma per KV head: None = RetNet's 1 - 2^(-5-h), one float for all heads, or "
                       "one per KV head; each in (0, 1)", 0.0, 1.0, True,
                       "None, a float in (0, 1) or a non-empty tuple of floats in (0, 1) (one per KV head)"),
        positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"),
    )
    cost = "chunk: O(S C D + S D Dv) time, O(C^2 + D Dv) memory per head; step: O(D Dv) per token"

    def validate_call(self, call):
        self.check_heads("decay", self.config["decay"], call.shapes.kv_heads)

    def decays(self, heads: int, like: torch.Tensor) -> torch.Tensor:
        """gamma per KV head, (heads,)."""
        if self.config["decay"] is None:
            return retnet_decays(heads, like.dtype, like.device)
        self.check_heads("decay", self.config["decay"], heads)
        return per_head(self.config["decay"], heads, like)

    def parallel(self, q, k, v, call, state, inputs):
        return retention_parallel(q, k, v, self.decays(k.shape[1], state), call.scale, state)

    def chunk(self, q, k, v, call, state, inputs):
        return retention_chunk(q, k, v, self.decays(k.shape[1], state), call.scale, state, self.config["chunk_size"])

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        _, hkv, d, _ = self.check_step(q_t, k_t, v_t, state, inputs)
        return retention_step(q_t, k_t, v_t, self.decays(hkv, state), self.step_scale(scale, d), state)
