"""GLA: gated linear attention with data-dependent, per-key-dimension forget gates."""
from __future__ import annotations

import torch

from ....core.info import Input, Paper, positive_int
from ....core.recurrent import RecurrentVariant
from ....core.registry import register
from .chunk import gla_chunk
from .naive import gla_parallel, gla_step


@register
class GLA(RecurrentVariant):
    name = "gla"
    affine_state = True
    summary = ("Linear attention whose state decays per key dimension by data-dependent gates: "
               "S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t. No softmax, no normaliser "
               "(as fla's gla). Gates `g` are log forget gates <= 0, usually logsigmoid(x) / 16 (the paper's "
               "temperature). Parallel, chunk and recurrent forms give the same outputs.")
    paper = Paper("Gated Linear Attention Transformers with Hardware-Efficient Training", 2023, "2312.06635")
    exact = False
    params = (positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"),)
    inputs = (Input("g", "(B, Hkv, Sk, D)", "log forget gates, <= 0 (decay exp(g) per key dimension)"),)
    cost = "chunk: O(S C D + S D Dv) time, O(C^2 D + D Dv) memory per head; step: O(D Dv) per token"
    budget_param = None

    def validate_call(self, call):
        g = call.inputs["g"]
        if not torch.isfinite(g).all() or bool((g > 0).any()):
            raise ValueError(f"{self.name}: input 'g' holds log forget gates and must be finite and <= 0 "
                             "(e.g. torch.nn.functional.logsigmoid(x)); got positive or non-finite values")

    def parallel(self, q, k, v, call, state, inputs):
        return gla_parallel(q, k, v, inputs["g"], call.scale, state)

    def chunk(self, q, k, v, call, state, inputs):
        return gla_chunk(q, k, v, inputs["g"], call.scale, state, self.config["chunk_size"])

    def step(self, q_t, k_t, v_t, state, *, scale=None, g=None, **inputs):
        if inputs:
            raise TypeError(f"{self.name}: step takes the input 'g' only, got {sorted(inputs)}")
        if g is None:
            raise TypeError(f"{self.name}: step needs g (B, Hkv, D), the token's log forget gate")
        for name, t, want in (("q_t", q_t, 3), ("k_t", k_t, 3), ("v_t", v_t, 3), ("g", g, 3), ("state", state, 4)):
            if not isinstance(t, torch.Tensor) or t.dim() != want:
                raise ValueError(f"{self.name}: step's {name} must be a rank-{want} tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        b, hkv, d = k_t.shape
        if g.shape != k_t.shape or q_t.shape[0] != b or q_t.shape[1] % hkv or q_t.shape[2] != d:
            raise ValueError(f"{self.name}: step needs q_t (B, Hq, D), k_t and g (B, Hkv, D) with Hq % Hkv == 0; "
                             f"got q_t {tuple(q_t.shape)}, k_t {tuple(k_t.shape)}, g {tuple(g.shape)}")
        if tuple(state.shape) != (b, hkv, d, v_t.shape[-1]):
            raise ValueError(f"{self.name}: state must be (B, Hkv, D, Dv) = {(b, hkv, d, v_t.shape[-1])}, "
                             f"got {tuple(state.shape)}")
        scale = d ** -0.5 if scale is None else scale
        return gla_step(q_t, k_t, v_t, g, state, scale)
