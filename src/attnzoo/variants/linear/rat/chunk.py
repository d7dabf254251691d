"""RAT over chunks: the recurrence runs inside all chunks at once (L sequential steps, each over every chunk),
then each query attends to the chunk summaries (one per L tokens) and to its own smoothed key. Work
O(S L D) for the recurrence and O(S (S / L + R) D) for the attention (R: summaries in the state): RAT's
L-fold saving over softmax attention, no S x S tensor."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ....core.recurrent import group_queries, ungroup
from .naive import final_state, partial_row, rows_of


def rat_chunk(q, k, v, fk, fv, scale: float, chunk: int, state: torch.Tensor, offset: int):
    """Same arguments and results as `naive.rat_parallel`."""
    acc = state.dtype
    b, hkv, s, d = k.shape
    dv = v.shape[-1]
    k_prev, v_prev, _ = partial_row(state, d, dv, chunk)
    n = -(-(offset + s) // chunk)                                # chunks touched

    def smooth(x, f, x_prev):
        # Align chunks to a grid: `offset` leading slots, the first of which brings in the carried value
        # (gate 0, input x_prev), the others keep it (gate 1, input 0); then the scan over the L slots.
        x, f = x.to(acc), f.to(acc)
        lead_x = lead_f = x.new_zeros(b, hkv, 0, x.shape[-1])
        if offset:
            lead_x = torch.cat([x_prev.unsqueeze(2), x.new_zeros(b, hkv, offset - 1, x.shape[-1])], 2)
            lead_f = F.pad(x.new_ones(b, hkv, offset - 1, x.shape[-1]), (0, 0, 1, 0))
        tail = n * chunk - offset - s
        xs = torch.cat([lead_x, x, x.new_zeros(b, hkv, tail, x.shape[-1])], 2).view(b, hkv, n, chunk, -1)
        fs = torch.cat([lead_f, f, f.new_ones(b, hkv, tail, f.shape[-1])], 2).view(b, hkv, n, chunk, -1)
        h, out = torch.zeros_like(xs[:, :, :, 0]), []
        for i in range(chunk):
            h = fs[:, :, :, i] * h + (1 - fs[:, :, :, i]) * xs[:, :, :, i]
            out.append(h)
        return torch.stack(out, 3).flatten(2, 3)[:, :, offset:offset + s]

    k_s, v_s = smooth(k, fk, k_prev), smooth(v, fv, v_prev)
    qg = group_queries(q.to(acc), hkv)                                       # (B, Hkv, G, S, D)
    pos = torch.arange(s, device=q.device) + offset
    full = (offset + s) // chunk                                             # chunks that end inside this call
    ends = torch.arange(full, device=q.device) * chunk + chunk - 1 - offset  # their last token's index
    k_rows, v_rows, count = rows_of(state, d, dv)
    keys = torch.cat([k_rows, k_s[:, :, ends]], 2)                           # summaries: the state's, then new
    vals = torch.cat([v_rows, v_s[:, :, ends]], 2)
    sees = torch.cat([(count == chunk)[:, :, None, :].expand(-1, -1, s, -1),
                      (torch.arange(full, device=q.device) < (pos // chunk).unsqueeze(1)).expand(b, hkv, s, full)], -1)
    scores = (qg @ keys.unsqueeze(2).transpose(-1, -2)).masked_fill(~sees.unsqueeze(2), -torch.inf)
    own = (qg * k_s.unsqueeze(2)).sum(-1, keepdim=True)                      # q_t . k~_t
    p = torch.softmax(scale * torch.cat([scores, own], -1), dim=-1)
    o = p[..., :-1] @ vals.unsqueeze(2) + p[..., -1:] * v_s.unsqueeze(2)
    return ungroup(o), final_state(state, k_s, v_s, offset, chunk)
