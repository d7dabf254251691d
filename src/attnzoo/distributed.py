"""`attnzoo.distributed`: context parallelism over torch.distributed (see attnzoo.backends.distributed)."""
from .backends.distributed import (
    ContextParallel,
    communication_plan,
    context_parallel,
    segments,
    shard,
    unshard,
)

__all__ = ["ContextParallel", "communication_plan", "context_parallel", "segments", "shard", "unshard"]
