"""Linear attention: softmax replaced by a feature-map kernel, an RNN with a matrix state."""
from __future__ import annotations

from ....core.info import Paper, Param, positive_int
from ....core.registry import register
from .._base import LinearVariant
from .chunk import linear_chunk
from .naive import FEATURE_MAPS, linear_parallel, linear_step


@register
class Linear(LinearVariant):
    name = "linear"
    affine_state = True
    summary = ("Linear attention: o_t = phi(q_t) S_t / (phi(q_t) z_t) with S_t = S_{t-1} + phi(k_t)^T v_t, "
               "z_t = z_{t-1} + phi(k_t), phi = elu + 1 (the paper), relu or identity. normalize=False is fla's "
               "unnormalised form o_t = scale * phi(q_t) S_t; `scale` multiplies phi(q) and cancels when normalised. "
               "Rows whose denominator is 0 give zeros. State (B, Hkv, D, Dv + 1): S and z as the last column "
               "(Dv columns unnormalised). Parallel, chunk and recurrent forms give the same outputs.")
    paper = Paper("Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", 2020, "2006.16236")
    params = (
        Param("feature_map", "elu1", "phi applied to q and k: 'elu1' (elu(x) + 1, the paper's), 'relu', 'identity'",
              (str,), lambda v: v in FEATURE_MAPS, f"one of {sorted(FEATURE_MAPS)}"),
        Param("normalize", True, "divide by phi(q_t) z_t (the paper); False = fla's unnormalised linear attention",
              (bool,), None, "a bool"),
        positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"),
    )
    cost = "chunk: O(S C D + S D Dv) time, O(C^2 + D Dv) memory per head; step: O(D Dv) per token"
    state_size = "Hkv x D x (Dv + 1) per sequence (S and z), constant in S"

    @property
    def state_doc(self) -> str:
        return "(B, Hkv, D, Dv + 1) (S, then z as the last column)" if self.config["normalize"] else "(B, Hkv, D, Dv)"

    def state_shape(self, batch, heads, dk, dv):
        return (batch, heads, dk, dv + 1) if self.config["normalize"] else (batch, heads, dk, dv)

    def parallel(self, q, k, v, call, state, inputs):
        return linear_parallel(q, k, v, self.config["feature_map"], self.config["normalize"], call.scale, state)

    def chunk(self, q, k, v, call, state, inputs):
        return linear_chunk(q, k, v, self.config["feature_map"], self.config["normalize"], call.scale, state,
                            self.config["chunk_size"])

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        d = self.check_step(q_t, k_t, v_t, state, inputs)[2]
        return linear_step(q_t, k_t, v_t, self.config["feature_map"], self.config["normalize"],
                           self.step_scale(scale, d), state)
