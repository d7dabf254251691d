"""The recurrent contract: attention that is a state carried along the sequence (the linear family).

A `RecurrentVariant` has one definition and three forms that give the same outputs (fla's
conventions):

- `mode="parallel"`: the definition written plainly, quadratic in S (also `reference`);
- `mode="chunk"`: the state carried over chunks of `chunk_size` tokens, work linear in S, no S x S
  tensor (C x C tiles inside a chunk);
- `mode="recurrent"`: one token at a time through `step`.

`initial_state=` starts from a given state (B, Hkv, Dk, Dv) (one per sequence when packed), and
`output_final_state=True` returns `(o, state)`, so a sequence split into pieces with the state
carried equals one pass. `cu_seqlens=` (fla's convention: B == 1, cumulative lengths (N+1,))
packs N sequences along S; each starts from its own initial state (zeros by default) and none reads
another's. State lives per KV head: with GQA the query heads of a group read the same state.

Causal only: with `Sq < Sk` the queries are the last Sq positions (as everywhere in attnzoo), i.e.
the first Sk - Sq keys only build the state.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .checks import Shapes
from .info import CAUSAL_PATTERNS
from .variant import Call, Variant

MODES = ("parallel", "chunk", "recurrent")


class RecurrentVariant(Variant):
    """Subclasses implement `parallel`, `chunk` and `step_tokens` on (B, H, S, ...) tensors whose
    queries are aligned with the keys (Sq == Sk), heads already grouped (Hq == Hkv * G); the base
    class validates, aligns cross patterns, splits packed sequences and carries state."""

    family = "linear"
    patterns = CAUSAL_PATTERNS
    default_mode: ClassVar[str] = "chunk"
    call_options: ClassVar[tuple[str, ...]] = ("mode", "initial_state", "output_final_state", "cu_seqlens")
    state_size = "Hkv x Dk x Dv per sequence, constant in S"
    # The final state is A * S0 + final(0) for any initial state S0 (A elementwise, from the decays):
    # what LASP-2 sequence parallelism relies on. Declared per variant (a test checks each claim).
    affine_state: ClassVar[bool] = False

    # ---- what subclasses implement --------------------------------------------------------------
    def parallel(self, q, k, v, call: Call, state: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(o (B, Hq, S, Dv), final state) by the quadratic definition; `state` (B, Hkv, Dk, Dv) is the initial one."""
        raise NotImplementedError

    def chunk(self, q, k, v, call: Call, state: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step(self, q_t, k_t, v_t, state, *, scale: float | None = None, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: q_t (B, Hq, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv), per-token inputs (B, Hkv, ...)
        -> (o_t (B, Hq, Dv), new state). O(1) in the sequence length."""
        raise NotImplementedError

    def state_shape(self, batch: int, heads: int, dk: int, dv: int) -> tuple[int, ...]:
        return (batch, heads, dk, dv)

    # ---- public ---------------------------------------------------------------------------------
    def init_state(self, batch: int, heads: int, dk: int, dv: int, *, dtype=torch.float32, device=None):
        """Zeros of the state's shape (heads = KV heads)."""
        return torch.zeros(self.state_shape(batch, heads, dk, dv), dtype=dtype, device=device)

    def __call__(self, q, k, v, *, causal: bool = False, scale: float | None = None, backend: str = "auto",
                 mode: str | None = None, initial_state: torch.Tensor | None = None,
                 output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None, **inputs):
        call = self.prepare(q, k, v, causal, scale, inputs)
        mode = self._check_mode(mode)
        if not isinstance(output_final_state, bool):
            raise TypeError(f"{self.name}: output_final_state must be a bool, got {type(output_final_state).__name__}")
        call.options = {"mode": mode, "initial_state": initial_state, "output_final_state": output_final_state,
                        "cu_seqlens": cu_seqlens}
        from .dispatch import run

        return run(self, q, k, v, call, backend)

    def reference(self, q, k, v, *, causal: bool = False, scale: float | None = None,
                  initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: torch.Tensor | None = None, **inputs):
        """The definition written plainly (the quadratic parallel form), any dtype incl. float64."""
        call = self.prepare(q, k, v, causal, scale, inputs)
        call.options = {"mode": "parallel", "initial_state": initial_state,
                        "output_final_state": output_final_state, "cu_seqlens": cu_seqlens}
        return self.run_forms(q, k, v, call)

    def forward_torch(self, q, k, v, call: Call):
        return self.run_forms(q, k, v, call)

    def run_forms(self, q, k, v, call: Call):
        """Run `call.options['mode']` over each packed sequence with its own state."""
        opts = getattr(call, "options", None) or {"mode": self.default_mode}
        s = call.shapes
        segments = self._segments(opts.get("cu_seqlens"), s)
        n = len(segments)
        state0 = self._check_state(opts.get("initial_state"), n if opts.get("cu_seqlens") is not None else s.batch,
                                   s, q)
        form = {"parallel": self.parallel, "chunk": self.chunk, "recurrent": self._recurrent}[opts["mode"]]
        # Cross pattern: queries are the last Sq positions; earlier keys only build the state.
        if s.sq < s.sk:
            q = torch.cat([q.new_zeros(s.batch, s.q_heads, s.sk - s.sq, s.d), q], dim=2)
        if opts.get("cu_seqlens") is None:
            o, state = form(q, k, v, call, state0, call.inputs)
        else:
            outs, states = [], []
            per_token = self.per_token_inputs()
            for i, (a, b) in enumerate(segments):
                seg_inputs = {name: t[:, :, a:b] if name in per_token else t for name, t in call.inputs.items()}
                o_i, st_i = form(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], call, state0[i:i + 1], seg_inputs)
                outs.append(o_i)
                states.append(st_i)
            o, state = torch.cat(outs, dim=2), self.join_states(states)
        o = o[:, :, s.sk - s.sq:].to(q.dtype)
        return (o, state) if opts.get("output_final_state") else o

    def per_token_inputs(self) -> set[str]:
        """Inputs with one entry per key position (B, Hkv, Sk, ...): sliced per packed sequence and per
        token; the others (per-call parameters such as Mega's EMA) are passed whole."""
        return {i.name for i in self.inputs if "Sk" in i.shape}

    def join_states(self, states: list[torch.Tensor]) -> torch.Tensor:
        """The final states of packed sequences as one batch (a variant whose state grows overrides this)."""
        return torch.cat(states, dim=0)

    def _recurrent(self, q, k, v, call: Call, state, inputs):
        outs = []
        per_token = self.per_token_inputs()
        for t in range(k.shape[2]):
            o_t, state = self.step(q[:, :, t], k[:, :, t], v[:, :, t], state, scale=call.scale,
                                   **{n: x[:, :, t] if n in per_token else x for n, x in inputs.items()})
            outs.append(o_t)
        return torch.stack(outs, dim=2), state

    # ---- checks ---------------------------------------------------------------------------------
    def _check_mode(self, mode) -> str:
        mode = self.default_mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {list(MODES)}, got {mode!r}")
        return mode

    def _segments(self, cu_seqlens, s: Shapes) -> list[tuple[int, int]]:
        if cu_seqlens is None:
            return [(0, s.sk)]
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
            raise TypeError(f"{self.name}: cu_seqlens must be a 1-D integer tensor (N+1,) of cumulative lengths")
        if s.batch != 1:
            raise ValueError(f"{self.name}: packed sequences (cu_seqlens) need batch size 1, got B={s.batch}")
        if s.sq != s.sk:
            raise ValueError(f"{self.name}: cu_seqlens packs self-attention; got Sq={s.sq} != Sk={s.sk}")
        cu = [int(x) for x in cu_seqlens.tolist()]
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != s.sk or any(b <= a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"{self.name}: cu_seqlens must rise strictly from 0 to S={s.sk}, got {cu}")
        return list(zip(cu, cu[1:]))

    def call_state_shape(self, n: int, s: Shapes) -> tuple[int, ...]:
        """The state shape of a call with these shapes (a variant whose state depends on Hq overrides this)."""
        return self.state_shape(n, s.kv_heads, s.d, s.dv)

    def _check_state(self, state, n: int, s: Shapes, q) -> torch.Tensor:
        want = self.call_state_shape(n, s)
        if state is None:
            return torch.zeros(want, dtype=_acc(q.dtype), device=q.device)
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{self.name}: initial_state must be a torch.Tensor {want}, got {type(state).__name__}")
        if tuple(state.shape) != want:
            what = "(N sequences, Hkv, Dk, Dv)" if n != s.batch else "(B, Hkv, Dk, Dv)"
            raise ValueError(f"{self.name}: initial_state must have shape {what} = {want}, got {tuple(state.shape)}")
        if state.device != q.device:
            raise ValueError(f"{self.name}: initial_state is on {state.device}, q is on {q.device}")
        return state.to(_acc(q.dtype))


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype states accumulate in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, ...) -> (B, Hkv, G, ...): the query heads that read each KV head's state."""
    return q.view(q.shape[0], kv_heads, q.shape[1] // kv_heads, *q.shape[2:])


def ungroup(o: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, G, ...) -> (B, Hq, ...)."""
    return o.reshape(o.shape[0], o.shape[1] * o.shape[2], *o.shape[3:])

