"""For variants whose math depends on where a sequence sits inside a fixed-length block (Titans' gradient
mini-batches, RAT's and Mega's chunks): a carried state records how many tokens of the current block it
has seen, so a sequence fed in pieces keeps the block boundaries of one pass. Rows of a batch may sit at
different offsets (states of different packed sequences); the forms run once per distinct offset."""
from __future__ import annotations

import torch


def run_by_offset(offsets: torch.Tensor, form, q, k, v, state, inputs: dict, per_token: set[str]):
    """`form(q, k, v, state, inputs, offset) -> (o, state)` over the batch rows grouped by `offsets` (B,)
    (an int per row); per-token inputs (B, Hkv, S, ...) are split with the rows, the others passed whole."""
    values = offsets.tolist()
    if len(set(values)) == 1:
        return form(q, k, v, state, inputs, int(values[0]))
    o, final = None, None
    for off in sorted(set(values)):
        rows = torch.tensor([i for i, x in enumerate(values) if x == off], device=q.device)
        part = {n: t.index_select(0, rows) if n in per_token else t for n, t in inputs.items()}
        o_r, st_r = form(q[rows], k[rows], v[rows], state[rows], part, int(off))
        if o is None:
            o = o_r.new_zeros(q.shape[0], *o_r.shape[1:])
            final = st_r.new_zeros(q.shape[0], *st_r.shape[1:])
        o[rows], final[rows] = o_r, st_r
    return o, final


def pieces(s: int, offset: int, block: int) -> list[tuple[int, int]]:
    """[a, b) ranges of a sequence of `s` tokens that starts `offset` tokens into a block of `block`: the
    rest of the current block, then whole blocks, the last one possibly partial."""
    out, a = [], 0
    first = (block - offset) % block
    if first:
        out.append((0, min(first, s)))
        a = out[-1][1]
    while a < s:
        out.append((a, min(a + block, s)))
        a = out[-1][1]
    return out


def log_products(x: torch.Tensor) -> torch.Tensor:
    """Cumulative log products of factors in [0, 1] along the last axis; a factor 0 counts as the smallest
    positive normal number of the dtype (exp of a difference of these is 0 to within 1e-300 in float64,
    and never NaN, as log 0 = -inf would make it)."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).log().cumsum(-1)


def ratio_matrix(cum: torch.Tensor) -> torch.Tensor:
    """(..., n) cumulative log products -> (..., n, n) with [t, j] = prod_{j < u <= t} factor_u for j <= t,
    0 above the diagonal."""
    n = cum.shape[-1]
    later = torch.ones(n, n, dtype=torch.bool, device=cum.device).triu(1)
    return (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(later, -torch.inf).exp()
