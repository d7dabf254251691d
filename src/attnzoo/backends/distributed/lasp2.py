"""LASP-2 for the linear family ("LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its
Hybrid"): sequence parallelism by one all-gather of per-rank recurrent states.

The state of every linear variant here evolves as S_t = a_t * S_{t-1} + (update from token t) with an
elementwise decay a_t, so a rank's final state is affine in its initial state: final(S0) = A * S0 +
final(0), A the product of its decays. Each rank computes final(0) and A (= final(1) - final(0), no
variant-specific code), all-gathers both (a differentiable all_gather: gradients reach the rank that
produced them), combines the prefix I_r = A_{r-1} * I_{r-1} + final_{r-1}(0), and reruns its shard from
I_r. The outputs equal one device's, forward and backward.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist


class _GatherStates(torch.autograd.Function):
    """Every rank's tensor stacked (P, ...); backward sums the gradient over ranks onto its owner."""

    @staticmethod
    def forward(ctx, x, group):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        ctx.group = group
        return torch.stack(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def lasp2_why_not(variant) -> str | None:
    """Why LASP-2 cannot shard this recurrent variant: its final state must be affine in the initial one
    with an elementwise factor (`affine_state`); otherwise the combined states would be silently wrong."""
    if not getattr(variant, "affine_state", False):
        return (f"{variant.name}: its state is not an elementwise-affine function of the initial state "
                "(affine_state=False), so LASP-2's combination of per-rank states would be wrong; run it on one device")
    return None


def lasp2(variant, q, k, v, call, group, rank: int, traffic=None):
    opts = dict(getattr(call, "options", None) or {"mode": variant.default_mode})
    if opts.get("cu_seqlens") is not None:
        raise ValueError(f"{variant.name}: context parallel (LASP-2) does not take cu_seqlens; shard one packed "
                         "sequence per batch row, or run packed sequences on one device")
    s = call.shapes
    init = opts.get("initial_state")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shape = variant.state_shape(s.batch, s.kv_heads, s.d, s.dv)

    def run(state, final_only: bool):
        c = copy.copy(call)
        c.options = {**opts, "initial_state": state, "output_final_state": True}
        o, st = variant.run_forms(q, k, v, c)
        return st if final_only else (o, st)

    zeros = torch.zeros(shape, dtype=dtype, device=q.device)
    final0 = run(zeros, True)
    decay = run(torch.ones_like(zeros), True) - final0
    finals = _GatherStates.apply(final0, group)
    decays = _GatherStates.apply(decay, group)
    if traffic is not None:
        n = (final0.numel() * final0.element_size()) * 2 * (len(finals) - 1)
        traffic.add("lasp2: states", n, n)
    state = zeros if init is None else variant._check_state(init, s.batch, s, q)
    for j in range(rank):
        state = decays[j] * state + finals[j]
    o, _ = run(state, False)
    if not opts.get("output_final_state"):
        return o
    last = state
    for j in range(rank, dist.get_world_size(group)):
        last = decays[j] * last + finals[j]
    return o, last
