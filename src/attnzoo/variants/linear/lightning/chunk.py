"""Lightning Attention-2's tiling on CPU: intra-block (a C x C tile with lambda^(t-s)) plus
inter-block (the decayed state of earlier blocks), i.e. the shared engine with one fixed log decay per head."""
from __future__ import annotations

import torch

from .._decay import constant_log_gates, decay_chunk


def lightning_chunk(q, k, v, lambdas: torch.Tensor, scale: float, state: torch.Tensor, chunk_size: int):
    """Same arguments and results as `naive.lightning_parallel`."""
    return decay_chunk(q, k, v, constant_log_gates(lambdas, k.shape[2], state.dtype), scale, state, chunk_size)
