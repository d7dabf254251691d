"""Masks that compose: `and_masks`, `or_masks` and `inside_documents` (attention-gym's `and_masks`,
`or_masks` and `generate_doc_mask_mod`), over configured mask variants.

A composition is a mask variant like any other: its mask is the parts' masks combined, its extra
inputs are the union of the parts' inputs, it serves the patterns every part serves, and its block
structure comes from the parts' key intervals where they have them (OR: the union of the parts'
intervals; AND: the pairwise intersections), so its fast paths skip the same tiles a hand-written
mask would. Its `reference` is dense softmax under the combined mask.

    local_docs = az.inside_documents(az.get("sliding_window", window=128))
    o = local_docs(q, k, v, causal=True, document_ids=ids)
"""
from __future__ import annotations

import functools

import torch

from .info import Paper, VariantInfo
from .variant import Call, SoftmaxVariant

FLEX_PAPER = Paper("Flex Attention: A Programming Model for Generating Optimized Attention Kernels", 2024,
                   "2412.05496")
MAX_INTERVALS = 64  # past this many intervals per row, evaluating the mask per query block is cheaper


class ComposedMask(SoftmaxVariant):
    """The AND or OR of the masks of configured mask variants (`parts`)."""

    has_mask = True

    def __init__(self, op: str, parts, name: str | None = None) -> None:  # noqa: D107 - no Params: parts are configured
        if op not in ("and", "or"):
            raise ValueError(f"op must be 'and' or 'or', got {op!r}")
        parts = tuple(parts)
        if len(parts) < 2:
            raise ValueError(f"{op}_masks needs at least two mask variants, got {len(parts)}")
        for i, p in enumerate(parts):
            if not isinstance(p, SoftmaxVariant) or not p.has_mask or p.has_score or p.carries \
                    or p.normalization != "softmax":
                raise TypeError(f"{op}_masks: part {i} ({getattr(p, 'name', type(p).__name__)}) must be a configured "
                                "mask variant (az.get(name, ...)) with a mask and no score modifier")
        self.op, self.parts = op, parts
        self.name = name or f"{op}({', '.join(_label(p) for p in parts)})"
        self.config = {"op": op, "parts": tuple(p.key for p in parts)}
        self.key = ("compose", op, tuple(p.key for p in parts))
        self.patterns = tuple(x for x in parts[0].patterns if all(x in p.patterns for p in parts[1:]))
        if not self.patterns:
            raise ValueError(f"{self.name}: the parts serve no pattern in common")
        self.inputs = _merged_inputs(self.name, parts)

    @classmethod
    def flex_capable(cls) -> bool:
        return True

    @functools.cached_property
    def info(self) -> VariantInfo:
        return VariantInfo(
            name=self.name, family="masks", paper=FLEX_PAPER, exact=all(p.info.exact for p in self.parts),
            patterns=self.patterns, params=(), inputs=self.inputs,
            cost=f"the {'intersection' if self.op == 'and' else 'union'} of the parts' attended pairs",
            state_size=self.parts[0].info.state_size,
            backends=tuple(b for b in self.parts[0].info.backends if all(b in p.info.backends for p in self.parts)),
            summary=f"{self.op.upper()} of the masks of " + ", ".join(repr(p) for p in self.parts) + ".")

    def backends(self) -> tuple[str, ...]:
        return self.info.backends

    def __repr__(self) -> str:
        return f"{self.op}_masks({', '.join(repr(p) for p in self.parts)})"

    def mask_depends_on(self) -> frozenset:
        return frozenset().union(*(p.mask_depends_on() for p in self.parts))

    def default_heads(self) -> int | None:
        return next((h for h in (p.default_heads() for p in self.parts) if h is not None), None)

    def validate_call(self, call: Call) -> None:
        for p in self.parts:
            p.validate_call(call)

    def mask(self, call, b, h, q_pos, kv_pos):
        combine = torch.logical_and if self.op == "and" else torch.logical_or
        out = None
        for p in self.parts:
            m = p.mask(call, b, h, q_pos, kv_pos)
            out = m if out is None else combine(out, m)
        return out

    def kv_intervals(self, call, q_pos):
        lists = [p.kv_intervals(call, q_pos) for p in self.parts]
        if any(x is None for x in lists):
            return None
        if self.op == "or":
            out = [iv for x in lists for iv in x]
        else:
            out = lists[0]
            for nxt in lists[1:]:
                out = [(torch.maximum(lo, lo2), torch.minimum(hi, hi2)) for lo, hi in out for lo2, hi2 in nxt]
        return out if len(out) <= MAX_INTERVALS else None


def _label(p) -> str:
    args = ",".join(f"{k}={v}" for k, v in p.config.items() if v is not None) if isinstance(p.config, dict) else ""
    return f"{p.name}({args})" if args and not isinstance(p, ComposedMask) else p.name


def _merged_inputs(name: str, parts) -> tuple:
    seen: dict = {}
    for p in parts:
        for spec in p.inputs:
            other = seen.get(spec.name)
            if other is not None and (other.shape, other.dtype) != (spec.shape, spec.dtype):
                raise ValueError(f"{name}: parts declare input {spec.name!r} differently "
                                 f"({other.shape} {other.dtype} vs {spec.shape} {spec.dtype})")
            if other is None or (spec.required and not other.required):
                seen[spec.name] = spec
    return tuple(seen.values())


def and_masks(*parts, name: str | None = None) -> ComposedMask:
    """Keys allowed by every part: `and_masks(az.get("sliding_window", window=64), az.get("prefix_lm", prefix=8))`."""
    return ComposedMask("and", parts, name)


def or_masks(*parts, name: str | None = None) -> ComposedMask:
    """Keys allowed by any part."""
    return ComposedMask("or", parts, name)


def inside_documents(part, name: str | None = None) -> ComposedMask:
    """`part` restricted to each query's own document (packed sequences): takes `document_ids` (B, Sk)
    and optionally `q_document_ids` (B, Sq), as the `document` variant."""
    from .registry import variant_class

    return ComposedMask("and", (part, variant_class("document")()), name or f"{part.name} inside documents")
