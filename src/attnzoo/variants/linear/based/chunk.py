"""Based's linear attention over chunks: the Taylor feature maps (1 + D + D^2 features), then the
shared engine without decay, normalised through a column of ones in the values."""
from __future__ import annotations

import torch

from .._decay import decay_chunk, normalise, with_ones
from .naive import taylor_features


def based_chunk(q, k, v, scale: float, normalize: bool, state: torch.Tensor, chunk_size: int):
    """Same arguments and results as `naive.based_parallel`."""
    acc = state.dtype
    fq, fk = taylor_features(q.to(acc), scale), taylor_features(k.to(acc), scale)
    if not normalize:
        return decay_chunk(fq, fk, v, None, 1.0, state, chunk_size)
    o, state = decay_chunk(fq, fk, with_ones(v.to(acc)), None, 1.0, state, chunk_size)
    return normalise(o), state
