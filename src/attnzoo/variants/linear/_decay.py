"""The chunked engine shared by the linear family: linear attention whose state decays by a log gate.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

`g` is one of
- None: no decay (plain linear attention, Katharopoulos et al.; Cottention; Based);
- (B or 1, Hkv, S): one log decay per token and head (a scalar gate: RetNet, Lightning, Mamba-2 style);
- (B or 1, Hkv, S, Dk): one per key dimension (GLA).
All log decays are <= 0. q/k are whatever the variant feeds the state (raw, L2-normalised, feature
maps); `v` may carry an extra column of ones, so the state's last column is the normaliser
z_t = sum_j a_j phi(k_j) and `normalise` divides by it (the normaliser path).

`decay_chunk` carries the state from chunk to chunk; inside a chunk of C tokens the outputs come from
a C x C decayed score tile (Lightning Attention-2's intra-block + inter-block split, GLA's chunk
form). Work O(S C Dk + S Dk Dv), memory O(C^2 (Dk)) per head: no S x S tensor. Every exponent is a
difference of cumulative log gates inside one chunk, so it is <= 0 and nothing overflows.
"""
from __future__ import annotations

import torch

from ...core.recurrent import group_queries, ungroup


def decay_chunk(q, k, v, g, scale: float, state: torch.Tensor, chunk_size: int):
    """q (B, Hq, S, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv), g None | (B|1, Hkv, S) | (B|1, Hkv, S, Dk),
    state (B, Hkv, Dk, Dv) -> (o (B, Hq, S, Dv), final state), both in the state's dtype."""
    acc = state.dtype
    hkv, s = k.shape[1], k.shape[2]
    per_dim = g is not None and g.dim() == 4
    qg = group_queries(q, hkv)                                   # (B, Hkv, G, S, Dk)
    outs = []
    for a in range(0, s, chunk_size):
        b = min(a + chunk_size, s)
        n = b - a
        qc, kc, vc = qg[:, :, :, a:b].to(acc), k[:, :, a:b].to(acc), v[:, :, a:b].to(acc)
        later = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        if g is None:
            # Inter-block (earlier chunks, through the state) + intra-block (causal tile).
            o = qc @ state.unsqueeze(2)
            tile = (qc @ kc.unsqueeze(2).transpose(-1, -2)).masked_fill(later, 0)
            state = state + kc.transpose(-1, -2) @ vc
        elif per_dim:
            cum = g[:, :, a:b].to(acc).cumsum(2)                 # (B', Hkv, n, Dk): log decay from the chunk start
            o = (qc * cum.exp().unsqueeze(2)) @ state.unsqueeze(2)
            decay = (cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(later.view(1, 1, n, n, 1), -torch.inf).exp()
            tile = torch.einsum("bhgid,bhjd,bhijd->bhgij", qc, kc, decay.expand(kc.shape[0], -1, -1, -1, -1))
            last = cum[:, :, -1:]
            state = last.transpose(-1, -2).exp() * state + (kc * (last - cum).exp()).transpose(-1, -2) @ vc
        else:
            cum = g[:, :, a:b].to(acc).cumsum(2)                 # (B', Hkv, n)
            o = (qc * cum.exp()[:, :, None, :, None]) @ state.unsqueeze(2)
            decay = (cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(later, -torch.inf).exp()
            tile = (qc @ kc.unsqueeze(2).transpose(-1, -2)) * decay.unsqueeze(2)
            last = cum[:, :, -1:]
            state = last.exp().unsqueeze(-1) * state + (kc * (last - cum).exp().unsqueeze(-1)).transpose(-1, -2) @ vc
        outs.append(scale * (o + tile @ vc.unsqueeze(2)))
    if not outs:
        return ungroup(qg.new_zeros(*qg.shape[:-1], v.shape[-1]).to(acc)), state
    return ungroup(torch.cat(outs, dim=3)), state


def decay_step(q_t, k_t, v_t, g_t, state: torch.Tensor, scale: float):
    """One token: q_t (B, Hq, Dk), k_t (B, Hkv, Dk), v_t (B, Hkv, Dv), g_t None | (B|1, Hkv) | (B|1, Hkv, Dk),
    state (B, Hkv, Dk, Dv) -> (o_t (B, Hq, Dv), new state)."""
    acc = state.dtype
    if g_t is not None:
        g_t = g_t.to(acc)
        state = state * (g_t.exp().unsqueeze(-1) if g_t.dim() == 3 else g_t.exp()[..., None, None])
    state = state + k_t.to(acc).unsqueeze(-1) * v_t.to(acc).unsqueeze(-2)
    o = scale * group_queries(q_t.to(acc), k_t.shape[1]) @ state    # (B, Hkv, G, Dk) @ (B, Hkv, Dk, Dv)
    return ungroup(o), state


# ---- the normaliser path ---------------------------------------------------------------------------------


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """(..., Dv) -> (..., Dv + 1): the values with a column of ones, whose state column is the normaliser z."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (a row with nothing to attend to), never NaN, also in the gradient."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def normalise(o: torch.Tensor) -> torch.Tensor:
    """(..., Dv + 1) from `with_ones` values -> (..., Dv): the numerator over the normaliser column."""
    return safe_divide(o[..., :-1], o[..., -1:])


def constant_log_gates(decays: torch.Tensor, s: int, dtype) -> torch.Tensor:
    """(Hkv,) fixed decays in (0, 1] -> (1, Hkv, S) scalar log gates (the same at every position)."""
    return decays.to(dtype).log().view(1, -1, 1).expand(1, -1, s)


def per_head(value, heads: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or a per-head sequence -> a (heads,) tensor of `like`'s dtype and device."""
    if isinstance(value, (int, float)):
        return torch.full((heads,), float(value), dtype=like.dtype, device=like.device)
    return torch.tensor([float(x) for x in value], dtype=like.dtype, device=like.device)
