"""The communication plan of a sharded call, computed without a process group: which ranks exchange
key/value shards, in which ring step, how many bytes each rank receives (and over the links between
hosts), against a plain ring that rotates every shard through every rank, allgather and Ulysses.

    from attnzoo.distributed import communication_plan
    plan = communication_plan(az.get("sliding_window", window=4096), seq_len=2**20, world=8, causal=True,
                              heads=16, kv_heads=16, head_dim=128, dtype=torch.bfloat16)
    plan["ratio_vs_ring"]   # bytes received by the busiest rank, structure-aware / plain ring
"""
from __future__ import annotations

import torch

from .layout import segments
from .problem import Problem
from .view import global_call


def _work(problem: Problem, r: int, j: int) -> float:
    """Allowed (query, key) pairs of rank r's queries against rank j's keys, per batch row and head (sum
    of the clipped key intervals: exact for one interval per row, an upper bound for unions)."""
    if problem.intervals is None:
        return float("nan")
    total = 0.0
    for qa, n in problem.segs[r]:
        for ka, m in problem.segs[j]:
            for lo, hi in problem.intervals:
                lo_, hi_ = lo[..., qa:qa + n].clamp(ka, ka + m), hi[..., qa:qa + n].clamp(ka, ka + m)
                total += float((hi_ - lo_).clamp(min=0).double().mean(dim=(0, 1)).sum())
    return total


def _crossings(owner: int, users: list[int], world: int, host) -> int:
    """Host boundaries a shard crosses relayed from `owner` forward to its farthest user."""
    far = max(((u - owner) % world for u in users), default=0)
    return sum(host((owner + h - 1) % world) != host((owner + h) % world) for h in range(1, far + 1))


def communication_plan(variant, *, seq_len: int, world: int, causal: bool = False, batch: int = 1, heads: int = 16,
                       kv_heads: int | None = None, head_dim: int = 128, dtype: torch.dtype = torch.bfloat16,
                       layout: str = "contiguous", ranks_per_host: int | None = None, lengths: list[int] | None = None,
                       **inputs) -> dict:
    """The structure-aware ring's schedule and bytes for `variant` with `seq_len` tokens over `world` ranks.

    Per rank: bytes received in the forward (the key/value ranges of other ranks its queries reach) and
    backward (the same again, plus partial dk/dv in float32 of its own keys from every rank that used them); the same for a plain ring (every shard to every
    rank), allgather and Ulysses; with `ranks_per_host`, the bytes crossing host boundaries. Inputs the
    mask reads (document_ids, ...) are the global tensors. Nothing is run: the plan is read from the
    variant's key intervals (or its mask, evaluated in row blocks)."""
    kv_heads = kv_heads or heads
    if lengths is None:
        base, extra = divmod(seq_len, world)
        lengths = [base + (r < extra) for r in range(world)]
    if sum(lengths) != seq_len or len(lengths) != world:
        raise ValueError(f"lengths must be {world} numbers summing to seq_len={seq_len}, got {lengths}")
    segs = segments(lengths, layout)
    stub_q = torch.empty(batch, heads, 1, head_dim, dtype=dtype)
    stub_k = torch.empty(batch, kv_heads, 1, head_dim, dtype=dtype)
    gcall = global_call(variant, stub_q, stub_k, stub_k, causal, head_dim ** -0.5, seq_len, inputs)
    problem = Problem(variant, gcall, segs, kernel=None)
    needs = problem.needs()
    elem = torch.empty(0, dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    kv_token = batch * kv_heads * 2 * head_dim * elem  # k and v of one position
    grad_token = batch * kv_heads * 2 * head_dim * acc

    def tokens(r: int, j: int) -> int:  # positions of rank j's keys that rank r receives
        return sum(n for _, n in problem.recv_segments(r, j))

    host = (lambda r: r // ranks_per_host) if ranks_per_host else (lambda r: 0)
    ranks = []
    for r in range(world):
        srcs = [j for j in range(world) if j != r and needs[r][j]]
        users = [j for j in range(world) if j != r and needs[j][r]]
        others = [j for j in range(world) if j != r]
        fwd = sum(tokens(r, j) for j in srcs) * kv_token
        bwd = fwd + sum(tokens(u, r) for u in users) * grad_token
        ring_fwd = sum(lengths[j] for j in others) * kv_token
        ring_bwd = ring_fwd + lengths[r] * len(others) * grad_token
        q_bytes = batch * heads * lengths[r] * head_dim * elem
        ranks.append({
            "rank": r, "segments": segs[r], "receives_from": srcs, "sends_to": users,
            "receives_positions": {j: problem.recv_segments(r, j) for j in srcs},
            "fwd_bytes": fwd, "fwd_bwd_bytes": fwd + bwd,
            "plain_ring_fwd_bytes": ring_fwd, "plain_ring_fwd_bwd_bytes": ring_fwd + ring_bwd,
            "allgather_fwd_bytes": ring_fwd, "allgather_fwd_bwd_bytes": ring_fwd + lengths[r] * grad_token * (world - 1),
            # q, k, v in and the output back, (P-1)/P of each crosses the network; backward the same again
            "ulysses_fwd_bytes": (2 * q_bytes + lengths[r] * kv_token) * (world - 1) // world,
            "ulysses_fwd_bwd_bytes": 2 * (2 * q_bytes + lengths[r] * kv_token) * (world - 1) // world,
            "inter_host_fwd_bytes": sum(tokens(r, j) for j in srcs if host(j) != host(r)) * kv_token,
            # a plain ring relays every shard hop by hop: the rank after a host boundary receives all P-1
            "plain_ring_inter_host_fwd_bytes": ring_fwd if host((r - 1) % world) != host(r) else 0,
            # relayed instead (rank r's keys hop by hop up to the farthest rank that needs them, as a ring
            # does, carrying the most any of them needs, so they cross each host boundary at most once): the
            # design for several hosts, simulated here
            "relay_inter_host_fwd_bytes": max((tokens(u, r) for u in users), default=0) * kv_token
            * _crossings(r, users, world, host),
            "work": sum(_work(problem, r, j) for j in range(world)),
        })
    steps = []
    for t in range(world):
        steps.append([(r - t) % world for r in range(world) if needs[r][(r - t) % world]] if t else
                     [r for r in range(world) if needs[r][r]])
    busiest = max(x["fwd_bytes"] for x in ranks)
    busiest_ring = max(x["plain_ring_fwd_bytes"] for x in ranks)
    works = [x["work"] for x in ranks]
    return {
        "variant": variant.name, "seq_len": seq_len, "world": world, "causal": causal, "layout": layout,
        "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype),
        "ranks_per_host": ranks_per_host, "needs": needs, "ranks": ranks,
        # steps[t]: for each rank that computes in ring step t, the rank whose shard it uses
        "steps": steps,
        "max_fwd_bytes": busiest, "max_plain_ring_fwd_bytes": busiest_ring,
        "ratio_vs_ring": busiest / busiest_ring if busiest_ring else float("nan"),
        "inter_host_fwd_bytes": sum(x["inter_host_fwd_bytes"] for x in ranks),
        "plain_ring_inter_host_fwd_bytes": sum(x["plain_ring_inter_host_fwd_bytes"] for x in ranks),
        "relay_inter_host_fwd_bytes": sum(x["relay_inter_host_fwd_bytes"] for x in ranks),
        "work_imbalance": max(works) / (sum(works) / len(works)) if works and sum(works) else float("nan"),
    }
