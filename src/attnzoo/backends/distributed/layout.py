"""Which global positions each rank holds: `contiguous` (rank r holds one run, lengths may differ per
rank) or `zigzag` (head-tail load balancing for causal masks: the sequence is cut into 2P equal chunks
and rank r holds chunks r and 2P-1-r, so every rank has as many early as late queries).

A layout is a list per rank of segments (global start, length); the local tensor of a rank is its
segments concatenated in that order. `shard` / `unshard` move between a global tensor and the pieces.
"""
from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")

Segments = list[list[tuple[int, int]]]  # per rank: [(global start, length), ...]


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def segments(lengths: list[int], layout: str) -> Segments:
    """The segments of every rank, given every rank's local sequence length (in rank order)."""
    check_layout(layout)
    if layout == "contiguous":
        out, start = [], 0
        for n in lengths:
            out.append([(start, n)])
            start += n
        return out
    world = len(lengths)
    if len(set(lengths)) != 1 or lengths[0] % 2:
        raise ValueError(f"layout='zigzag' needs the same even local length on every rank (two equal chunks "
                         f"each, total divisible by 2 x world = {2 * world}); got local lengths {lengths} "
                         f"(total {sum(lengths)})")
    c = lengths[0] // 2
    return [[(r * c, c), ((2 * world - 1 - r) * c, c)] for r in range(world)]


def local_offsets(segs: list[tuple[int, int]]) -> list[int]:
    """Offset of each segment inside the rank's local tensor."""
    out, at = [], 0
    for _, n in segs:
        out.append(at)
        at += n
    return out


def _world_rank(group, world, rank) -> tuple[int, int]:
    if world is not None and rank is not None:
        return world, rank
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


def shard(x: torch.Tensor, group=None, *, dim: int = 2, layout: str = "contiguous", world: int | None = None,
          rank: int | None = None) -> torch.Tensor:
    """This rank's piece of a global tensor along `dim` (the sequence dim; 2 in SDPA layout). Contiguous
    pieces follow torch.tensor_split (lengths may differ by one); zigzag needs S divisible by 2 x world.
    `world` / `rank` given: no process group is needed."""
    world, rank = _world_rank(group, world, rank)
    s = x.shape[dim]
    if check_layout(layout) == "contiguous":
        if s < world:
            raise ValueError(f"shard: sequence length {s} (dim {dim}) is shorter than the world size {world}")
        return torch.tensor_split(x, world, dim=dim)[rank]
    if s % (2 * world):
        raise ValueError(f"shard: layout='zigzag' needs the sequence length ({s}, dim {dim}) divisible by "
                         f"2 x world = {2 * world}")
    chunks = torch.chunk(x, 2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def reorder(pieces: list[torch.Tensor], segs: Segments, dim: int) -> torch.Tensor:
    """The global tensor from every rank's local piece (rank order), segments put at their positions."""
    parts = []
    for piece, rank_segs in zip(pieces, segs):
        parts += [(start, piece.narrow(dim, off, n)) for (start, n), off in zip(rank_segs, local_offsets(rank_segs))]
    return torch.cat([p for _, p in sorted(parts, key=lambda sp: sp[0])], dim=dim)


def unshard(x: torch.Tensor, group=None, *, dim: int = 2, layout: str = "contiguous") -> torch.Tensor:
    """The global tensor from every rank's piece (a collective: every rank calls it). Not differentiable."""
    from .comm import gather_lengths, gather_padded

    lengths = gather_lengths(x.shape[dim], group)
    pieces = gather_padded(x, lengths, dim, group)
    return reorder(pieces, segments(lengths, layout), dim)
