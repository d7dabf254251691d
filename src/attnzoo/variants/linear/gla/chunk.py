"""Gated linear attention over chunks: the shared decay engine (`.._decay.decay_chunk`) with one log
gate per key dimension. The state is carried from chunk to chunk; inside a chunk of C tokens the
outputs come from a C x C decayed score tile. Work O(S C D + S D Dv), memory O(C^2 D) per head: no
S x S tensor. Every exponent is a difference of cumulative log gates within one chunk, so it is <= 0
and nothing overflows in any dtype."""
from __future__ import annotations

import torch

from .._decay import decay_chunk


def gla_chunk(q, k, v, g, scale: float, state: torch.Tensor, chunk_size: int):
    """Same arguments and results as `naive.gla_parallel`; g (B, Hkv, S, D) are per-key-dimension log gates."""
    return decay_chunk(q, k, v, g, scale, state, chunk_size)
