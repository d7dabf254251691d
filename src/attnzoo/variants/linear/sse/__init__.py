"""SSE: Sparse State Expansion, linear attention over several states with row-sparse top-k selection."""
from __future__ import annotations

import torch

from ....core.info import Input, Paper, Param, positive_int
from ....core.registry import register
from .._base import LinearVariant
from .chunk import sse_chunk, sse_step
from .naive import sse_parallel


@register
class SSE(LinearVariant):
    name = "sse"
    affine_state = True
    summary = ("Sparse State Expansion: `states` partitions per KV head, each a (gated) linear-attention state. Router "
               "logits (input 'router') classify every token: the `active` (top-k) partitions by softmax are written with weight "
               "w = softmax * mask (S^n += w_n phi(k)^T v, phi = softmax over the key dimension: the row-sparse "
               "classification update) and read with the same weight (o = scale * sum_n w_n q S^n); unselected "
               "partitions are untouched. Optional GLA log decays 'g' (<= 0) apply to the selected partitions only. "
               "State (B, Hkv, states x D, Dv). Parallel, chunk and recurrent forms give the same outputs. (The "
               "paper's layer also has a shared always-on state: add a `gla` or `linear` head for it.)")
    paper = Paper("Scaling Linear Attention with Sparse State Expansion", 2025, "2507.16577")
    params = (
        positive_int("states", 4, "N, the number of state partitions per KV head"),
        positive_int("active", 1, "k, the partitions each token writes and reads: the paper's top-k (<= states; "
                     "not named top_k, which means a key budget elsewhere in attnzoo)"),
        Param("key_softmax", True, "phi(k) = softmax(k) over the key dimension (the classification view; fla's "
              "use_k_softmax); False keeps k", (bool,), None, "a bool"),
        positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"),
    )
    inputs = (
        Input("router", "(B, Hkv, Sk, states)", "router logits over the state partitions"),
        Input("g", "(B, Hkv, Sk, D)", "optional log forget gates <= 0 (GLA-style, per key dimension)",
              required=False),
    )
    cost = ("chunk: O(N (S C D + S D Dv)) time, O(N (C^2 D + D Dv)) memory per head (N = states); step: "
            "O(N D Dv) per token")
    state_size = "Hkv x states x D x Dv per sequence, constant in S"
    state_doc = "(B, Hkv, states x D, Dv) (partition n in rows n D .. (n + 1) D - 1)"

    def state_shape(self, batch, heads, dk, dv):
        return (batch, heads, self.config["states"] * dk, dv)

    def validate_call(self, call):
        self._check_active()
        g = call.inputs.get("g")
        if g is not None and (not torch.isfinite(g).all() or bool((g > 0).any())):
            raise ValueError(f"{self.name}: input 'g' holds log forget gates and must be finite and <= 0; got positive "
                             "or non-finite values")
        if not torch.isfinite(call.inputs["router"]).all():
            raise ValueError(f"{self.name}: input 'router' must be finite")

    def _check_active(self):
        if self.config["active"] > self.config["states"]:
            raise ValueError(f"{self.name}: parameter 'active' ({self.config['active']}) must be <= states "
                             f"({self.config['states']})")

    def _args(self):
        return self.config["active"], self.config["key_softmax"]

    def parallel(self, q, k, v, call, state, inputs):
        return sse_parallel(q, k, v, inputs["router"], inputs.get("g"), call.scale, *self._args(), state)

    def chunk(self, q, k, v, call, state, inputs):
        return sse_chunk(q, k, v, inputs["router"], inputs.get("g"), call.scale, *self._args(), state,
                         self.config["chunk_size"])

    def step(self, q_t, k_t, v_t, state, *, scale=None, router=None, g=None, **inputs):
        b, hkv, d, _ = self.check_step(q_t, k_t, v_t, state, inputs)
        self._check_active()
        if not isinstance(router, torch.Tensor) or tuple(router.shape) != (b, hkv, self.config["states"]):
            raise ValueError(f"{self.name}: step needs router (B, Hkv, states) = {(b, hkv, self.config['states'])}, "
                             f"got {tuple(router.shape) if isinstance(router, torch.Tensor) else router!r}")
        if g is not None and (not isinstance(g, torch.Tensor) or g.shape != k_t.shape):
            raise ValueError(f"{self.name}: step's g must be (B, Hkv, D) = {tuple(k_t.shape)}, got "
                             f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
        return sse_step(q_t, k_t, v_t, router, g, self.step_scale(scale, d), *self._args(), state)
