"""Retention over chunks (RetNet's chunkwise form): the shared engine with one log decay per head."""
from __future__ import annotations

import torch

from .._decay import decay_chunk


def scalar_log_gates(gammas: torch.Tensor, s: int, dtype) -> torch.Tensor:
    """(1, Hkv, S): log gamma_h at every position."""
    return gammas.to(dtype).log().view(1, -1, 1).expand(1, -1, s)


def retention_chunk(q, k, v, gammas: torch.Tensor, scale: float, state: torch.Tensor, chunk_size: int):
    """Same arguments and results as `naive.retention_parallel`."""
    return decay_chunk(q, k, v, scalar_log_gates(gammas, k.shape[2], state.dtype), scale, state, chunk_size)
