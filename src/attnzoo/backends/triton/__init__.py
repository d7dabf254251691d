"""attnzoo's own Triton kernels, registered as the `triton` backend (priority 40).

Three kernel users share the backend: `linear` (chunk kernels of decaying-state linear attention: `auto` takes
them on CUDA for the calls they can run), `blocksparse` (exact softmax attention under any mask, over the
variant's block structure: `auto` takes them only where `speed.MEASURED` records them faster than Flex for that
variant, shape class and dtype; `backend="triton"` runs them for every mask variant) and `selected` (content-sparse
variants: their selection, made per call, as block-sparse tables for the same kernels; `auto` takes them on CUDA).

Without triton the backend is simply not registered; the modules still import (their table-building code, the
block-sparse `Layout`, is plain torch and is tested without triton).
"""
from __future__ import annotations

from ...core.dispatch import Backend, register_backend
from . import blocksparse, linear, selected, speed

_USERS = (blocksparse, selected, linear)


def _serves(cls) -> bool:
    return any(user.serves(cls) for user in _USERS)


def _family(variant):
    return next(user for user in _USERS if user.serves(type(variant)))


def _why_not(variant, call, q):
    if not _serves(type(variant)):
        return (f"{variant.name}: the triton kernels serve {list(linear.SERVED)} (decaying-state linear attention), "
                "softmax attention under a mask without score modifier, and content-sparse variants whose output "
                "is exact softmax over their selection")
    return _family(variant).why_not(variant, call, q)


def _run(variant, q, k, v, call):
    return _family(variant).run(variant, q, k, v, call)


def _auto_why_not(variant, call, q):
    return speed.auto_why_not(variant, call, q) if blocksparse.serves(type(variant)) else None


if blocksparse.TRITON_ERROR is None:  # no triton: no `triton` backend
    register_backend(Backend(
        "triton", 40, _why_not, _run, serves=_serves, auto_why_not=_auto_why_not,
        doc="Triton kernels: chunked decaying-state linear attention (gla, retention, lightning, linear, based, "
            "cosine), block-sparse exact softmax attention for mask variants and for content-sparse selections; "
            "forward and backward, on CUDA"),
        replace=True)
