"""Titans: a linear neural memory that learns at test time (gradient steps with momentum and weight decay)."""
from __future__ import annotations

import math

import torch

from ....core.info import Input, Paper, Param, positive_int
from ....core.registry import register
from .._base import LinearVariant
from .._offsets import run_by_offset
from .chunk import titans_chunk
from .naive import titans_recurrence, titans_step

HYPER = (("theta", "lr"), ("eta", "momentum"), ("alpha", "forget"))  # per-token input -> constant parameter


def _float_in(lo: float, hi: float):
    return lambda v: math.isfinite(v) and lo <= v <= hi


@register
class Titans(LinearVariant):
    name = "titans"
    summary = ("Titans' neural long-term memory (linear memory M, D x Dv per KV head): each token takes a gradient "
               "step on ||k_t M - v_t||^2 with momentum and weight decay, S_t = eta_t S_{t-1} - theta_t grad, "
               "M_t = (1 - alpha_t) M_{t-1} + S_t, and reads o_t = scale * q_t M_t; q and k are L2-normalised, "
               "`scale` defaults to 1. Gradients inside a block of `mini_batch` tokens are taken at the memory of "
               "the block's start (the paper's parallelisable mini-batch descent; 1 = online). theta/eta/alpha "
               "are per-token inputs (the paper's data-dependent learning rate, momentum decay and forgetting) or, "
               "when not given, the constants lr/momentum/forget. State (B, Hkv, D + 1, 3 Dv): M, S, the "
               "mini-batch's anchor memory, and the token count as the last row. The definition is the per-token "
               "recurrence; the chunk form is the paper's parallel mini-batch form (n x n tiles per block).")
    paper = Paper("Titans: Learning to Memorize at Test Time", 2024, "2501.00663")
    params = (
        Param("lr", 0.1, "theta, the memory's learning rate, when the input 'theta' is not given", (int, float),
              lambda v: math.isfinite(v) and v >= 0, "a finite float >= 0"),
        Param("momentum", 0.9, "eta, the momentum decay in [0, 1], when the input 'eta' is not given", (int, float),
              _float_in(0, 1), "a float in [0, 1]"),
        Param("forget", 0.01, "alpha, the forgetting (weight decay) in [0, 1], when the input 'alpha' is not given",
              (int, float), _float_in(0, 1), "a float in [0, 1]"),
        positive_int("mini_batch", 16, "tokens per gradient mini-batch (gradients taken at the block's start "
                                       "memory; also the chunk form's block)"),
    )
    inputs = (
        Input("theta", "(B, Hkv, Sk)", "per-token learning rate >= 0 (overrides lr)", required=False),
        Input("eta", "(B, Hkv, Sk)", "per-token momentum decay in [0, 1] (overrides momentum)", required=False),
        Input("alpha", "(B, Hkv, Sk)", "per-token forgetting in [0, 1] (overrides forget)", required=False),
    )
    cost = ("chunk: O(S n D + S D Dv) time with n = mini_batch, O(n^2 + D Dv) memory per head; step: O(D Dv) per "
            "token")
    state_size = "Hkv x (D + 1) x 3 Dv per sequence (memory, momentum, anchor; token count), constant in S"
    state_doc = "(B, Hkv, D + 1, 3 Dv) (M, S, anchor memory; the token count as the last row)"

    def state_shape(self, batch, heads, dk, dv):
        return (batch, heads, dk + 1, 3 * dv)

    def prepare(self, q, k, v, causal, scale, inputs):
        return super().prepare(q, k, v, causal, 1.0 if scale is None else scale, inputs)

    def validate_call(self, call):
        for name, _ in HYPER:
            x = call.inputs.get(name)
            if x is None:
                continue
            hi = math.inf if name == "theta" else 1.0
            if not torch.isfinite(x).all() or bool((x < 0).any()) or bool((x > hi).any()):
                raise ValueError(f"{self.name}: input {name!r} must be finite and in "
                                 f"{'[0, inf)' if name == 'theta' else '[0, 1]'}; got values outside")

    def hyper(self, inputs: dict, k: torch.Tensor, dtype) -> tuple[torch.Tensor, ...]:
        """theta, eta, alpha (B, Hkv, S): the inputs, or the constant parameters (in the state's dtype: a
        momentum of 0.9 in bfloat16 would be 0.8984)."""
        return tuple(inputs[n] if inputs.get(n) is not None else
                     torch.full(k.shape[:3], float(self.config[p]), dtype=dtype, device=k.device) for n, p in HYPER)

    def parallel(self, q, k, v, call, state, inputs):
        return titans_recurrence(q, k, v, *self.hyper(inputs, k, state.dtype), call.scale, self.config["mini_batch"], state)

    def chunk(self, q, k, v, call, state, inputs):
        def form(q, k, v, state, inputs, offset):
            return titans_chunk(q, k, v, *self.hyper(inputs, k, state.dtype), call.scale, self.config["mini_batch"], state,
                                offset)

        offsets = state[:, 0, -1, 0].long() % self.config["mini_batch"]
        return run_by_offset(offsets, form, q, k, v, state, inputs, self.per_token_inputs())

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        extra = {n: inputs.pop(n) for n, _ in HYPER if n in inputs}
        b, hkv, d, _ = self.check_step(q_t, k_t, v_t, state, inputs)
        for name, x in extra.items():
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != (b, hkv):
                raise ValueError(f"{self.name}: step's {name} must be a (B, Hkv) = {(b, hkv)} tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        theta, eta, alpha = (extra[n] if n in extra else state.new_full((b, hkv), float(self.config[p]))
                             for n, p in HYPER)
        return titans_step(q_t, k_t, v_t, theta, eta, alpha, state, self.step_scale(scale, d, 1.0),
                           self.config["mini_batch"])
