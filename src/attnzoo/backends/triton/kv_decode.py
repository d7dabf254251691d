"""A Triton kernel for one decoding step over a ragged KV cache (`attnzoo.kv.ragged`): the definition is
`ragged.padded_attention` with one query per row,

    o_h = softmax([scale * q_h K_s^T + bias_s, scale * q_h T_s^T]) [V_s; U_s]

for every query head h of KV head s's group, over the segment's packed entries (K_s, V_s: its own kept
entries, full precision or quantized in KIVI's layout: keys per channel over runs of `group` entries,
values per entry, codes packed `8 // bits` per byte in planes, see `kv.quant.pack_codes`) and its dense
tail (T_s, U_s). One program per segment (per part of `SPLIT` positions of a longer one, a second small
kernel combining the parts as flash-decoding does) walks its entries and then its tail with an online
softmax, dequantizing codes in registers: nothing is unpacked or padded in memory, and the step is one
launch per layer (two with split segments). On a GPU a decoding step of a small model is bound by host
work per operation, not by the GPU, so the torch path's dozen small operations per layer (gathers,
dequantization planes, products, softmax) are what made decoding with a press slower than without.

If the kernel fails to compile or launch, `ragged_attention` takes the torch path with a one-time warning.
"""
from __future__ import annotations

import warnings

import torch

from .linear import TRITON_ERROR, _interpreting, _np2, _tl_dtype, tl, triton

BN = 64  # entries per tile
SPLIT = 8192  # positions per program: longer segments are split (a second, small kernel combines the parts)
_WARNED: list[bool] = []

if triton is not None:
    @triton.jit
    def _tile(kp, ks, kl, vp, vs, vl, rows, valid, groups,
              D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BITS: tl.constexpr):
        """(keys (BN, BD), values (BN, BDV)) of the entries `rows`, float32, dequantized when BITS > 0
        (`groups`: each key's quantization group)."""
        od, odv = tl.arange(0, BD), tl.arange(0, BDV)
        md, mdv = valid[:, None] & (od < D)[None, :], valid[:, None] & (odv < DV)[None, :]
        if BITS == 0:
            kt = tl.load(kp + rows[:, None] * D + od[None, :], mask=md, other=0).to(tl.float32)
            vt = tl.load(vp + rows[:, None] * DV + odv[None, :], mask=mdv, other=0).to(tl.float32)
        else:
            # plane layout: byte j of a row holds codes j, j + n, j + 2n... (n = bytes per row)
            NK: tl.constexpr = D * BITS // 8
            NV: tl.constexpr = DV * BITS // 8
            MASK: tl.constexpr = (1 << BITS) - 1
            kb = tl.load(kp + rows[:, None] * NK + (od % NK)[None, :], mask=md, other=0).to(tl.int32)
            kc = (kb >> (BITS * (od // NK))[None, :]) & MASK
            kscale = tl.load(ks + groups[:, None] * D + od[None, :], mask=md, other=0).to(tl.float32)
            klo = tl.load(kl + groups[:, None] * D + od[None, :], mask=md, other=0).to(tl.float32)
            kt = kc.to(tl.float32) * kscale + klo
            vb = tl.load(vp + rows[:, None] * NV + (odv % NV)[None, :], mask=mdv, other=0).to(tl.int32)
            vc = (vb >> (BITS * (odv // NV))[None, :]) & MASK
            vscale = tl.load(vs + rows, mask=valid, other=0).to(tl.float32)
            vlo = tl.load(vl + rows, mask=valid, other=0).to(tl.float32)
            vt = vc.to(tl.float32) * vscale[:, None] + vlo[:, None]
        return kt, vt

    @triton.jit
    def _online(qt, kt, vt, valid, bias, m, lsum, acc, scale, DT: tl.constexpr, PREC: tl.constexpr):
        """One tile of the online softmax: (running max, running sum, running output)."""
        s = tl.dot(qt, tl.trans(kt.to(DT)), input_precision=PREC) * scale + bias[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), vt.to(DT), input_precision=PREC)
        return m_new, lsum, acc

    @triton.jit(do_not_specialize=["T", "SPLIT"])
    def _decode_kernel(q, o, part_m, part_l, part_o, offsets, group_first, kp, ks, kl, vp, vs, vl, bias, tk, tv,
                       T, SPLIT, scale, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                       BD: tl.constexpr, BDV: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
                       PREC: tl.constexpr):
        """Program (segment, part): the part's SPLIT positions of the segment's packed entries then tail; its
        output, or (PARTIAL) its running max, sum and unnormalised output for `_combine_kernel`."""
        seg = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        og, od, odv = tl.arange(0, BG), tl.arange(0, BD), tl.arange(0, BDV)
        qt = tl.load(q + seg * G * D + og[:, None] * D + od[None, :], mask=(og < G)[:, None] & (od < D)[None, :],
                     other=0).to(DT)
        m = tl.full([BG], float("-inf"), tl.float32)
        lsum = tl.zeros([BG], tl.float32)
        acc = tl.zeros([BG, BDV], tl.float32)
        start = tl.load(offsets + seg).to(tl.int64)
        held = tl.load(offsets + seg + 1).to(tl.int64) - start
        lo = part.to(tl.int64) * SPLIT
        hi = tl.minimum(lo + SPLIT, held + T)
        first = start * 0
        if BITS > 0:
            first = tl.load(group_first + seg).to(tl.int64)
        end = start + tl.minimum(hi, held)
        for n0 in range(start + tl.minimum(lo, held), end, BN):
            rows = n0 + tl.arange(0, BN)
            valid = rows < end
            kt, vt = _tile(kp, ks, kl, vp, vs, vl, rows, valid, first + (rows - start) // GROUP, D, DV, BD, BDV, BITS)
            b = tl.zeros([BN], tl.float32)
            if HAS_BIAS:
                b = tl.load(bias + rows, mask=valid, other=0).to(tl.float32)
            m, lsum, acc = _online(qt, kt, vt, valid, b, m, lsum, acc, scale, DT, PREC)
        t_end = tl.maximum(hi - held, 0)
        for t0 in range(tl.maximum(lo - held, 0), t_end, BN):
            rows = t0 + tl.arange(0, BN)
            valid = rows < t_end
            kt, vt = _tile(tk + seg * T * D, ks, kl, tv + seg * T * DV, vs, vl, rows, valid, rows, D, DV, BD, BDV, 0)
            m, lsum, acc = _online(qt, kt, vt, valid, tl.zeros([BN], tl.float32), m, lsum, acc, scale, DT, PREC)
        if PARTIAL:
            at = seg * tl.num_programs(1) + part
            tl.store(part_m + at * BG + og, m)
            tl.store(part_l + at * BG + og, lsum)
            tl.store(part_o + at * BG * BDV + og[:, None] * BDV + odv[None, :], acc)
        else:
            out = acc / tl.where(lsum == 0, 1.0, lsum)[:, None]  # rows that see nothing: zeros
            tl.store(o + seg * G * DV + og[:, None] * DV + odv[None, :], out.to(o.dtype.element_ty),
                     mask=(og < G)[:, None] & (odv < DV)[None, :])

    @triton.jit
    def _combine_kernel(o, part_m, part_l, part_o, PARTS, G: tl.constexpr, BG: tl.constexpr, DV: tl.constexpr,
                        BDV: tl.constexpr):
        """One segment's output from its parts' running maxima, sums and outputs."""
        seg = tl.program_id(0).to(tl.int64)
        og, odv = tl.arange(0, BG), tl.arange(0, BDV)
        m = tl.full([BG], float("-inf"), tl.float32)
        lsum = tl.zeros([BG], tl.float32)
        acc = tl.zeros([BG, BDV], tl.float32)
        for part in range(PARTS):
            at = seg * PARTS + part
            pm = tl.load(part_m + at * BG + og)
            m_new = tl.maximum(m, pm)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            mine, theirs = tl.exp(m - m_safe), tl.exp(pm - m_safe)
            lsum = lsum * mine + tl.load(part_l + at * BG + og) * theirs
            part = tl.load(part_o + at * BG * BDV + og[:, None] * BDV + odv[None, :])
            acc = acc * mine[:, None] + part * theirs[:, None]
            m = m_new
        out = acc / tl.where(lsum == 0, 1.0, lsum)[:, None]
        tl.store(o + seg * G * DV + og[:, None] * DV + odv[None, :], out.to(o.dtype.element_ty),
                 mask=(og < G)[:, None] & (odv < DV)[None, :])


def why_not(query: torch.Tensor, tail_valid) -> str | None:
    """Why the kernel does not serve this call (None: it does)."""
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if not (query.is_cuda or _interpreting()):
        return "the kernel runs on CUDA tensors"
    if query.shape[2] != 1:
        return f"one query per row (decoding) is served, got {query.shape[2]}"
    if tail_valid is not None:
        return "padding in the tail is served by the torch path"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"float16, bfloat16 or float32 queries are served, got {query.dtype}"
    if query.requires_grad and torch.is_grad_enabled():
        return "the kernel has no backward: calls that need gradients take the torch path"
    if _WARNED:
        return "the kernel failed earlier in this process"
    return None


def group_first(packed) -> torch.Tensor:
    """(segments,) int32, the first key-quantization group of each segment (`ragged.first_key_groups`)."""
    if "group_first" not in packed.derived:
        from ...kv.ragged import first_key_groups

        packed.derived["group_first"] = first_key_groups(packed.lengths, packed.group)[0].to(torch.int32)
    return packed.derived["group_first"]


def held_max(packed) -> int:
    """The most entries any segment holds (host-side: it sets the split)."""
    if "held_max" not in packed.derived:
        packed.derived["held_max"] = max((b - a for a, b in zip(packed.bounds[:-1], packed.bounds[1:])), default=0)
    return packed.derived["held_max"]


def _fixed_arguments(packed, query: torch.Tensor, hkv: int, dv: int) -> tuple[tuple, dict]:
    """The launch arguments that depend only on the packed layer and the query's heads and dtype, computed
    once per (layer, heads, dtype): a decoding step's host work is what it costs."""
    key = ("decode launch", query.shape[1], hkv, dv, query.dtype)
    if key in packed.derived:
        return packed.derived[key]
    g, d = query.shape[1] // hkv, query.shape[-1]
    bits = packed.bits or 0
    if bits:
        (kp, ks, kl), (vp, vs, vl) = packed._keys, packed._values
    else:
        kp, vp = packed._keys, packed._values
        ks = kl = vs = vl = kp
    pointers = (packed.offsets, group_first(packed) if bits else packed.offsets, kp, ks, kl, vp, vs, vl,
                packed.bias if packed.bias is not None else packed.offsets)
    constants = dict(G=g, BG=max(16, _np2(g)), D=d, DV=dv, BD=max(16, _np2(d)), BDV=max(16, _np2(dv)), BITS=bits,
                     GROUP=packed.group, HAS_BIAS=packed.bias is not None, BN=BN, DT=_tl_dtype(query.dtype),
                     PREC="ieee" if query.dtype == torch.float32 else "tf32", num_warps=4)
    packed.derived[key] = pointers, constants
    return pointers, constants


def decode(query: torch.Tensor, packed, tail_keys: torch.Tensor, tail_values: torch.Tensor, scaling: float,
           split: int = SPLIT) -> torch.Tensor:
    """(B, Hq, 1, Dv) attention of `query` (B, Hq, 1, D) over the packed entries and the (B, Hkv, T, D) tail
    (every tail entry visible). Segments longer than `split` positions are cut into parts of `split`, run by
    parallel programs and combined by a second kernel (one program per segment would leave the GPU idle
    and serialise a long segment's loads)."""
    b, hq = query.shape[:2]
    _, hkv, t, dv = tail_values.shape
    pointers, constants = _fixed_arguments(packed, query, hkv, dv)
    parts = max(1, -(-(held_max(packed) + t) // split))
    out = torch.empty(b, hq, 1, dv, dtype=query.dtype, device=query.device)
    query, tail_keys, tail_values = query.contiguous(), tail_keys.contiguous(), tail_values.contiguous()
    if parts == 1:
        _decode_kernel[(b * hkv, 1)](query, out, out, out, out, *pointers, tail_keys, tail_values, t, split,
                                     float(scaling), PARTIAL=False, **constants)
        return out
    n = b * hkv * parts * constants["BG"]
    part_o = torch.empty(n * (constants["BDV"] + 2), dtype=torch.float32, device=query.device)
    part_m, part_l, part_o = part_o[:n], part_o[n:2 * n], part_o[2 * n:]
    _decode_kernel[(b * hkv, parts)](query, out, part_m, part_l, part_o, *pointers, tail_keys, tail_values, t, split,
                                     float(scaling), PARTIAL=True, **constants)
    _combine_kernel[(b * hkv,)](out, part_m, part_l, part_o, parts, G=constants["G"], BG=constants["BG"], DV=dv,
                                BDV=constants["BDV"], num_warps=4)
    return out


def try_decode(query, packed, tail_keys, tail_values, tail_valid, scaling) -> torch.Tensor | None:
    """`decode`'s output, or None when the kernel does not serve the call or failed (warned once)."""
    if why_not(query, tail_valid) is not None:
        return None
    try:
        if tail_keys.dtype != query.dtype:
            tail_keys, tail_values = tail_keys.to(query.dtype), tail_values.to(query.dtype)
        return decode(query, packed, tail_keys, tail_values, scaling)
    except Exception as err:  # noqa: BLE001 - any compile or launch failure: the torch path serves the call
        _WARNED.append(True)
        warnings.warn(f"attnzoo.kv: the ragged decoding kernel failed ({type(err).__name__}: {err}); decoding "
                      "takes the torch path (this warning is shown once)", RuntimeWarning, stacklevel=3)
        return None
