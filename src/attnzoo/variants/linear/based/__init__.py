"""Based: linear attention with a 2nd-order Taylor feature map (the linear-attention half of Based)."""
from __future__ import annotations

from ....core.info import Paper, Param, positive_int
from ....core.registry import register
from .._base import LinearVariant
from .chunk import based_chunk
from .naive import based_parallel, based_step, feature_dim


@register
class Based(LinearVariant):
    name = "based"
    affine_state = True
    summary = ("Based's linear attention: o_i = sum_{j<=i} K(q_i,k_j) v_j / sum_{j<=i} K(q_i,k_j) with "
               "K = 1 + s + s^2/2, s = scale * q_i . k_j (the Taylor approximation of exp), computed through the "
               "feature map phi(x) = [1, x', x' ⊗ x' / sqrt 2], x' = x d^-1/4, on q/k projected to a small dimension "
               "d (16 in the paper: 273 features). normalize=False drops the denominator. State "
               "(B, Hkv, 1 + D + D^2, Dv + 1). Based's full architecture also has sliding-window softmax attention, "
               "in separate layers (the released 360M model: linear attention in layers 1, 6, 11, 16, 21, a "
               "256-token window in layers 2, 7, 12, 17, 22, gated convolutions elsewhere): build those with "
               "az.get('sliding_window', window=w - 1, right=0), causal=True (window=w - 1 admits w keys). "
               "Parallel, chunk and recurrent forms give the same outputs.")
    paper = Paper("Simple linear attention language models balance the recall-throughput tradeoff", 2024, "2402.18668")
    params = (
        Param("normalize", True, "divide by the sum of the kernel values (the paper); False = fla's use_norm=False",
              (bool,), None, "a bool"),
        positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"),
    )
    cost = ("chunk: O(S C F + S F Dv) time with F = 1 + D + D^2 features, O(C^2 + F Dv) memory per head; "
            "step: O(F Dv) per token")
    state_size = "Hkv x (1 + D + D^2) x (Dv + 1) per sequence, constant in S"

    @property
    def state_doc(self) -> str:
        return ("(B, Hkv, 1 + D + D^2, Dv + 1) (S, then z as the last column)" if self.config["normalize"]
                else "(B, Hkv, 1 + D + D^2, Dv)")

    def state_shape(self, batch, heads, dk, dv):
        return (batch, heads, feature_dim(dk), dv + 1 if self.config["normalize"] else dv)

    def parallel(self, q, k, v, call, state, inputs):
        return based_parallel(q, k, v, call.scale, self.config["normalize"], state)

    def chunk(self, q, k, v, call, state, inputs):
        return based_chunk(q, k, v, call.scale, self.config["normalize"], state, self.config["chunk_size"])

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        d = self.check_step(q_t, k_t, v_t, state, inputs)[2]
        return based_step(q_t, k_t, v_t, self.step_scale(scale, d), self.config["normalize"], state)
