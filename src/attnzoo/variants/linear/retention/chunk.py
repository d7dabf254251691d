"""Retention over chunks (RetNet's chunkwise form): the shared engine with one fixed log decay per head."""
from __future__ import annotations

import torch

from .._decay import constant_log_gates, decay_chunk


def retention_chunk(q, k, v, gammas: torch.Tensor, scale: float, state: torch.Tensor, chunk_size: int):
    """Same arguments and results as `naive.retention_parallel`."""
    return decay_chunk(q, k, v, constant_log_gates(gammas, k.shape[2], state.dtype), scale, state, chunk_size)
