"""Flow-Attention (Flowformer): attention as a flow network from sources (keys, values) to sinks (queries),
with flow conservation giving competition among sources and allocation to sinks.

phi = sigmoid (positive capacities); P_ij = phi(q_i) . phi(k_j) is the flow from source j to sink i.

Non-causal (the paper's Flow-Attention; L sinks, S sources):

    incoming  I_i = sum_j P_ij,                 outgoing  O_j = sum_i P_ij,
    conserved I^_i = sum_j P_ij / O_j,          conserved O^_j = clip(sum_i P_ij / I_i, -1, 1),
    allocation A_i = sigmoid(I^_i L / S),       competition C_j = S softmax_j(O^_j),
    o_i = A_i sum_j (P_ij / I_i) C_j v_j.

Causal (the authors' causal version): at position t (1-based) sums run over the past only and the
flows are averaged by the number of elements summed,

    I_i = i / sum_{j<=i} P_ij,   O_j = j / sum_{i<=j} P_ij,
    I^_i = sum_{j<=i} P_ij O_j / i,   O^_j = clip(sum_{i<=j} P_ij I_i / j, -1, 1),
    A_i = sigmoid(I^_i),   C_j = j exp(O^_j) / sum_{l<=j} exp(O^_l),
    o_i = A_i sum_{j<=i} P_ij C_j v_j / sum_{j<=i} P_ij,

so the state holds sum phi(k) ⊗ C v, sum phi(k), sum phi(q), sum phi(k) O, sum phi(q) I, sum exp(O^)
and the position. The clip of O^ to [-1, 1] is the authors' ("for stability"); their 1e-6 added to
every sum is not needed here (phi > 0 makes every flow positive) and is left out.

Grouped queries (GQA, an extension: the paper has one query head per key head): the G query heads of
a group are G sinks per position of one flow network over their shared sources, so sums over sinks
run over the group too and the causal averages count G t sinks (G L sinks non-causally). G = 1 is
the paper. With Sq < Sk (causal) the first Sk - Sq positions have no query: they are sources only.
`scale` (default 1) multiplies q before phi.
"""
from __future__ import annotations

import torch

from ...core.info import Paper, positive_int
from ...core.recurrent import group_queries, ungroup
from ...core.registry import register
from ._decay import decay_chunk, safe_divide
from ._feature import BothDirections, causal_mask

EXTRA = 4   # state columns after the Dv of the flow: sum phi(k), sum phi(q), sum phi(k) O, sum phi(q) I


def split_state(state: torch.Tensor, dv: int):
    """(B, Hkv, D + 1, Dv + 4) -> kv (B, Hkv, D, Dv), ksum, qsum, ko, qi (B, Hkv, D), esum, seen (B, Hkv)."""
    seen = state[:, :, -1, 1]
    if not torch.isfinite(state).all() or bool((seen < 0).any()):
        raise ValueError("flowformer: the state (B, Hkv, D + 1, Dv + 4) must be finite, its position "
                         "state[:, :, D, 1] >= 0 (zeros = a fresh state)")
    body = state[:, :, :-1]
    return (body[..., :dv], body[..., dv], body[..., dv + 1], body[..., dv + 2], body[..., dv + 3],
            state[:, :, -1, 0], seen)


def join_state(kv, ksum, qsum, ko, qi, esum, seen) -> torch.Tensor:
    body = torch.cat([kv, ksum[..., None], qsum[..., None], ko[..., None], qi[..., None]], dim=-1)
    last = torch.zeros_like(body[:, :, :1])
    last[:, :, 0, 0], last[:, :, 0, 1] = esum, seen
    return torch.cat([body, last], dim=2)


def capacities(q, k, call, acc):
    """phi(scale q) grouped (B, Hkv, G, S, D) with the rows of absent queries zero, phi(k) (B, Hkv, S, D)."""
    fq = torch.sigmoid(q.to(acc) * call.scale)
    if call.causal and call.shapes.sq < call.shapes.sk:
        fq[:, :, :call.shapes.sk - call.shapes.sq] = 0     # a causal cross call: these positions have no query
    return group_queries(fq, k.shape[1]), torch.sigmoid(k.to(acc))


def flow_parallel(q, k, v, call, state):
    """The causal definition over the dense flow matrix P (B, Hkv, G, S, S); (o (B, Hq, S, Dv), final state)."""
    acc, dv = state.dtype, v.shape[-1]
    kv0, k0, q0, ko0, qi0, e0, n0 = split_state(state, dv)
    fq, fk = capacities(q, k, call, acc)
    v = v.to(acc)
    g, s = fq.shape[2], fk.shape[2]
    t = n0[..., None] + torch.arange(1, s + 1, dtype=acc, device=q.device)               # (B, Hkv, S) positions
    sink_past = causal_mask(s, s, q.device)                        # [i, j]: source j <= sink i
    flow = fq @ fk.unsqueeze(2).transpose(-1, -2)                  # P (B, Hkv, G, i, j)
    p_in, p_out = flow * sink_past, flow * sink_past.T             # sums over j <= i / over i <= j
    incoming = p_in.sum(-1) + (fq * k0[:, :, None, None]).sum(-1)                         # (B, Hkv, G, S)
    outgoing = p_out.sum((2, 3)) + (fk * q0[:, :, None]).sum(-1)                          # (B, Hkv, S)
    inc_norm = safe_divide(t[:, :, None], incoming)                # I_i
    out_norm = safe_divide(g * t, outgoing)                                                # O_j
    c_sink = ((p_in * out_norm[:, :, None, None]).sum(-1) + (fq * ko0[:, :, None, None]).sum(-1)) / t[:, :, None]
    c_source = ((p_out * inc_norm[..., None]).sum((2, 3)) + (fk * qi0[:, :, None]).sum(-1)) / (g * t)
    e = c_source.clamp(-1, 1).exp()
    esum = e0[..., None] + e.cumsum(-1)
    comp = e / esum * t
    num = p_in @ (comp[..., None] * v).unsqueeze(2) + fq @ kv0.unsqueeze(2)
    o = torch.sigmoid(c_sink)[..., None] * safe_divide(num, incoming[..., None])
    final = join_state(kv0 + fk.transpose(-1, -2) @ (comp[..., None] * v), k0 + fk.sum(2), q0 + fq.sum((2, 3)),
                       ko0 + (fk * out_norm[..., None]).sum(2), qi0 + (fq * inc_norm[..., None]).sum((2, 3)),
                       esum[..., -1], n0 + s)
    return ungroup(o), final


def flow_chunk(q, k, v, call, state, chunk_size: int):
    """The causal form linear in S: prefix sums of vectors for the flows, the shared chunked engine for the
    values; same arguments and results as `flow_parallel`."""
    acc, dv = state.dtype, v.shape[-1]
    kv0, k0, q0, ko0, qi0, e0, n0 = split_state(state, dv)
    fq, fk = capacities(q, k, call, acc)
    g, s = fq.shape[2], fk.shape[2]
    t = n0[..., None] + torch.arange(1, s + 1, dtype=acc, device=q.device)
    ksum = k0[:, :, None] + fk.cumsum(2)                                     # (B, Hkv, S, D)
    qsum = q0[:, :, None] + fq.sum(2).cumsum(2)
    incoming = (fq * ksum.unsqueeze(2)).sum(-1)                              # (B, Hkv, G, S)
    outgoing = (fk * qsum).sum(-1)                                           # (B, Hkv, S)
    inc_norm, out_norm = safe_divide(t[:, :, None], incoming), safe_divide(g * t, outgoing)
    ko = ko0[:, :, None] + (fk * out_norm[..., None]).cumsum(2)
    qi = qi0[:, :, None] + (fq * inc_norm[..., None]).sum(2).cumsum(2)
    c_sink = (fq * ko.unsqueeze(2)).sum(-1) / t[:, :, None]
    c_source = (fk * qi).sum(-1) / (g * t)
    e = c_source.clamp(-1, 1).exp()
    esum = e0[..., None] + e.cumsum(-1)
    comp = e / esum * t
    num, kv = decay_chunk(ungroup(fq), fk, comp[..., None] * v.to(acc), None, 1.0, kv0, chunk_size)
    o = torch.sigmoid(c_sink)[..., None] * safe_divide(group_queries(num, k.shape[1]), incoming[..., None])
    return ungroup(o), join_state(kv, ksum[:, :, -1], qsum[:, :, -1], ko[:, :, -1], qi[:, :, -1], esum[..., -1], n0 + s)


def flow_step(q_t, k_t, v_t, scale: float, state, has_query: bool = True):
    """One token: q_t (B, Hq, D), k_t (B, Hkv, D), v_t (B, Hkv, Dv) -> (o_t (B, Hq, Dv), new state);
    `has_query=False`: a position that is a source only (a causal cross call's first keys)."""
    acc, dv = state.dtype, v_t.shape[-1]
    kv, ksum, qsum, ko, qi, esum, seen = split_state(state, dv)
    fq = group_queries(torch.sigmoid(q_t.to(acc) * scale) * has_query, k_t.shape[1])   # (B, Hkv, G, D)
    fk, v_t = torch.sigmoid(k_t.to(acc)), v_t.to(acc)
    g = fq.shape[2]
    t = seen + 1
    ksum, qsum = ksum + fk, qsum + fq.sum(2)
    incoming = (fq * ksum[:, :, None]).sum(-1)                               # (B, Hkv, G)
    inc_norm, out_norm = safe_divide(t[..., None], incoming), safe_divide(g * t, (fk * qsum).sum(-1))
    ko, qi = ko + fk * out_norm[..., None], qi + (fq * inc_norm[..., None]).sum(2)
    c_sink = (fq * ko[:, :, None]).sum(-1) / t[..., None]
    e = ((fk * qi).sum(-1) / (g * t)).clamp(-1, 1).exp()
    esum = esum + e
    kv = kv + fk[..., None] * (e / esum * t)[..., None, None] * v_t[:, :, None]
    o = torch.sigmoid(c_sink)[..., None] * safe_divide(fq @ kv, incoming[..., None])
    return ungroup(o), join_state(kv, ksum, qsum, ko, qi, esum, t)


def flow_noncausal(q, k, v, call, dense: bool):
    """The non-causal Flow-Attention: `dense` over the flow matrix P (the definition), else through sums
    over keys and queries (linear in L + S). -> o (B, Hq, L, Dv)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq, fk = capacities(q, k, call, acc)
    v = v.to(acc)
    g, sinks, sources = fq.shape[2], fq.shape[3], fk.shape[2]
    if dense:
        flow = fq @ fk.unsqueeze(2).transpose(-1, -2)                        # P (B, Hkv, G, L, S)
        incoming, outgoing = flow.sum(-1), flow.sum((2, 3))
        c_sink = (flow / outgoing[:, :, None, None]).sum(-1)
        c_source = (flow / incoming[..., None]).sum((2, 3))
    else:
        incoming = (fq * fk.sum(2)[:, :, None, None]).sum(-1)               # (B, Hkv, G, L)
        outgoing = (fk * fq.sum((2, 3))[:, :, None]).sum(-1)                 # (B, Hkv, S)
        c_sink = (fq * (fk / outgoing[..., None]).sum(2)[:, :, None, None]).sum(-1)
        c_source = (fk * (fq / incoming[..., None]).sum((2, 3))[:, :, None]).sum(-1)
    comp = c_source.clamp(-1, 1).softmax(-1) * sources
    alloc = torch.sigmoid(c_sink * (g * sinks / sources))
    values = comp[..., None] * v
    num = flow @ values.unsqueeze(2) if dense else fq @ (fk.transpose(-1, -2) @ values).unsqueeze(2)
    return ungroup(alloc[..., None] * num / incoming[..., None])


@register
class Flowformer(BothDirections):
    name = "flowformer"
    summary = ("Flow-Attention (Flowformer): phi = sigmoid capacities, flows P_ij = phi(q_i) . phi(k_j); incoming and "
               "outgoing flows normalise, conservation gives each source a competition weight (softmax of its "
               "conserved outgoing flow, clipped to [-1, 1]) and each sink an allocation (sigmoid of its conserved "
               "incoming flow): o_i = A_i sum_j P_ij C_j v_j / sum_j P_ij. Non-causal (the paper's) and causal (the "
               "authors' causal version: past-only sums averaged by the count). GQA: a group's query heads are "
               "sinks of one flow network. `scale` (default 1) multiplies q before phi. State "
               "(B, Hkv, D + 1, Dv + 4).")
    paper = Paper("Flowformer: Linearizing Transformers with Conservation Flows", 2022, "2202.06258")
    params = (positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"),)
    cost = "chunk: O(S C D + S D Dv) time, O(C^2 + S D + D Dv) memory per head; step: O(D Dv) per token"
    state_size = "Hkv x (D + 1) x (Dv + 4) per sequence, constant in S"
    state_doc = "(B, Hkv, D + 1, Dv + 4) (the flow state; see flowformer's docstring)"

    def prepare(self, q, k, v, causal, scale, inputs):
        return super().prepare(q, k, v, causal, 1.0 if scale is None else scale, inputs)

    def state_shape(self, batch, heads, dk, dv):
        return (batch, heads, dk + 1, dv + EXTRA)

    def parallel(self, q, k, v, call, state, inputs):
        return flow_parallel(q, k, v, call, state)

    def chunk(self, q, k, v, call, state, inputs):
        return flow_chunk(q, k, v, call, state, self.config["chunk_size"])

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        d = self.check_step(q_t, k_t, v_t, state, inputs)[2]
        return flow_step(q_t, k_t, v_t, self.step_scale(scale, d, 1.0), state)

    def _recurrent(self, q, k, v, call, state, inputs):
        absent = call.shapes.sk - call.shapes.sq       # a causal cross call's first positions (0 when packed)
        outs = []
        for t in range(k.shape[2]):
            o_t, state = flow_step(q[:, :, t], k[:, :, t], v[:, :, t], call.scale, state, has_query=t >= absent)
            outs.append(o_t)
        return torch.stack(outs, dim=2), state

    def noncausal(self, q, k, v, call, dense):
        return flow_noncausal(q, k, v, call, dense)
