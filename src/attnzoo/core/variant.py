"""Base classes of the zoo.

`Variant` is any attention mechanism: it declares its metadata as class attributes, validates
its parameters once, checks every call, gives a plain dense `reference` and runs a fast path
through a backend. `SoftmaxVariant` is the family of exact softmax attention under a mask and/or
a score modifier, written FlexAttention-style as tiny pure functions of positions; one mask
definition serves the dense reference, the blockwise `torch` path and compiled `flex`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .checks import Shapes, check_causal, check_input_tensor, check_qkv, check_scale
from .info import (ALL_PATTERNS, Input, Paper, Param, VariantInfo, close_names, did_you_mean,
                   pattern_of, validate_params)
from . import blocks as _blocks
from .dispatch import serving


@dataclass
class Call:
    """Everything about one call that is not q/k/v: sizes, scale, causal flag, extra inputs."""

    shapes: Shapes
    scale: float
    causal: bool
    inputs: dict[str, Any] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")

    @property
    def pattern(self) -> str:
        return pattern_of(self.causal, self.shapes.sq, self.shapes.sk)


def _freeze(value):
    """A hashable key for a parameter value (lists -> tuples, bools tagged)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, bool):  # True == 1 must not share a cache entry with 1
        return ("bool", value)
    return value


class Variant:
    """One attention mechanism, configured. Subclasses set the class attributes below."""

    name: ClassVar[str]
    family: ClassVar[str]
    paper: ClassVar[Paper | None] = None
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    patterns: ClassVar[tuple[str, ...]] = ALL_PATTERNS
    params: ClassVar[tuple[Param, ...]] = ()
    inputs: ClassVar[tuple[Input, ...]] = ()
    cost: ClassVar[str] = ""
    state_size: ClassVar[str] = "KV cache: Sk x (D + Dv) per kv head"
    # The parameter that trades cost for fidelity (window, top_k, rank...), swept by `attnzoo bench`;
    # None lets the bench find it by name. `budget_sweep` optionally fixes the values it sweeps.
    budget_param: ClassVar[str | None] = None
    budget_sweep: ClassVar[tuple | None] = None

    def __init__(self, **params: Any) -> None:
        self.config: dict[str, Any] = validate_params(self.name, self.params, params)
        self.validate_config()
        self.key = (self.name, _freeze(self.config))

    # ---- hooks for subclasses -------------------------------------------------------------
    def validate_config(self) -> None:
        """Cross-parameter checks; raise ValueError naming the parameters."""

    def validate_call(self, call: Call) -> None:
        """Checks that need the call's shapes (e.g. per-head parameter lists vs Hq)."""

    def backends(self) -> tuple[str, ...]:
        return self.info.backends

    def forward_torch(self, q, k, v, call: Call) -> torch.Tensor:
        """The eager fast path (no Sq x Sk tensor); every variant has one."""
        raise NotImplementedError

    def reference(self, q, k, v, *, causal: bool = False, scale: float | None = None, **inputs):
        """The variant's definition written plainly (dense, any dtype incl. float64)."""
        call = self.prepare(q, k, v, causal, scale, inputs)
        return self._reference(q, k, v, call)

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        raise NotImplementedError

    # ---- public -----------------------------------------------------------------------------
    @classmethod
    def class_info(cls) -> VariantInfo:
        return VariantInfo(
            name=cls.name,
            family=cls.family,
            paper=cls.paper,
            exact=cls.exact,
            patterns=tuple(cls.patterns),
            params=tuple(cls.params),
            inputs=tuple(cls.inputs),
            cost=cls.cost,
            state_size=cls.state_size,
            backends=serving(cls),
            summary=cls.summary,
        )

    @classmethod
    def _class_backends(cls) -> tuple[str, ...]:
        """The built-in paths this class's math supports; `info.backends` lists every registered
        backend that serves it."""
        return ("torch",)

    @functools.cached_property
    def info(self) -> VariantInfo:
        return self.class_info()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    def __call__(self, q, k, v, *, causal: bool = False, scale: float | None = None, backend: str = "auto", **inputs):
        from .dispatch import run

        call = self.prepare(q, k, v, causal, scale, inputs)
        return run(self, q, k, v, call, backend)

    def explain(self, q, k, v, *, causal: bool = False, scale: float | None = None, **inputs) -> list[dict]:
        """Every registered backend for this call: whether `backend="auto"` picks it, and why (not)."""
        from .dispatch import explain

        call = self.prepare(q, k, v, causal, scale, inputs)
        return explain(self, call, q)

    def prepare(self, q, k, v, causal, scale, inputs: dict) -> Call:
        shapes = check_qkv(q, k, v)
        check_causal(causal, shapes)
        call = Call(shapes, check_scale(scale, shapes.d), causal, {}, q.device)
        if call.pattern not in self.patterns:
            raise ValueError(
                f"{self.name} cannot serve the {call.pattern} pattern (causal={causal}, Sq={shapes.sq}, "
                f"Sk={shapes.sk}); it serves {list(self.patterns)}"
            )
        call.inputs = self.check_inputs(inputs, shapes, q.device)
        self.validate_call(call)
        return call

    def check_inputs(self, inputs: dict, shapes: Shapes, device) -> dict:
        declared = {i.name: i for i in self.inputs}
        unknown = sorted(set(inputs) - set(declared))
        if unknown:
            params = {p.name for p in self.params}
            hint = did_you_mean(unknown, set(declared) | params)
            hint += f"; {self.name} takes inputs {sorted(declared)}" if declared else f"; {self.name} takes no extra inputs"
            if (set(unknown) | set(close_names(unknown, set(declared) | params).values())) & params:
                hint += " (parameters are set in az.get(name, ...), or passed to az.attention)"
            raise TypeError(f"{self.name}: unknown input(s) {unknown}{hint}")
        sizes = {"B": shapes.batch, "H": shapes.q_heads, "Hkv": shapes.kv_heads, "Sq": shapes.sq,
                 "Sk": shapes.sk, "D": shapes.d, "Dv": shapes.dv}
        out = {}
        for spec in self.inputs:
            value = inputs.get(spec.name)
            if value is None:
                if spec.required:
                    raise TypeError(f"{self.name}: missing required input {spec.name!r} {spec.shape}: {spec.doc}")
                continue
            shape = self.input_shape(spec, sizes, value)
            t = check_input_tensor(self.name, spec.name, value, shape, spec.shape, spec.dtype)
            if t.device != device:
                raise ValueError(f"{self.name}: input {spec.name!r} is on {t.device}, q is on {device}")
            out[spec.name] = t
        return out

    def input_shape(self, spec: Input, sizes: dict, value=None) -> tuple[int, ...]:
        """The shape `spec` requires in this call; `value` (the tensor given) lets a variant resolve
        a free dimension (e.g. the number of position embeddings) or pick among alternative shapes."""
        dims = [d.strip() for d in spec.shape.strip("()").split(",") if d.strip()]
        shape = []
        for d in dims:
            if d in sizes:
                shape.append(sizes[d])
            elif d.isdigit():
                shape.append(int(d))
            elif d in self.config:
                shape.append(int(self.config[d]))
            else:
                raise RuntimeError(f"{self.name}: cannot resolve dimension {d!r} of input {spec.name}")
        return tuple(shape)


# ---- exact softmax attention under masks and score modifiers ----------------------------------


def _as_index(i, like: torch.Tensor):
    """An index FlexAttention may pass as a Python int (or users do, by hand) as a tensor on `like`'s device."""
    return i if isinstance(i, torch.Tensor) else torch.as_tensor(i, device=like.device if isinstance(
        like, torch.Tensor) else None)


class SoftmaxVariant(Variant):
    """softmax(scale * q k^T [+ score_mod]) under a mask, rows with nothing allowed give zeros.

    Subclasses override `mask(call, b, h, q_pos, kv_pos)` and/or `score(call, s, b, h, q_pos,
    kv_pos)`. Positions are absolute positions in the key sequence: query i sits at
    i + Sk - Sq (bottom-right alignment, as FlashAttention's), so one definition serves
    self-attention, chunked prefill and decode. Arguments are broadcastable integer tensors
    (FlexAttention's convention), so the same code runs under vmap in Flex and on whole tiles.
    `h` is the query head. Causality is applied by the base class.
    """

    family = "masks"
    has_mask: ClassVar[bool] = False
    has_score: ClassVar[bool] = False
    # How a row's scores become weights: "softmax" (exp(s) / sum exp(s)) or "signed" (Cog attention:
    # sign(s) exp(|s|) / sum exp(|s|)). Only "softmax" can run on FlexAttention or SDPA.
    normalization: ClassVar[str] = "softmax"
    # True when a score depends on the keys between it and the query (CoPE counts gates from the
    # key up to the query): the torch engine then visits key tiles right to left and threads a
    # per-query carry through `carry_score`. FlexAttention cannot express this.
    carries: ClassVar[bool] = False

    def mask(self, call: Call, b, h, q_pos, kv_pos):
        return None

    def score(self, call: Call, s, b, h, q_pos, kv_pos):
        return s

    def init_carry(self, call: Call, qb, b, h, q_pos):
        """The carry of one query block before its first (rightmost) key tile; `qb` is the block's
        queries (B, Hkv, G, rows, D) in the accumulation dtype. Only for `carries` variants."""
        raise NotImplementedError

    def carry_score(self, call: Call, s, carry, b, h, q_pos, kv_pos, mask):
        """Scores of one key tile from its plain scores `s` and the carry of the tiles to its right;
        returns (scores, carry for the next tile to the left). `mask` is None on tiles fully allowed."""
        raise NotImplementedError

    def kv_intervals(self, call: Call, q_pos: torch.Tensor):
        """Allowed keys of each query as a union of half-open intervals [lo, hi), each (B', H', Sq).

        Return None when the mask is not a union of intervals (then tiles are found by evaluating
        the mask one query block at a time). Causality is applied by the caller.
        """
        return None

    # ---- derived ------------------------------------------------------------------------------
    @classmethod
    def _class_backends(cls) -> tuple[str, ...]:
        flex = ("flex",) if cls.flex_capable() else ()
        return ("torch",) + flex + (("sdpa",) if cls.sdpa_capable() else ())

    @classmethod
    def flex_capable(cls) -> bool:
        """FlexAttention takes a score_mod and a mask under softmax, nothing else."""
        return cls.normalization == "softmax" and not cls.carries

    @classmethod
    def sdpa_capable(cls) -> bool:
        return cls.flex_capable() and not cls.has_mask and not cls.has_score

    def full_mask(self, call: Call, b, h, q_pos, kv_pos):
        """The variant's mask and causality, or None where everything is allowed."""
        m = self.mask(call, b, h, q_pos, kv_pos) if self.has_mask else None
        if call.causal:
            c = kv_pos <= q_pos
            m = c if m is None else m & c
        return m

    # What the mask or score reads besides positions, the parameters and the declared inputs:
    # "heads" (Hq), "kv_heads" (Hkv), "causal" (the flag changes the mask itself, not only adds
    # causality), "lengths" (Sq, Sk or the number of keys a query sees). The standalone mask_mod /
    # score_mod know none of these and refuse; dense_mask and mask_mod_for need heads / kv_heads.
    def mask_depends_on(self) -> frozenset:
        return frozenset()

    def score_depends_on(self) -> frozenset:
        return frozenset()

    def default_heads(self) -> int | None:
        """The number of query heads a configured variant fixes (e.g. ALiBi's `heads`), or None."""
        return None

    def dense_mask(self, sq: int, sk: int, *, causal: bool = False, heads: int | None = None,
                   kv_heads: int | None = None, batch: int = 1, device=None, **inputs) -> torch.Tensor:
        """bool (Sq, Sk), or (H, Sq, Sk) with `heads`, or (B, H, Sq, Sk) for per-batch inputs; True = attend.

        `heads` is Hq; `kv_heads` (Hkv) is needed by masks that depend on it (GQA head groups)."""
        if not isinstance(sq, int) or not isinstance(sk, int) or sq < 1 or sk < 1:
            raise ValueError(f"{self.name}: dense_mask needs positive int sq and sk, got {sq!r}, {sk!r}")
        h_count, kv_count = self._head_counts("dense_mask", heads, kv_heads)
        dummy_q = torch.empty(batch, h_count, sq, 1, device=device)
        dummy_k = torch.empty(batch, kv_count, sk, 1, device=device)
        call = self.prepare(dummy_q, dummy_k, dummy_k, causal, None, inputs)
        b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        h = torch.arange(h_count, device=device).view(1, h_count, 1, 1)
        q_pos = call.shapes.query_positions(device=device).view(1, 1, sq, 1)
        kv_pos = torch.arange(sk, device=device).view(1, 1, 1, sk)
        m = self.full_mask(call, b, h, q_pos, kv_pos)
        m = torch.ones(batch, h_count, sq, sk, dtype=torch.bool, device=device) if m is None else m.expand(
            batch, h_count, sq, sk)
        if batch == 1 and not call.inputs:
            m = m[0]
            if heads is None:
                m = m[0]
        return m.contiguous()

    def _head_counts(self, where: str, heads, kv_heads, needs=None) -> tuple[int, int]:
        """(Hq, Hkv) for a dense_mask / mask_mod_for call; TypeError when the mask depends on a count not given."""
        needs = self.mask_depends_on() if needs is None else needs
        for name, value in (("heads", heads), ("kv_heads", kv_heads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{self.name}: {where} needs {name} as a positive int, got {value!r}")
        if heads is None and "heads" in needs:
            raise TypeError(f"{self.name}: the mask differs per head and depends on the number of query heads: "
                            f"pass {where}(..., heads=Hq)")
        h = heads or self.default_heads() or 1
        if kv_heads is None and "kv_heads" in needs and h > 1:
            raise TypeError(f"{self.name}: the mask depends on how query heads share kv heads (GQA): pass "
                            f"{where}(..., heads=Hq, kv_heads=Hkv)")
        kv = h if kv_heads is None else kv_heads
        if h % kv:
            raise ValueError(f"{self.name}: {where} needs heads (Hq={h}) to be a multiple of kv_heads (Hkv={kv})")
        return h, kv

    def mask_mod_for(self, sq: int, sk: int, *, causal: bool = False, heads: int | None = None,
                     kv_heads: int | None = None, **inputs):
        """A FlexAttention mask_mod (b, h, q_idx, kv_idx) for these lengths: q_idx in [0, Sq).

        Works on any device: per-head tables are made on the device of the indices it is given."""
        call = self._flex_call("mask_mod_for", sq, sk, causal, heads, kv_heads, inputs, self.mask_depends_on())
        offset = sk - sq

        def mask_mod(b, h, q_idx, kv_idx):
            b, h = _as_index(b, kv_idx), _as_index(h, kv_idx)
            m = self.full_mask(call, b, h, q_idx + offset, kv_idx)
            return (kv_idx >= 0) if m is None else m

        return mask_mod

    def score_mod_for(self, sq: int, sk: int, *, causal: bool = False, heads: int | None = None,
                      kv_heads: int | None = None, **inputs):
        """A FlexAttention score_mod (score, b, h, q_idx, kv_idx) for these lengths."""
        self._check_score_mod()
        call = self._flex_call("score_mod_for", sq, sk, causal, heads, kv_heads, inputs, self.score_depends_on())
        offset = sk - sq

        def score_mod(score, b, h, q_idx, kv_idx):
            b, h = _as_index(b, kv_idx), _as_index(h, kv_idx)
            return self.score(call, score, b, h, q_idx + offset, kv_idx)

        return score_mod

    def _flex_call(self, where, sq, sk, causal, heads, kv_heads, inputs, needs) -> Call:
        hq, hkv = self._head_counts(where, heads, kv_heads, needs)
        batch = next((t.shape[0] for t in inputs.values() if isinstance(t, torch.Tensor) and t.dim() >= 1), 1)
        dev = next((t.device for t in inputs.values() if isinstance(t, torch.Tensor)), None)
        dq = torch.empty(batch, hq, sq, 1, device=dev)
        dk = torch.empty(batch, hkv, sk, 1, device=dev)
        return self.prepare(dq, dk, dk, causal, None, inputs)

    # The standalone mods are plain functions (not bound methods), so FlexAttention, which counts a
    # function's positional arguments to tell a mask_mod (4) from a score_mod (5), accepts them.
    @functools.cached_property
    def mask_mod(self):
        """The variant's own mask as a FlexAttention mask_mod (b, h, q_idx, kv_idx): self-attention frame
        (q_idx is the query's position), without causality (combine with Flex's causal mask yourself).
        Raises TypeError when the mask depends on sizes or inputs a standalone function cannot know."""
        self._check_standalone("mask_mod", "mask_mod_for", self.mask_depends_on())
        call = self._plain_call()

        def mask_mod(b, h, q_idx, kv_idx):
            b, h = _as_index(b, kv_idx), _as_index(h, kv_idx)
            m = self.mask(call, b, h, q_idx, kv_idx) if self.has_mask else None
            return (kv_idx >= 0) if m is None else m

        return mask_mod

    @functools.cached_property
    def score_mod(self):
        """The variant's score modifier as a FlexAttention score_mod (score, b, h, q_idx, kv_idx), self-attention
        frame. Raises TypeError when it depends on sizes or inputs a standalone function cannot know."""
        self._check_score_mod()
        self._check_standalone("score_mod", "score_mod_for", self.score_depends_on())
        call = self._plain_call()

        def score_mod(score, b, h, q_idx, kv_idx):
            b, h = _as_index(b, kv_idx), _as_index(h, kv_idx)
            return self.score(call, score, b, h, q_idx, kv_idx)

        return score_mod

    def _check_standalone(self, what: str, instead: str, needs) -> None:
        required = [i.name for i in self.inputs if i.required]
        if required:
            raise TypeError(f"{self.name} needs inputs {required}: use {instead}(sq, sk, ...)")
        said = {"heads": "the number of query heads (heads=Hq)", "kv_heads": "the kv head count (kv_heads=Hkv)",
                "causal": "whether attention is causal (causal=)", "lengths": "the sequence lengths (sq, sk, causal=)"}
        missing = [said[n] for n in ("heads", "kv_heads", "causal", "lengths") if n in needs]
        if missing:
            configure = (f", or configure az.get({self.name!r}, heads=Hq)"
                         if "heads" in needs and any(p.name == "heads" for p in self.params) else "")
            raise TypeError(f"{self.name}: a standalone {what} cannot be exact, it depends on {', '.join(missing)}; "
                            f"use attn.{instead}(sq, sk, causal=..., heads=Hq, kv_heads=Hkv){configure}")

    def _check_score_mod(self) -> None:
        if not self.flex_capable():
            raise TypeError(f"{self.name} is not softmax over modified scores (normalization="
                            f"{self.normalization!r}, carries={self.carries}): it has no score_mod")

    def _plain_call(self) -> Call:
        return Call(Shapes(1, 1, 1, 1, 1, 1, 1), 1.0, False, {})

    def block_structure(self, call: Call, q_block: int, kv_block: int) -> _blocks.BlockStructure:
        sq, sk = call.shapes.sq, call.shapes.sk
        dev = call.device
        q_pos = call.shapes.query_positions(device=dev)
        if not self.has_mask:
            lo = torch.zeros(1, 1, sq, dtype=torch.long, device=dev)
            hi = (q_pos + 1 if call.causal else torch.full_like(q_pos, sk)).view(1, 1, sq)
            return _blocks.from_intervals([(lo, hi)], sq, sk, q_block, kv_block)
        intervals = self.kv_intervals(call, q_pos)
        if intervals is not None:
            end = q_pos + 1 if call.causal else None
            return _blocks.from_intervals(intervals, sq, sk, q_block, kv_block, end)
        b, h = self._index_grids(call)
        kv_pos = torch.arange(sk, device=dev).view(1, 1, 1, sk)

        def rows(q0, q1):
            m = self.full_mask(call, b, h, q_pos[q0:q1].view(1, 1, -1, 1), kv_pos)
            return m

        return _blocks.from_mask_rows(rows, sq, sk, q_block, kv_block)

    def _index_grids(self, call: Call):
        s = call.shapes
        b = torch.arange(s.batch, device=call.device).view(-1, 1, 1, 1)
        h = torch.arange(s.q_heads, device=call.device).view(1, -1, 1, 1)
        return b, h

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        from .reference import masked_softmax_attention

        s = call.shapes
        b, h = self._index_grids(call)
        q_pos = (s.query_positions(device=q.device)).view(1, 1, -1, 1)
        kv_pos = torch.arange(s.sk, device=q.device).view(1, 1, 1, -1)
        score = (lambda x: self.score(call, x, b, h, q_pos, kv_pos)) if self.has_score else None
        return masked_softmax_attention(q, k, v, call.scale, self.full_mask(call, b, h, q_pos, kv_pos), score)
