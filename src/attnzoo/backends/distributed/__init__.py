"""Context parallelism: attention of any exact softmax mask variant, and of the linear family, with the
sequence sharded over the ranks of a torch.distributed process group (NCCL on GPUs, gloo on CPU).

    import attnzoo as az
    from attnzoo.distributed import context_parallel, shard, unshard

    with context_parallel(group, strategy="ring", layout="zigzag"):
        o = az.attention(shard(q), shard(k), shard(v), variant="sliding_window", window=4096, causal=True)

Inside the context every attention call whose tensors are this rank's shards (q (B, Hq, s_r, D) and k/v
(B, Hkv, s_r, D) at the same positions; per-token inputs such as document ids sharded alike) runs
sharded: `backend="auto"` picks `context_parallel`; `backend="ring" | "allgather" | "ulysses"` forces a
strategy. Softmax variants run the strategy (strategies.py); recurrent variants run LASP-2 (lasp2.py).
Every call first all-gathers the ranks' shapes (a few ints), so ranks that disagree raise the same
ValueError instead of hanging.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, field

from ...core.dispatch import Backend, register_backend
from ...core.recurrent import RecurrentVariant
from ...core.variant import SoftmaxVariant
from .layout import LAYOUTS, check_layout, segments, shard, unshard  # noqa: F401  (re-exported)
from .plan import communication_plan  # noqa: F401  (re-exported)
from .lasp2 import lasp2_why_not
from .strategies import RUNNERS, STRATEGIES, Traffic

DEFAULT_STRATEGY = "ring"


@dataclass
class ContextParallel:
    """The settings of one `context_parallel` block and the traffic its calls moved on this rank."""

    group: object
    strategy: str
    layout: str
    tile_kernel: str = "auto"
    traffic: Traffic = field(default_factory=Traffic)


_ACTIVE: contextvars.ContextVar[ContextParallel | None] = contextvars.ContextVar("attnzoo_cp", default=None)


@contextlib.contextmanager
def context_parallel(group=None, *, strategy: str = DEFAULT_STRATEGY, layout: str = "contiguous",
                     tile_kernel: str = "auto"):
    """Run attnzoo attention sharded over `group` (None = the default group) inside the block.

    strategy: "ring" (default: structure-aware point-to-point, memory O(s_r) per rank, communication
    overlapped), "allgather" (gathers all keys/values: simplest, best when K/V are small, e.g. GQA) or
    "ulysses" (all-to-all over heads; needs Hq and Hkv divisible by the world size). layout: how the
    caller sharded the sequence, "contiguous" (rank r holds one run; lengths may differ) or "zigzag"
    (chunks r and 2P-1-r of 2P: balances causal work; see `shard`). tile_kernel (CUDA): "auto" (PyTorch's
    FlashAttention for sliding windows, attnzoo's triton kernels for every other mask, causal and full included:
    their partial gradients are summed in float32, so bf16 gradients of keys that several ranks use are rounded
    once), "triton" (the triton kernels for all) or "flash" (band masks only: full, causal, sliding_window). Yields a
    `ContextParallel` whose `traffic` counts the bytes this rank sent and received."""
    import torch.distributed as dist

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    check_layout(layout)
    from .kernels import TILE_KERNELS

    if tile_kernel not in TILE_KERNELS:
        raise ValueError(f"tile_kernel must be one of {list(TILE_KERNELS)}, got {tile_kernel!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    cp = ContextParallel(group, strategy, layout, tile_kernel)
    token = _ACTIVE.set(cp)
    try:
        yield cp
    finally:
        _ACTIVE.reset(token)


def active() -> ContextParallel | None:
    return _ACTIVE.get()


def _why_not(variant, call, q, strategy: str | None = None) -> str | None:
    """Why this rank cannot run the call sharded. Only what every rank sees alike (the variant, the
    device): local shapes are checked by `comm.agree` on all ranks at once, so none is left waiting."""
    if _ACTIVE.get() is None:
        return "runs only inside attnzoo.distributed.context_parallel(group)"
    if isinstance(variant, RecurrentVariant):
        if strategy is not None:
            return (f"strategy {strategy!r} is for softmax variants; the linear family runs LASP-2 "
                    "(backend='context_parallel' or 'auto')")
        if _ACTIVE.get().layout != "contiguous":
            return "the linear family (LASP-2) needs layout='contiguous': states flow in sequence order"
        return lasp2_why_not(variant)
    if not isinstance(variant, SoftmaxVariant) or type(variant).forward_torch is not SoftmaxVariant.forward_torch:
        return f"{variant.name} is not an exact softmax mask variant nor a recurrent one"
    from .kernels import kernel_for

    kernel = kernel_for(variant, call, q, _ACTIVE.get().tile_kernel)
    return kernel if isinstance(kernel, str) else None


def _run(variant, q, k, v, call, strategy: str | None = None):
    import torch.distributed as dist

    from .comm import agree, gather_padded
    from .kernels import kernel_for
    from .lasp2 import lasp2
    from .layout import reorder
    from .problem import Problem
    from .strategies import Run
    from .view import global_call

    cp = _ACTIVE.get()
    strategy = strategy or cp.strategy
    group = cp.group
    rank = dist.get_rank(group)
    if isinstance(variant, RecurrentVariant):
        agree(variant, q, call, "lasp2", cp.layout, group)
        return lasp2(variant, q, k, v, call, group, rank, cp.traffic)
    lengths = agree(variant, q, call, strategy, cp.layout, group)
    segs = segments(lengths, cp.layout)
    world = len(segs)
    s = call.shapes
    if strategy == "ulysses" and (s.q_heads % world or s.kv_heads % world):
        raise ValueError(f"strategy='ulysses' splits heads over the {world} ranks: needs Hq={s.q_heads} and "
                         f"Hkv={s.kv_heads} divisible by {world} (use 'ring' or 'allgather')")
    # per-token inputs (document ids, ...) are sharded like q: gather them into global ones
    given = {spec.name: call.inputs[spec.name] for spec in variant.inputs if spec.name in call.inputs}
    global_inputs = {}
    for name, t in given.items():
        spec = next(x for x in variant.inputs if x.name == name)
        dims = [d.strip() for d in spec.shape.strip("()").split(",")]
        seq_dim = next((i for i, d in enumerate(dims) if d in ("Sq", "Sk")), None)
        global_inputs[name] = t if seq_dim is None else reorder(gather_padded(t, lengths, seq_dim, group), segs,
                                                                seq_dim)
    gcall = global_call(variant, q, k, v, call.causal, call.scale, sum(lengths), global_inputs)
    kernel = kernel_for(variant, gcall, q, cp.tile_kernel)
    heads = (0, s.q_heads)
    if strategy == "ulysses":
        heads = (rank * s.q_heads // world, s.q_heads // world)
    problem = Problem(variant, gcall, segs, kernel, heads, s.kv_heads // world if strategy == "ulysses" else 0)
    return RUNNERS[strategy](q, k, v, Run(problem, group, rank, cp.traffic))


def _serves(cls) -> bool:
    if issubclass(cls, RecurrentVariant):
        return cls.affine_state  # LASP-2 (lasp2_why_not)
    return issubclass(cls, SoftmaxVariant) and cls.flex_capable() and not cls.has_score


register_backend(Backend(
    "context_parallel", 90, _why_not, _run, serves=_serves,
    doc="the sequence sharded over a torch.distributed group (inside attnzoo.distributed.context_parallel)"),
    replace=True)
for _name in STRATEGIES:
    register_backend(Backend(
        _name, 5, functools.partial(_why_not, strategy=_name), functools.partial(_run, strategy=_name),
        # listed under `context_parallel` in info.backends; named only to force a strategy on a call
        serves=lambda cls: False, doc=f"context parallel with strategy={_name!r} (inside context_parallel)"),
        replace=True)
