"""Cottention over chunks: normalised q/k and position-scaled values through the shared engine (no
decay); the count of tokens seen travels in the state's last row."""
from __future__ import annotations

import torch

from .._decay import decay_chunk
from .naive import join_state, l2_normalise, position_scaled_values, split_state


def cosine_chunk(q, k, v, powers: torch.Tensor, scale: float, state: torch.Tensor, chunk_size: int):
    """Same arguments and results as `naive.cosine_parallel`."""
    s0, n0 = split_state(state)
    vs = position_scaled_values(v, n0, powers, state.dtype)
    acc = state.dtype
    o, s1 = decay_chunk(l2_normalise(q.to(acc)), l2_normalise(k.to(acc)), vs, None, scale, s0, chunk_size)
    return o, join_state(s1, n0 + k.shape[2])
