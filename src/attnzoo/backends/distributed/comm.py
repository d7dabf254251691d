"""The collectives the strategies share (torch.distributed underneath: NCCL on GPUs, gloo on CPU),
and the shape check every call starts with, so ranks that disagree fail with one clear error each
instead of hanging in a collective with mismatched sizes."""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gather_ints(values: list[int], group) -> list[list[int]]:
    """Every rank's list of ints (same count on every rank), in rank order."""
    dev = _comm_device(group)
    t = torch.tensor(values, dtype=torch.long, device=dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def gather_lengths(n: int, group) -> list[int]:
    return [x[0] for x in gather_ints([n], group)]


def gather_padded(x: torch.Tensor, lengths: list[int], dim: int, group) -> list[torch.Tensor]:
    """Every rank's `x` (its length along `dim` from `lengths`), padded to the longest for all_gather."""
    longest = max(lengths)
    pad = longest - x.shape[dim]
    xp = x if pad == 0 else torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim=dim)
    out = [torch.empty_like(xp) for _ in lengths]
    dist.all_gather(out, xp.contiguous(), group=group)
    return [o.narrow(dim, 0, n) for o, n in zip(out, lengths)]


def _comm_device(group):
    backend = dist.get_backend(group)
    if backend in ("nccl", "xccl"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(variant, q, call, strategy: str, layout: str, group) -> list[int]:
    """Every rank's local sequence length, after checking that all ranks agree on everything else.

    Raises ValueError (on every rank alike: all see the same gathered shapes) naming each rank's
    shapes when they differ, or when a rank's q and k/v hold different numbers of positions."""
    s = call.shapes
    mine = [s.batch, s.q_heads, s.kv_heads, s.sq, s.sk, s.d, s.dv, _DTYPES.index(q.dtype), int(call.causal),
            round(call.scale * 1e9), zlib.crc32(repr(variant.key).encode()), zlib.crc32(strategy.encode()),
            zlib.crc32(layout.encode())]
    rows = gather_ints(mine, group)
    keys = [(r[:3] + r[5:]) for r in rows]
    if any(key != keys[0] for key in keys):
        shapes = "; ".join(f"rank {i}: q (B={r[0]}, Hq={r[1]}, S={r[3]}, D={r[5]}), k/v (Hkv={r[2]}, Dv={r[6]}), "
                           f"dtype {_DTYPES[r[7]]}, causal={bool(r[8])}, scale={r[9] / 1e9:g}"
                           for i, r in enumerate(rows))
        raise ValueError(f"context parallel: ranks disagree on shapes, dtype, causal, scale, variant, strategy or "
                         f"layout (only the local sequence length may differ): {shapes}")
    bad = [(i, r[3], r[4]) for i, r in enumerate(rows) if r[3] != r[4]]
    if bad:
        raise ValueError(f"context parallel shards self-attention: each rank's q and k/v hold the same positions "
                         f"(local Sq == Sk); got (rank, Sq, Sk) {bad}")
    if s.d != s.dv and strategy != "lasp2":
        raise ValueError(f"context parallel runs softmax variants with Dv == D; got D={s.d}, Dv={s.dv}")
    return [r[3] for r in rows]
