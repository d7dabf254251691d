"""The strategies, each forward and backward:

`ring`: every rank keeps its queries; keys/values move point to point (isend/irecv), the next step's
transfer in flight while the current tile computes, partial outputs merged by log-sum-exp ("Ring
Attention with Blockwise Transformers for Near-Infinite Context"). Structure-aware: at step t rank r
sends to r + t and receives from r - t only the key range the receiver's queries can reach
(`Problem.recv_segments`, from the mask's key intervals), so a sliding window of w receives the last w
keys of its neighbour, whatever the shard length, and documents skip ranks holding other documents.
Backward sends the same keys again and each range's partial key/value gradients back to its owner.

`allgather`: every rank gathers all keys/values (llama3's context parallelism), computes its queries
in one pass; backward sums the key/value gradients onto their owners (reduce-scatter on NCCL).

`ulysses`: all-to-all from sequence shards to head shards, full-sequence attention on Hq/P heads,
all-to-all back (DeepSpeed-Ulysses); needs Hq and Hkv divisible by the world size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .kernels import acc_dtype
from .layout import reorder
from .problem import Problem, finite_or_zero, merge

STRATEGIES = ("ring", "allgather", "ulysses")


@dataclass
class Traffic:
    """Bytes this rank sent and received, accumulated over calls (forward and backward)."""

    sent: int = 0
    received: int = 0
    by_phase: dict = field(default_factory=dict)

    def add(self, phase: str, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received
        s, r = self.by_phase.get(phase, (0, 0))
        self.by_phase[phase] = (s + sent, r + received)

    def as_dict(self) -> dict:
        return {"sent": self.sent, "received": self.received,
                "by_phase": {k: {"sent": s, "received": r} for k, (s, r) in self.by_phase.items()}}


@dataclass
class Run:
    problem: Problem
    group: object
    rank: int
    traffic: Traffic

    @property
    def world(self) -> int:
        return self.problem.world

    def peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _p2p(run: Run, phase: str, sends, recvs) -> list:
    """Post sends [(tensor, rank, tag)] and receives [(buffer, rank, tag)] at once; their handles."""
    ops = [dist.P2POp(dist.isend, t, run.peer(r), run.group, tag) for t, r, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, run.peer(r), run.group, tag) for t, r, tag in recvs]
    run.traffic.add(phase, _nbytes(*(t for t, _, _ in sends)), _nbytes(*(t for t, _, _ in recvs)))
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(works) -> None:
    for w in works:
        w.wait()


# ---- ring ----------------------------------------------------------------------------------------


def _take(x, pieces):
    """The pieces [(local offset, length)] of x along the sequence, as one contiguous tensor."""
    parts = [x[:, :, o:o + n] for o, n in pieces]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=2)


def _post_kv(run: Run, step: int, k, v, phase: str):
    """Step `step`'s transfers: to r + step the keys of mine its queries reach; from r - step the keys
    of its that mine reach. Returns (handles, received (k, v) or None, the tensors being sent)."""
    p, r, world = run.problem, run.rank, run.world
    src, dst = (r - step) % world, (r + step) % world
    needs = p.needs()
    sends = []
    if needs[dst][r]:
        pieces = p.pieces(dst, r)
        sends = [(_take(k, pieces), dst, 4 * step), (_take(v, pieces), dst, 4 * step + 1)]
    bufs = None
    if needs[r][src]:
        m = sum(n for _, n in p.recv_segments(r, src))
        bufs = (k.new_empty(*k.shape[:2], m, k.shape[3]), v.new_empty(*v.shape[:2], m, v.shape[3]))
    recvs = [(bufs[0], src, 4 * step), (bufs[1], src, 4 * step + 1)] if bufs else []
    return _p2p(run, phase, sends, recvs), bufs, sends


def _ring_steps(run: Run, k, v, phase: str):
    """Yield (src rank, its k, its v) for every rank whose keys this rank needs, its own first, the next
    transfer in flight while the caller computes on the current one."""
    world = run.world
    pending = _post_kv(run, 1, k, v, phase) if world > 1 else None
    if run.problem.needs()[run.rank][run.rank]:
        yield run.rank, k, v
    for step in range(1, world):
        works, bufs, _sent = pending  # the sent tensors stay referenced until their transfer is done
        _wait(works)
        pending = _post_kv(run, step + 1, k, v, phase) if step + 1 < world else None
        if bufs is not None:
            yield (run.rank - step) % world, bufs[0], bufs[1]


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, run: Run):
        k, v = k.contiguous(), v.contiguous()
        p, dt = run.problem, acc_dtype(q.dtype)
        out = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=dt)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=dt)
        for src, kk, vv in _ring_steps(run, k, v, "ring forward: k/v"):
            for qo, n, ko, m, tile in p.pair_tiles(run.rank, src):
                o, l_ = p.kernel.forward(q[:, :, qo:qo + n], kk[:, :, ko:ko + m], vv[:, :, ko:ko + m], tile)
                merge(out[:, :, qo:qo + n], lse[:, :, qo:qo + n], o, l_)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.run = run
        return out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        run = ctx.run
        p, r, world, dt = run.problem, run.rank, run.world, acc_dtype(q.dtype)
        lse = finite_or_zero(lse)
        dq = torch.zeros(q.shape, dtype=dt, device=q.device)
        dk = torch.zeros(k.shape, dtype=dt, device=q.device)
        dv = torch.zeros(v.shape, dtype=dt, device=q.device)
        needs = p.needs()
        sends, recvs, partials = [], [], []
        for src, kk, vv in _ring_steps(run, k, v, "ring backward: k/v"):
            gk = dk if src == r else torch.zeros(kk.shape, dtype=dt, device=q.device)
            gv = dv if src == r else torch.zeros(vv.shape, dtype=dt, device=q.device)
            for qo, n, ko, m, tile in p.pair_tiles(r, src):
                rows = slice(qo, qo + n)
                a, b, c = p.kernel.backward(dout[:, :, rows], q[:, :, rows], kk[:, :, ko:ko + m], vv[:, :, ko:ko + m],
                                            out[:, :, rows], lse[:, :, rows], tile)
                dq[:, :, rows] += a
                gk[:, :, ko:ko + m] += b
                gv[:, :, ko:ko + m] += c
            if src != r:  # the keys' partial gradients go back to their owner
                step = (r - src) % world
                sends += [(gk, src, 4 * step + 2), (gv, src, 4 * step + 3)]
        for step in range(1, world):  # partial gradients of my keys from the ranks that used them
            dst = (r + step) % world
            if needs[dst][r]:
                m = sum(n for _, n in p.recv_segments(dst, r))
                bufs = (dk.new_empty(*dk.shape[:2], m, dk.shape[3]), dv.new_empty(*dv.shape[:2], m, dv.shape[3]))
                recvs += [(bufs[0], dst, 4 * step + 2), (bufs[1], dst, 4 * step + 3)]
                partials.append((p.pieces(dst, r), bufs))
        # One batch for every send and receive: NCCL runs a send-only batch to completion before the
        # next batch on its stream, and a message too large for its buffers completes only once the
        # peer's receive is posted, so two ranks each posting sends first would wait on each other
        # forever (seen at 64k tokens on two H200s; small messages at 8k passed).
        _wait(_p2p(run, "ring backward: dk/dv", sends, recvs))
        for pieces, (a, b) in partials:
            at = 0
            for o, n in pieces:
                dk[:, :, o:o + n] += a[:, :, at:at + n]
                dv[:, :, o:o + n] += b[:, :, at:at + n]
                at += n
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring(q, k, v, run: Run):
    return _Ring.apply(q, k, v, run)


# ---- local tiles (allgather and ulysses compute) -------------------------------------------------


class _Tiles(torch.autograd.Function):
    """Queries (segments qs, local order) against keys (segments ks) on this rank, no communication."""

    @staticmethod
    def forward(ctx, q, k, v, problem: Problem, qs, ks):
        dt = acc_dtype(q.dtype)
        out = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=dt)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=dt)
        for qo, n, ko, m, tile in problem.tiles(qs, ks):
            o, l_ = problem.kernel.forward(q[:, :, qo:qo + n], k[:, :, ko:ko + m], v[:, :, ko:ko + m], tile)
            merge(out[:, :, qo:qo + n], lse[:, :, qo:qo + n], o, l_)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (problem, qs, ks)
        return out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        problem, qs, ks = ctx.args
        dt = acc_dtype(q.dtype)
        lse = finite_or_zero(lse)
        dq, dk, dv = (torch.zeros(x.shape, dtype=dt, device=x.device) for x in (q, k, v))
        for qo, n, ko, m, tile in problem.tiles(qs, ks):
            rows, keys = slice(qo, qo + n), slice(ko, ko + m)
            a, b, c = problem.kernel.backward(dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys],
                                              out[:, :, rows], lse[:, :, rows], tile)
            dq[:, :, rows] += a
            dk[:, :, keys] += b
            dv[:, :, keys] += c
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# ---- allgather -----------------------------------------------------------------------------------


class _GatherSeq(torch.autograd.Function):
    """Every rank's shard (B, H, s_r, D) -> the global sequence (B, H, S, D); backward sums the gradient
    over ranks onto each shard's owner."""

    @staticmethod
    def forward(ctx, x, run: Run, phase: str):
        segs = run.problem.segs
        lengths = [sum(n for _, n in rs) for rs in segs]
        longest = max(lengths)
        xp = torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[2])).contiguous()
        pieces = [torch.empty_like(xp) for _ in segs]
        dist.all_gather(pieces, xp, group=run.group)
        run.traffic.add(phase, _nbytes(xp) * (run.world - 1), _nbytes(xp) * (run.world - 1))
        ctx.args = (run, phase, lengths)
        return reorder([pc[:, :, :n] for pc, n in zip(pieces, lengths)], segs, dim=2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        run, phase, lengths = ctx.args
        segs, longest = run.problem.segs, max(lengths)
        per_rank = torch.stack([torch.nn.functional.pad(torch.cat([grad[:, :, a:a + n] for a, n in rs], dim=2),
                                                        (0, 0, 0, longest - ln)) for rs, ln in zip(segs, lengths)])
        if dist.get_backend(run.group) in ("nccl", "xccl"):
            mine = per_rank.new_empty(per_rank.shape[1:])
            dist.reduce_scatter_tensor(mine, per_rank.contiguous(), group=run.group)
            run.traffic.add(phase + " (grad)", _nbytes(mine) * (run.world - 1), _nbytes(mine) * (run.world - 1))
        else:  # gloo has no reduce-scatter
            dist.all_reduce(per_rank, group=run.group)
            mine = per_rank[run.rank]
            run.traffic.add(phase + " (grad)", _nbytes(per_rank), _nbytes(per_rank))
        return mine[:, :, :lengths[run.rank]], None, None


def allgather(q, k, v, run: Run):
    p = run.problem
    kg = _GatherSeq.apply(k, run, "allgather: k")
    vg = _GatherSeq.apply(v, run, "allgather: v")
    return _Tiles.apply(q, kg, vg, p, tuple(p.segs[run.rank]), ((0, p.gcall.shapes.sk),))


# ---- ulysses -------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """A flat all_to_all_single (send_splits to each rank, recv_splits from each); backward swaps them."""

    @staticmethod
    def forward(ctx, flat, send_splits, recv_splits, run: Run, phase: str):
        out = flat.new_empty(sum(recv_splits))
        dist.all_to_all_single(out, flat.contiguous(), recv_splits, send_splits, group=run.group)
        size = flat.element_size()
        r = run.rank
        run.traffic.add(phase, (sum(send_splits) - send_splits[r]) * size, (sum(recv_splits) - recv_splits[r]) * size)
        ctx.args = (send_splits, recv_splits, run, phase)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        send_splits, recv_splits, run, phase = ctx.args
        return _AllToAll.apply(grad, recv_splits, send_splits, run, phase + " (grad)"), None, None, None, None


def _seq_to_heads(x, run: Run, phase: str):
    """(B, H, s_r, D) sequence shard -> (B, H/P, S, D) head shard over the global sequence."""
    world, segs = run.world, run.problem.segs
    b, h, s, d = x.shape
    hp = h // world
    lengths = [sum(n for _, n in rs) for rs in segs]
    flat = x.reshape(b, world, hp, s, d).transpose(0, 1).reshape(-1)
    got = _AllToAll.apply(flat, [b * hp * s * d] * world, [b * hp * n * d for n in lengths], run, phase)
    pieces = [c.view(b, hp, n, d) for c, n in zip(got.split([b * hp * n * d for n in lengths]), lengths)]
    return reorder(pieces, segs, dim=2)


def _heads_to_seq(y, run: Run, phase: str):
    """(B, H/P, S, D) -> (B, H, s_r, D): the inverse of `_seq_to_heads`."""
    world, segs = run.world, run.problem.segs
    b, hp, _, d = y.shape
    lengths = [sum(n for _, n in rs) for rs in segs]
    flat = torch.cat([torch.cat([y[:, :, a:a + n] for a, n in rs], dim=2).reshape(-1) for rs in segs])
    s = lengths[run.rank]
    got = _AllToAll.apply(flat, [b * hp * n * d for n in lengths], [b * hp * s * d] * world, run, phase)
    return got.view(world, b, hp, s, d).transpose(0, 1).reshape(b, world * hp, s, d)


def ulysses(q, k, v, run: Run):
    p = run.problem
    total = ((0, p.gcall.shapes.sk),)
    qh, kh, vh = (_seq_to_heads(x, run, f"ulysses: {name}") for x, name in ((q, "q"), (k, "k"), (v, "v")))
    return _heads_to_seq(_Tiles.apply(qh, kh, vh, p, total, total), run, "ulysses: out")


RUNNERS = {"ring": ring, "allgather": allgather, "ulysses": ulysses}
