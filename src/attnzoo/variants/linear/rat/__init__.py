"""RAT: a gated recurrence inside chunks, softmax attention across chunks."""
from __future__ import annotations

import math

import torch

from ....core.info import Input, Paper, Param, positive_int
from ....core.registry import register
from .._base import LinearVariant
from .._offsets import run_by_offset
from .chunk import rat_chunk
from .naive import rat_parallel, rat_step


@register
class RAT(LinearVariant):
    name = "rat"
    summary = ("RAT: inside chunks of `chunk` tokens keys and values are smoothed by a gated recurrence that "
               "restarts every chunk (k~_t = f_t k~_{t-1} + (1 - f_t) k_t, forget gates 'fk' / 'fv' in [0, 1] per "
               "channel, or the constant `forget`); each query attends with softmax to the last k~/v~ of every "
               "earlier chunk and to its own k~_t/v~_t. The state is one row per chunk (B, Hkv, R, D + Dv + 1): it "
               "grows by one row every `chunk` tokens (decoding reads S / chunk summaries: RAT's saving, "
               "not O(1)). Parallel, chunk and recurrent forms give the same outputs.")
    paper = Paper("RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling", 2025, "2507.04416")
    params = (
        positive_int("chunk", 16, "L, tokens per chunk: the recurrence's span and the summaries' stride (the "
                                  "paper's default 16; part of the definition, unlike other variants' chunk_size)"),
        Param("forget", 0.5, "the forget gate in [0, 1] when the inputs 'fk' / 'fv' are not given", (int, float),
              lambda v: math.isfinite(v) and 0 <= v <= 1, "a float in [0, 1]"),
    )
    inputs = (
        Input("fk", "(B, Hkv, Sk, D)", "forget gates of the key recurrence, in [0, 1]", required=False),
        Input("fv", "(B, Hkv, Sk, Dv)", "forget gates of the value recurrence, in [0, 1]", required=False),
    )
    cost = ("chunk: O(S L D) recurrence + O(S (S / L) D) attention time, O(S (S / L)) memory per head (L = "
            "chunk); step: O((S / L) (D + Dv)) per token")
    state_size = "Hkv x ceil(S / chunk) x (D + Dv + 1) per sequence: grows by one row per chunk"
    state_doc = "(B, Hkv, R, D + Dv + 1) (one row per chunk: k~, v~, tokens it holds)"

    def state_shape(self, batch, heads, dk, dv):
        """The empty state (no chunk seen); it grows by one row per chunk."""
        return (batch, heads, 0, dk + dv + 1)

    def state_elements(self, tokens: int, heads: int, dk: int, dv: int) -> int:
        """Elements of one sequence's state after `tokens` tokens: one row per chunk begun."""
        return heads * -(-tokens // self.config["chunk"]) * (dk + dv + 1)

    def validate_call(self, call):
        for name in ("fk", "fv"):
            f = call.inputs.get(name)
            if f is not None and (not torch.isfinite(f).all() or bool((f < 0).any()) or bool((f > 1).any())):
                raise ValueError(f"{self.name}: input {name!r} holds forget gates and must be in [0, 1]")

    def _check_state(self, state, n, s, q):
        if state is None:
            return super()._check_state(state, n, s, q)
        want = (n, s.kv_heads, s.d + s.dv + 1)
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{self.name}: initial_state must be a torch.Tensor {self.state_doc}, got "
                            f"{type(state).__name__}")
        if state.dim() != 4 or (state.shape[0], state.shape[1], state.shape[3]) != want:
            raise ValueError(f"{self.name}: initial_state must have shape {self.state_doc} with B={n}, "
                             f"Hkv={s.kv_heads}, D + Dv + 1={s.d + s.dv + 1}, got {tuple(state.shape)}")
        if state.device != q.device:
            raise ValueError(f"{self.name}: initial_state is on {state.device}, q is on {q.device}")
        self._check_counts(state)
        return state.to(torch.float64 if q.dtype == torch.float64 else torch.float32)  # the accumulation dtype

    def _check_counts(self, state):
        count = state[..., -1]
        partial = ((count > 0) & (count < self.config["chunk"])).sum(-1)
        if bool((count != count.round()).any()) or bool((count < 0).any()) or \
                bool((count > self.config["chunk"]).any()) or bool((partial > 1).any()):
            raise ValueError(f"{self.name}: state's last column counts tokens per chunk row (0..chunk, at most "
                             "one row in progress); got other values")

    def join_states(self, states):
        rows = max(st.shape[2] for st in states)
        return torch.cat([torch.nn.functional.pad(st, (0, 0, 0, rows - st.shape[2])) for st in states], dim=0)

    def gates(self, inputs: dict, k, v, dtype):
        """fk, fv: the inputs, or the constant `forget` (in the state's dtype, not rounded to bf16)."""
        f = float(self.config["forget"])
        return (inputs["fk"] if inputs.get("fk") is not None else torch.full(k.shape, f, dtype=dtype, device=k.device),
                inputs["fv"] if inputs.get("fv") is not None else torch.full(v.shape, f, dtype=dtype, device=v.device))

    def _run(self, fn, q, k, v, call, state, inputs):
        chunk = self.config["chunk"]
        count = state[:, 0, :, -1]
        offsets = (count * ((count > 0) & (count < chunk))).sum(-1).long()

        def form(q, k, v, state, inputs, offset):
            return fn(q, k, v, *self.gates(inputs, k, v, state.dtype), call.scale, chunk, state, offset)

        return run_by_offset(offsets, form, q, k, v, state, inputs, self.per_token_inputs())

    def parallel(self, q, k, v, call, state, inputs):
        return self._run(rat_parallel, q, k, v, call, state, inputs)

    def chunk(self, q, k, v, call, state, inputs):
        return self._run(rat_chunk, q, k, v, call, state, inputs)

    def step(self, q_t, k_t, v_t, state, *, scale=None, fk=None, fv=None, **inputs):
        b, hkv, d, dv = self.check_step_tokens(q_t, k_t, v_t, state, inputs)
        if (state.shape[0], state.shape[1], state.shape[3]) != (b, hkv, d + dv + 1):
            raise ValueError(f"{self.name}: state must be {self.state_doc} with (B, Hkv, D + Dv + 1) = "
                             f"{(b, hkv, d + dv + 1)}, got {tuple(state.shape)}")
        default_k, default_v = self.gates({}, k_t, v_t, state.dtype)
        fk = default_k if fk is None else fk
        fv = default_v if fv is None else fv
        if fk.shape != k_t.shape or fv.shape != v_t.shape:
            raise ValueError(f"{self.name}: step's fk must be (B, Hkv, D) and fv (B, Hkv, Dv)")
        return rat_step(q_t, k_t, v_t, fk, fv, state, self.step_scale(scale, d), self.config["chunk"])

