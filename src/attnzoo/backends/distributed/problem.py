"""One sharded attention call as every rank sees it: the global call, each rank's segments, which keys
of rank j rank r's queries may attend (`recv_segments`, the structure-aware part: a rank receives only
the key ranges its queries can reach, nothing from ranks they cannot see), and the tiles of each pair."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...core.variant import Call, SoftmaxVariant
from .layout import Segments, local_offsets
from .view import global_intervals, key_hull, tile_needed


@dataclass
class Problem:
    base: SoftmaxVariant
    gcall: Call
    segs: Segments  # per rank, (global start, length) of each local segment
    kernel: object  # CpuKernel / FlashKernel
    heads: tuple[int, int] = (0, 0)  # (h_start, Hq) this rank's queries use (Ulysses: a slice of the heads)
    kv_heads: int = 0
    intervals: object = None
    _cache: dict = field(default_factory=dict)  # tiles and received ranges, per pair
    _needs: list | None = None

    def __post_init__(self) -> None:
        s = self.gcall.shapes
        if not self.heads[1]:
            self.heads = (0, s.q_heads)
        self.kv_heads = self.kv_heads or s.kv_heads
        self.intervals = global_intervals(self.base, self.gcall)

    @property
    def world(self) -> int:
        return len(self.segs)

    def pair_tiles(self, q_rank: int, k_rank: int) -> list:
        """The tiles of rank q_rank's queries against the keys it holds of rank k_rank (see `tiles`)."""
        ks = self.segs[k_rank] if q_rank == k_rank else self.recv_segments(q_rank, k_rank)
        return self.tiles(self.segs[q_rank], ks)

    def recv_segments(self, r: int, j: int) -> list[tuple[int, int]]:
        """Global (start, length) of the keys of rank j that rank r receives: per segment of j, the hull of
        the keys r's queries may attend ([] when they see none of j's keys)."""
        key = ("recv", r, j)
        if key not in self._cache:
            hulls = [key_hull(self.base, self.gcall, self.intervals, self.segs[r], ks, self.heads) for ks in self.segs[j]]
            self._cache[key] = [(a, b - a) for a, b in (h for h in hulls if h)]
        return self._cache[key]

    def pieces(self, r: int, j: int) -> list[tuple[int, int]]:
        """Where `recv_segments(r, j)` lie in rank j's local tensor: (local offset, length) each."""
        out = []
        for a, n in self.recv_segments(r, j):
            ka, ko = next((ka, ko) for (ka, m), ko in zip(self.segs[j], local_offsets(self.segs[j]))
                          if ka <= a < ka + m)
            out.append((ko + a - ka, n))
        return out

    def tiles(self, qs: list[tuple[int, int]], ks: list[tuple[int, int]]) -> list:
        """[(local q offset, n, local k offset, m, tile)] of the pairs of query segments `qs` and key
        segments `ks` (global (start, length), concatenated locally) with any allowed entry."""
        key = (tuple(qs), tuple(ks))
        if key not in self._cache:
            out = []
            for (qa, n), qo in zip(qs, local_offsets(qs)):
                for (ka, m), ko in zip(ks, local_offsets(ks)):
                    if tile_needed(self.base, self.gcall, self.intervals, (qa, n), (ka, m), self.heads):
                        tile = self.kernel.tile(self.base, self.gcall, self.intervals, qa, n, ka, m, self.heads[1],
                                                self.kv_heads, self.heads[0])
                        out.append((qo, n, ko, m, tile))
            self._cache[key] = out
        return self._cache[key]

    def needs(self) -> list[list[bool]]:
        """needs[r][j]: rank r's queries attend some key of rank j (the same table on every rank)."""
        if self._needs is None:
            self._needs = [[bool(self.recv_segments(r, j)) if r != j else
                            any(tile_needed(self.base, self.gcall, self.intervals, qs, ks, self.heads)
                                for qs in self.segs[r] for ks in self.segs[r]) for j in range(self.world)]
                           for r in range(self.world)]
        return self._needs


def merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l_: torch.Tensor) -> None:
    """Fold a tile's (o, l_) into the running (out, lse) of the same rows, in place (log-sum-exp merge;
    rows with -inf on both sides stay zero / -inf)."""
    new = torch.logaddexp(lse, l_)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(o * torch.exp(l_ - safe).unsqueeze(-1))
    lse.copy_(new)


def finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    """The merged lse the backward kernels take: 0 on rows that saw no key (their output is 0)."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
