"""Mega: a multi-dimensional damped EMA on queries and keys, then single-head softmax attention in chunks."""
from __future__ import annotations

import torch

from ....core.info import CAUSAL_SELF, Input, Paper, positive_int
from ....core.registry import register
from .._base import LinearVariant
from .._offsets import run_by_offset
from .chunk import mega_chunk
from .naive import mega_parallel, mega_step

EMA = ("ema_alpha", "ema_delta", "ema_beta", "ema_eta")
DEFAULT = {"ema_alpha": 0.5, "ema_delta": 1.0, "ema_beta": 1.0}  # eta defaults to 1 / E: a plain EMA, decay 1/2


@register
class Mega(LinearVariant):
    name = "mega"
    summary = ("Mega's attention (Mega-chunk): q and k are smoothed by the multi-dimensional damped EMA "
               "h_t = alpha beta x_t + (1 - alpha delta) h_{t-1}, y_t = sum_e eta h_t (each channel expanded to "
               "ema_dim dimensions), then single-head softmax attention inside chunks of `chunk` tokens. The EMA "
               "parameters are inputs (Hkv, D, ema_dim), learned by the layer that owns them (the paper: sigmoid "
               "for alpha/delta); absent, a plain EMA with decay 1/2. Mega applies the EMA to the layer input "
               "before one shared Q/K projection; here it smooths the given q and k (one EMA for both; with GQA "
               "each query head has its own EMA state with its KV head's parameters). State "
               "(B, Hkv, (G + 1) ema_dim + chunk + 1, D + Dv), G = Hq / Hkv: the EMAs, the chunk in progress, its "
               "count. Parallel, "
               "chunk and recurrent forms give the same outputs. Causal self-attention only (the queries' EMA needs "
               "the earlier queries: continue a sequence with initial_state or step); the paper's gates and output projection belong "
               "to the layer.")
    paper = Paper("Mega: Moving Average Equipped Gated Attention", 2022, "2209.10655")
    # The queries carry an EMA over the queries before them, which a cross call (Sq < Sk) does not have:
    # continue a sequence with initial_state or step instead.
    patterns = (CAUSAL_SELF,)
    params = (
        positive_int("ema_dim", 4, "E, the EMA's expansion per channel (the paper uses 16)"),
        positive_int("chunk", 64, "C, tokens per attention chunk (Mega-chunk; part of the definition)"),
    )
    inputs = tuple(Input(n, "(Hkv, D, ema_dim)", doc, required=False) for n, doc in zip(EMA, (
        "EMA weight alpha in [0, 1]", "EMA damping delta in [0, 1]", "EMA expansion beta",
        "EMA projection eta")))
    cost = ("chunk: O(S C D E + S C (D + Dv)) time, O(C^2 D E) memory per head (C = chunk, E = ema_dim); step: "
            "O(D E + C (D + Dv)) per token")
    state_size = "Hkv x ((G + 1) ema_dim + chunk + 1) x (D + Dv) per sequence (G = Hq / Hkv), constant in S"
    state_doc = ("(B, Hkv, (G + 1) ema_dim + chunk + 1, D + Dv) (G query EMAs, the k EMA, the chunk's keys | values, "
                 "its count)")

    def state_shape(self, batch, heads, dk, dv, groups: int = 1):
        """`groups` = Hq / Hkv: the query heads per KV head, each with its own EMA state."""
        return (batch, heads, (groups + 1) * self.config["ema_dim"] + self.config["chunk"] + 1, dk + dv)

    def call_state_shape(self, n, s):
        return self.state_shape(n, s.kv_heads, s.d, s.dv, s.q_heads // s.kv_heads)

    def init_state(self, batch, heads, dk, dv, *, groups: int = 1, dtype=torch.float32, device=None):
        """Zeros of the state's shape (heads = KV heads, groups = query heads per KV head)."""
        return torch.zeros(self.state_shape(batch, heads, dk, dv, groups), dtype=dtype, device=device)

    def validate_call(self, call):
        self._check_ema(call.inputs)

    def _check_ema(self, inputs):
        for name in EMA:
            x = inputs.get(name)
            if x is None:
                continue
            bad = not torch.isfinite(x).all()
            if name in ("ema_alpha", "ema_delta"):
                bad = bad or bool((x < 0).any()) or bool((x > 1).any())
            if bad:
                raise ValueError(f"{self.name}: input {name!r} must be finite"
                                 f"{' and in [0, 1]' if name in ('ema_alpha', 'ema_delta') else ''}")

    def ema(self, inputs: dict, heads: int, d: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        e = self.config["ema_dim"]
        return tuple(inputs[n] if inputs.get(n) is not None else
                     like.new_full((heads, d, e), DEFAULT.get(n, 1.0 / e)) for n in EMA)

    def _run(self, fn, q, k, v, call, state, inputs):
        ema = self.ema(inputs, k.shape[1], k.shape[-1], state)
        offsets = state[:, 0, -1, 0].long()

        def form(q, k, v, state, inputs, offset):
            return fn(q, k, v, ema, call.scale, self.config["chunk"], state, offset)

        return run_by_offset(offsets, form, q, k, v, state, inputs, self.per_token_inputs())

    def parallel(self, q, k, v, call, state, inputs):
        return self._run(mega_parallel, q, k, v, call, state, inputs)

    def chunk(self, q, k, v, call, state, inputs):
        return self._run(mega_chunk, q, k, v, call, state, inputs)

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        given = {n: inputs.pop(n) for n in EMA if n in inputs}
        b, h, d, dv = self.check_step_tokens(q_t, k_t, v_t, state, inputs)
        want = self.state_shape(b, h, d, dv, q_t.shape[1] // h)
        if tuple(state.shape) != want:
            raise ValueError(f"{self.name}: state must be {self.state_doc} = {want}, got {tuple(state.shape)}")
        want = (h, d, self.config["ema_dim"])
        for name, x in given.items():
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
                raise ValueError(f"{self.name}: step's {name} must be a (Hkv, D, ema_dim) = {want} tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        self._check_ema(given)
        return mega_step(q_t, k_t, v_t, self.ema(given, h, d, state), state, self.step_scale(scale, d),
                         self.config["chunk"])
