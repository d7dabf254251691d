"""Presses composed in one declarative way: `compose(a, b, ...)` or `a + b`.

A pipeline applies its parts in order once, after prefill: each eviction part chooses among what the
previous parts kept (its ratio counts, as every ratio does, the row's tokens: a later part removes
only what is left above its own budget), and a `kv_quant` part, last, stores what is kept quantized.
The cache is ragged (each KV head holds only its own entries), so per-head budgets save bytes.

    press = kv.compose(kv.get("razor", ratio=0.5), kv.get("tova", ratio=0.75), kv.get("kv_quant", bits=4))
    press = kv.get("snapkv", ratio=0.5) + kv.get("kv_quant", bits=2)
"""
from __future__ import annotations

from typing import ClassVar

from .base import KVPress, Step, restrict


class Pipeline(KVPress):
    """Parts applied in order after prefill; see the module docstring."""

    name = "pipeline"
    stages = ("prefill",)
    layout: ClassVar[str] = "ragged"
    summary = "Eviction presses applied in order after prefill, optionally stored quantized (kv_quant last)."

    def __init__(self, *parts: KVPress):
        flat = []
        for p in parts:
            if not isinstance(p, KVPress):
                raise TypeError(f"compose takes KV presses (attnzoo.kv.get(...)); got {type(p).__name__}")
            flat += list(p.parts) if isinstance(p, Pipeline) else [p]
        if not flat:
            raise ValueError("compose needs at least one press")
        quant = [i for i, p in enumerate(flat) if p.kind == "quantize"]
        if len(quant) > 1 or (quant and quant[0] != len(flat) - 1):
            raise ValueError("compose: at most one kv_quant part, and it must come last (it stores what the others "
                             "keep)")
        bad = [p.name for p in flat if p.kind == "read"]
        if bad:
            raise ValueError(f"compose: read-sparse presses ({', '.join(bad)}) remove nothing from memory; compose "
                             "eviction presses and kv_quant")
        probing = [p.name for p in flat if p.probes]
        if len(probing) > 1:
            raise ValueError(f"compose: at most one part may append probe tokens to the prefill; got {probing}")
        self.parts = tuple(flat)
        self.evictions = tuple(p for p in flat if p.kind == "evict")
        self.quant = flat[-1] if quant else None
        # the fraction of entries removed is at least the largest part's ratio
        self.ratio = max((p.ratio for p in self.evictions), default=0.0)
        self.kind = "evict" if self.evictions else "quantize"

    @property
    def config(self) -> dict:
        return {"parts": [repr(p) for p in self.parts]}

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(repr(p) for p in self.parts)})"

    @property
    def label(self) -> str:
        return "+".join(_part_label(p) for p in self.parts)

    @property
    def active(self) -> bool:
        return any(p.active for p in self.evictions) or self.quant is not None

    def quantization(self):
        return (self.quant.bits, self.quant.group) if self.quant is not None else None

    def prepare(self, model, tokenizer):
        for p in self.evictions:
            if p.active:
                p.prepare(model, tokenizer)

    def on_new_cache(self, cache, n_layers):
        for p in self.evictions:
            p.on_new_cache(cache, n_layers)

    @property
    def probes(self) -> bool:
        return any(p.probes and p.active for p in self.evictions)

    def probe_ids(self, input_ids, valid):
        return next((p.probe_ids(input_ids, valid) for p in self.evictions if p.probes and p.active), None)

    def keep(self, step: Step) -> Step | None:
        """What the parts keep, applied in order: the last part's restricted Step."""
        if not step.prefill:
            return None
        kept = step
        for p in self.evictions:
            if not p.active:
                continue
            selection = p.keep(kept)
            if selection is not None:
                kept = restrict(kept, selection) or kept
        return restrict(kept, kept.valid, keep_all=True) if kept is step else kept


def compose(*presses: KVPress) -> Pipeline:
    """A press applying `presses` in order (see the module docstring); `a + b` is `compose(a, b)`."""
    return Pipeline(*presses)


def _part_label(p: KVPress) -> str:
    return p.label if p.kind == "quantize" else f"{p.label}({p.ratio:g})"
