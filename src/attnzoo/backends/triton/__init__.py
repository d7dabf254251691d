"""attnzoo's own Triton kernels, registered as the `triton` backend (priority 40).

Two kernel families share the backend: `linear` (chunk kernels of decaying-state linear attention: `auto` takes
them on CUDA for the calls they can run) and `blocksparse` (exact softmax attention under any mask, over the
variant's block structure: `auto` takes them only where `speed.FASTER` records them measured faster than the
next backend for that variant, shape class and dtype; `backend="triton"` runs them for every mask variant).

Without triton the backend is simply not registered; the modules still import (their table-building code, the
block-sparse `Layout`, is plain torch and is tested without triton).
"""
from __future__ import annotations

from ...core.dispatch import Backend, register_backend
from . import blocksparse, linear, speed


def _family(variant):
    return blocksparse if blocksparse.serves(type(variant)) else linear


def _why_not(variant, call, q):
    if not (linear.serves(type(variant)) or blocksparse.serves(type(variant))):
        return (f"{variant.name}: the triton kernels serve {list(linear.SERVED)} (decaying-state linear attention) "
                "and softmax attention under a mask without score modifier")
    return _family(variant).why_not(variant, call, q)


def _run(variant, q, k, v, call):
    return _family(variant).run(variant, q, k, v, call)


def _auto_why_not(variant, call, q):
    return speed.auto_why_not(variant, call, q) if blocksparse.serves(type(variant)) else None


if blocksparse.TRITON_ERROR is None:  # no triton: no `triton` backend
    register_backend(Backend(
        "triton", 40, _why_not, _run, serves=lambda cls: linear.serves(cls) or blocksparse.serves(cls),
        auto_why_not=_auto_why_not,
        doc="Triton kernels: chunked decaying-state linear attention (gla, retention, lightning, linear without "
            "normaliser) and block-sparse exact softmax attention for mask variants; forward and backward, on CUDA"),
        replace=True)
