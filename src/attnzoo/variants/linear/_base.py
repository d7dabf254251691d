"""What the linear family's variants without per-token inputs share: the class defaults, the checks of
`step`'s arguments and of per-head parameters."""
from __future__ import annotations

import math

import torch

from ...core.checks import check_scale
from ...core.info import Param
from ...core.recurrent import RecurrentVariant


class LinearVariant(RecurrentVariant):
    """A recurrent variant whose state has the shape `state_shape` and whose `step` takes no inputs."""

    exact = False
    budget_param = None
    state_doc = "(B, Hkv, D, Dv)"  # what `state_shape` is, in words (error messages)

    def check_step(self, q_t, k_t, v_t, state, inputs: dict) -> tuple[int, int, int, int]:
        """(B, Hkv, D, Dv) of a valid `step` call; TypeError/ValueError naming the argument otherwise."""
        b, hkv, d, dv = self.check_step_tokens(q_t, k_t, v_t, state, inputs)
        want = self.state_shape(b, hkv, d, dv)
        if tuple(state.shape) != want:
            raise ValueError(f"{self.name}: state must be {self.state_doc} = {want}, got {tuple(state.shape)}")
        return b, hkv, d, dv

    def check_step_tokens(self, q_t, k_t, v_t, state, inputs: dict) -> tuple[int, int, int, int]:
        """`check_step` but for the state's shape (a variant whose state shape is not `state_shape`'s checks it)."""
        if inputs:
            raise TypeError(f"{self.name}: step takes no per-token inputs, got {sorted(inputs)}")
        for name, t, want in (("q_t", q_t, 3), ("k_t", k_t, 3), ("v_t", v_t, 3), ("state", state, 4)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{self.name}: step's {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != want:
                raise ValueError(f"{self.name}: step's {name} must be a rank-{want} tensor, got shape {tuple(t.shape)}")
        b, hkv, d = k_t.shape
        if q_t.shape[0] != b or q_t.shape[1] % hkv or q_t.shape[2] != d or tuple(v_t.shape[:2]) != (b, hkv):
            raise ValueError(f"{self.name}: step needs q_t (B, Hq, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv) with "
                             f"Hq % Hkv == 0; got q_t {tuple(q_t.shape)}, k_t {tuple(k_t.shape)}, "
                             f"v_t {tuple(v_t.shape)}")
        return b, hkv, d, v_t.shape[-1]

    @staticmethod
    def step_scale(scale, d: int, default: float | None = None) -> float:
        """`step`'s scale: checked like the call's; None = `default` (D**-0.5 unless given)."""
        if scale is None and default is not None:
            return default
        return check_scale(scale, d)

    def check_heads(self, name: str, value, kv_heads: int) -> None:
        """A per-KV-head parameter given as a sequence must have one entry per KV head."""
        if isinstance(value, (tuple, list)) and len(value) != kv_heads:
            raise ValueError(f"{self.name}: parameter {name!r} has {len(value)} entries but the call has "
                             f"Hkv={kv_heads} KV heads (one value per KV head, or one float for all)")


def per_head_param(name: str, default, doc: str, lo: float, hi: float, hi_open: bool, expected: str,
                   allow_none: bool = True) -> Param:
    """A parameter that is None (the variant's schedule; only when `allow_none`), one float, or one float per
    KV head, each in (lo, hi) (or (lo, hi] when not `hi_open`)."""

    def ok(x) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        return lo < x < hi if hi_open else lo < x <= hi

    def check(v) -> bool:
        if v is None:
            return allow_none
        if isinstance(v, (tuple, list)):
            return len(v) > 0 and all(ok(x) for x in v)
        return ok(v)

    types = (type(None), int, float, tuple, list) if allow_none else (int, float, tuple, list)
    return Param(name, default, doc, types, check, expected)
