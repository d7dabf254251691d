"""Linear attention over chunks: the feature maps, then the shared engine without decay; normalised
through a column of ones in the values (the state's last column is z)."""
from __future__ import annotations

import torch

from .._decay import decay_chunk, normalise, with_ones
from .naive import FEATURE_MAPS


def linear_chunk(q, k, v, feature_map: str, normalize: bool, scale: float, state: torch.Tensor, chunk_size: int):
    """Same arguments and results as `naive.linear_parallel`."""
    phi = FEATURE_MAPS[feature_map]
    fq, fk = phi(q.to(state.dtype)), phi(k.to(state.dtype))       # feature maps in the state's precision
    if not normalize:
        return decay_chunk(fq, fk, v, None, scale, state, chunk_size)
    o, state = decay_chunk(fq, fk, with_ones(v.to(state.dtype)), None, scale, state, chunk_size)
    return normalise(o), state
