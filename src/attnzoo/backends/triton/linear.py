"""Triton kernels for the decaying-state linear attention of `variants/linear/_decay.py`, and the
`triton` backend that runs them for `gla`, `retention`, `lightning`, `linear`, `based` and `cosine`.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

with no gate, one log gate per token and KV head (scalar: retention, lightning, fla's simple_gla) or
one per key dimension (GLA). The chunked form, C = 64 tokens a chunk, gc = the log gates summed from
the chunk's start (chunk-local cumulative), `last` its value at the chunk's last token:

    o_t     = scale * ((q_t * exp(gc_t)) H_n + sum_{s <= t in chunk} A_ts v_s),
    A_ts    = sum_d q_td k_sd exp(gc_td - gc_sd),
    H_{n+1} = exp(last) * H_n + sum_s (k_s * exp(last - gc_s))^T v_s.

Kernels (forward): `_cumsum` (gc), `_fwd_h` (H_n per chunk, one program per (K tile, V tile, head)
walking the chunks), `_fwd_o` (outputs, one program per (V tile, chunk, query head)); GLA adds
`_gla_fwd_A`, the C x C tile A in 16 x 16 sub-blocks: off-diagonal blocks as one product through a
reference point r between s and t (q_t exp(gc_t - gc_r) and k_s exp(gc_r - gc_s), both exponents
<= 0); diagonal blocks as one product through the sub-chunk's first row when its decay spans less
than SPAN (factors <= exp(SPAN) in float32), else one key at a time with every exponent <= 0. So
nothing overflows for gates near 0 (strong decay) or 1 (none).

Backward: the states again (float32), `_bwd_dh` (dH_n walking the chunks backwards), `_bwd_dv`,
then dq/dk (one kernel for scalar/no gates; for GLA `_gla_bwd_dA`, `_gla_bwd_intra` (sub-blocks as
in the forward) and `_gla_bwd_inter`). Gate gradients come from dG_t = q_t dq_t - k_t dk_t: with
G the global cumulative gate, dL/dg_u = sum_{t >= u} dG_t, i.e. a reverse cumulative sum inside the
chunk plus rowsum(H_{n+1} * dH_{n+1}) for everything after it (GQA: summed over the group's queries).

Feature-map variants (`linear`, `based`: Taylor features of 1 + D + D^2 entries) run the same kernels on
phi(q), phi(k); the normalised ones divide by q_t z_t, z_t the running key sum, computed in `_fwd_o_kernel` next
to the numerator from per-chunk key sums (`chunk_normalised`; a column of ones in the values, the torch path's
way, would widen Dv = 128 to 129 and pad every V tile: 2.3-3x the kernels' time). `based` without state in or
out runs its quadratic form instead up to `based.PARALLEL_MAX_LEN` keys (backends/triton/based.py). `cosine`
runs them on L2-normalised q/k and position-scaled values; its state's extra row (tokens seen) stays outside the
kernels.

Query heads read their KV head's state (GQA without copies); KV-side gradients sum the group in-kernel.
If a kernel fails to compile or launch, the call falls back to the torch chunk path with a one-time
warning (forward and backward alike).
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

try:  # the glue below imports without triton; the kernels need it
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
except ImportError as _err:  # pragma: no cover - exercised where triton is absent
    triton = tl = None
    TRITON_ERROR = f"triton is not importable ({_err})"

CHUNK = 64          # tokens per chunk (C)
SUB = 16            # GLA's sub-chunk (16 x 16 blocks of the C x C tile)
# Intermediates (states, the C x C tile, decayed keys) as float32 matrix operands (tf32) instead of the
# inputs' 16-bit dtype: more precise, 1.2-4x slower on an H200. The states always accumulate in float32; by
# default they are stored per chunk in the inputs' dtype (as fla does), which passes FlashAttention's rule.
HIGH_PRECISION = False
SERVED = ("gla", "retention", "lightning", "linear", "based", "cosine")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ======================================================================================================
# kernels
# ======================================================================================================
if triton is not None:
    _RUNTIME = ["S", "H", "HQ", "gcb"]  # runtime sizes: no recompilation per length or head count
    # GLA's diagonal 16 x 16 blocks are one product through a reference row when the sub-chunk's log decay spans
    # less than SPAN (factors up to exp(SPAN) in float32); beyond it, one key at a time (exact for any decay).
    SPAN = tl.constexpr(40.0)

    # strides along S and K stay specialised (1, multiples of 16): vectorised loads, 2.7x faster at B1 H16 S64k K128
    @triton.jit(do_not_specialize=["S", "sb", "sh", "H"])
    def _cumsum_kernel(g, gc, S, sb, sh, ss, sw, H, W: tl.constexpr, C: tl.constexpr, BW: tl.constexpr):
        """gc[b, h, t, w] = sum of g[b, h, u, w] over u from t's chunk start to t (float32)."""
        n = tl.program_id(0)
        iw = tl.program_id(1)
        ibh = tl.program_id(2).to(tl.int64)
        ib = ibh // H
        ih = ibh % H
        ot = n * C + tl.arange(0, C)
        ow = iw * BW + tl.arange(0, BW)
        m = (ot < S)[:, None] & (ow < W)[None, :]
        x = tl.load(g + ib * sb + ih * sh + ot[:, None] * ss + ow[None, :] * sw, mask=m, other=0).to(tl.float32)
        tl.store(gc + ibh * S * W + ot[:, None] * W + ow[None, :], tl.cumsum(x, axis=0), mask=m)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _fwd_h_kernel(k, v, gc, h, h0, ht, S, H, gcb,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      GATE: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr):
        """h[b, h, n] = the state entering chunk n (B, H, NT, K, V); ht the final state (float32)."""
        iv = tl.program_id(0)
        ik = tl.program_id(1)
        ibh = tl.program_id(2).to(tl.int64)
        ib = ibh // H
        ih = ibh % H
        NT = tl.cdiv(S, C)
        ok = ik * BK + tl.arange(0, BK)
        ov = iv * BV + tl.arange(0, BV)
        mk = ok < K
        mv = ov < V
        mkv = mk[:, None] & mv[None, :]
        kb = k + ibh * S * K
        vb = v + ibh * S * V
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_H0:
            acc += tl.load(h0 + ibh * K * V + ok[:, None] * V + ov[None, :], mask=mkv, other=0).to(tl.float32)
        for n in range(0, NT):
            tl.store(h + (ibh * NT + n) * K * V + ok[:, None] * V + ov[None, :], acc.to(h.dtype.element_ty), mask=mkv)
            ot = n * C + tl.arange(0, C)
            mt = ot < S
            last = tl.minimum(n * C + C, S) - 1
            kt = tl.load(kb + ot[None, :] * K + ok[:, None], mask=mk[:, None] & mt[None, :], other=0).to(tl.float32)
            vv = tl.load(vb + ot[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0)
            if GATE == 1:
                gb = gc + ib * gcb + ih * S
                gt = tl.load(gb + ot, mask=mt, other=0)
                gl = tl.load(gb + last)
                acc = acc * tl.exp(gl)
                kt = kt * tl.exp(gl - gt)[None, :]
            elif GATE == 2:
                gb = gc + ib * gcb + ih * S * K
                gt = tl.load(gb + ot[None, :] * K + ok[:, None], mask=mk[:, None] & mt[None, :], other=0)
                gl = tl.load(gb + last * K + ok, mask=mk, other=0)
                acc = acc * tl.exp(gl)[:, None]
                kt = kt * tl.exp(gl[:, None] - gt)
            acc = tl.dot(kt.to(DT), vv.to(DT), acc, input_precision=PREC)
        if STORE_HT:
            tl.store(ht + ibh * K * V + ok[:, None] * V + ov[None, :], acc, mask=mkv)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _fwd_o_kernel(q, k, v, gc, h, A, o, zn, den, S, H, HQ, gcb, scale,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      GATE: tl.constexpr, NORM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """o = scale * ((q * exp(gc)) H_n + A v) for one chunk, V tile and query head. NORM (no gate): divided
        by den = q z_n + rowsum(A), z_n the sum of the keys before the chunk (float32 (B, H, NT, K)); den is
        stored (float32 (B, HQ, S)) by the first V tile."""
        iv = tl.program_id(0)
        n = tl.program_id(1)
        ibq = tl.program_id(2).to(tl.int64)
        ib = ibq // HQ
        ih = (ibq % HQ) // (HQ // H)
        ibh = ib * H + ih
        NT = tl.cdiv(S, C)
        ot = n * C + tl.arange(0, C)
        mt = ot < S
        oc = tl.arange(0, C)
        keep = (oc[:, None] >= oc[None, :]) & mt[:, None]
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        acc = tl.zeros([C, BV], dtype=tl.float32)
        att = tl.zeros([C, C], dtype=tl.float32)
        dsum = tl.zeros([C], dtype=tl.float32)
        for ik in range(0, tl.cdiv(K, BK)):
            ok = ik * BK + tl.arange(0, BK)
            mk = ok < K
            mtk = mt[:, None] & mk[None, :]
            qq = tl.load(q + ibq * S * K + ot[:, None] * K + ok[None, :], mask=mtk, other=0)
            hh = tl.load(h + (ibh * NT + n) * K * V + ok[:, None] * V + ov[None, :],
                         mask=mk[:, None] & mv[None, :], other=0)
            if GATE == 2:
                gq = tl.load(gc + ib * gcb + ih * S * K + ot[:, None] * K + ok[None, :], mask=mtk, other=0)
                acc = tl.dot((qq.to(tl.float32) * tl.exp(gq)).to(DT), hh.to(DT), acc, input_precision=PREC)
            else:
                acc = tl.dot(qq.to(DT), hh.to(DT), acc, input_precision=PREC)
                kt = tl.load(k + ibh * S * K + ot[None, :] * K + ok[:, None], mask=mk[:, None] & mt[None, :], other=0)
                att = tl.dot(qq.to(DT), kt.to(DT), att, input_precision=PREC)
                if NORM:
                    zt = tl.load(zn + (ibh * NT + n) * K + ok, mask=mk, other=0)
                    dsum += tl.sum(qq.to(tl.float32) * zt[None, :], 1)
        if GATE == 1:
            gq = tl.load(gc + ib * gcb + ih * S + ot, mask=mt, other=0)
            acc = acc * tl.exp(gq)[:, None]
            att = tl.where(keep, att * tl.exp(tl.where(keep, gq[:, None] - gq[None, :], 0.0)), 0.0)
        elif GATE == 2:
            att = tl.load(A + ibq * S * C + ot[:, None] * C + oc[None, :], mask=mt[:, None], other=0)
            att = tl.where(keep, att, 0.0)
        else:
            att = tl.where(keep, att, 0.0)
        vv = tl.load(v + ibh * S * V + ot[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0)
        acc = tl.dot(att.to(DT), vv.to(DT), acc, input_precision=PREC)
        if NORM:
            dsum += tl.sum(att, 1)
            acc = acc * tl.where(dsum == 0, 0.0, 1.0 / tl.where(dsum == 0, 1.0, dsum))[:, None]
            if iv == 0:
                tl.store(den + ibq * S + ot, dsum, mask=mt)
        tl.store(o + ibq * S * V + ot[:, None] * V + ov[None, :], (acc * scale).to(o.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])

    @triton.jit(do_not_specialize=_RUNTIME)
    def _gla_fwd_A_kernel(q, k, gc, A, S, H, HQ, gcb,
                          K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                          PREC: tl.constexpr):
        """A[t, s] = sum_d q_td k_sd exp(gc_td - gc_sd), s <= t, for the 16 rows of one sub-chunk
        (B, HQ, S, C) float32; the entries above the diagonal are left unwritten (masked by readers)."""
        NC: tl.constexpr = C // BC
        pid = tl.program_id(0)
        ibq = tl.program_id(1).to(tl.int64)
        n = pid // NC
        i = pid % NC
        ib = ibq // HQ
        ih = (ibq % HQ) // (HQ // H)
        ibh = ib * H + ih
        r0 = n * C + i * BC
        if r0 >= S:
            return
        ob = tl.arange(0, BC)
        oi = r0 + ob
        mi = oi < S
        qb = q + ibq * S * K
        kb = k + ibh * S * K
        gb = gc + ib * gcb + ih * S * K
        Ab = A + ibq * S * C
        for j in range(0, i):
            oj = n * C + j * BC + ob
            blk = tl.zeros([BC, BC], dtype=tl.float32)
            for ik in range(0, tl.cdiv(K, BK)):
                ok = ik * BK + tl.arange(0, BK)
                mk = ok < K
                mik = mi[:, None] & mk[None, :]
                qq = tl.load(qb + oi[:, None] * K + ok[None, :], mask=mik, other=0).to(tl.float32)
                gq = tl.load(gb + oi[:, None] * K + ok[None, :], mask=mik, other=0)
                gr = tl.load(gb + r0 * K + ok, mask=mk, other=0)
                kt = tl.load(kb + oj[None, :] * K + ok[:, None], mask=mk[:, None], other=0).to(tl.float32)
                gk = tl.load(gb + oj[None, :] * K + ok[:, None], mask=mk[:, None], other=0)
                qg = qq * tl.exp(tl.where(mik, gq - gr[None, :], 0.0))
                blk = tl.dot(qg, kt * tl.exp(gr[:, None] - gk), blk, input_precision=PREC)
            tl.store(Ab + oi[:, None] * C + (j * BC + ob)[None, :], blk, mask=mi[:, None])
        blk = tl.zeros([BC, BC], dtype=tl.float32)
        rl = tl.minimum(r0 + BC, S) - 1
        lower = (oi[:, None] >= oi[None, :]) & mi[:, None]
        for ik in range(0, tl.cdiv(K, BK)):
            ok = ik * BK + tl.arange(0, BK)
            mk = ok < K
            mik = mi[:, None] & mk[None, :]
            qq = tl.load(qb + oi[:, None] * K + ok[None, :], mask=mik, other=0).to(tl.float32)
            gq = tl.load(gb + oi[:, None] * K + ok[None, :], mask=mik, other=0)
            gr = tl.load(gb + r0 * K + ok, mask=mk, other=0)
            if tl.max(gr - tl.load(gb + rl * K + ok, mask=mk, other=0), 0) < SPAN:
                # one product through the first row: exp(gq - gr) <= 1, exp(gr - gs) <= exp(SPAN)
                ki = tl.load(kb + oi[:, None] * K + ok[None, :], mask=mik, other=0).to(tl.float32)
                qg = qq * tl.exp(tl.where(mik, gq - gr[None, :], 0.0))
                kg = ki * tl.exp(tl.where(mik, gr[None, :] - gq, 0.0))
                blk += tl.where(lower, tl.dot(qg, tl.trans(kg), input_precision=PREC), 0.0)
            else:       # decay too strong inside the sub-chunk for that: one key at a time, exactly
                for c in range(0, BC):
                    s = r0 + c
                    ms = mk & ((ok * 0 + s) < S)
                    ks = tl.load(kb + s * K + ok, mask=ms, other=0).to(tl.float32)
                    gs = tl.load(gb + s * K + ok, mask=ms, other=0)
                    keep = ((oi >= s) & mi)[:, None]
                    col = tl.sum(tl.where(keep, qq * ks[None, :] * tl.exp(tl.where(keep, gq - gs[None, :], 0.0)),
                                          0.0), 1)
                    blk = tl.where(ob[None, :] == c, blk + col[:, None], blk)
        tl.store(Ab + oi[:, None] * C + (i * BC + ob)[None, :], blk, mask=mi[:, None])

    @triton.jit(do_not_specialize=_RUNTIME)
    def _bwd_dh_kernel(q, do, gc, dh, dht, dh0, S, H, HQ, gcb, scale,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       GATE: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                       DT: tl.constexpr, PREC: tl.constexpr):
        """dh[b, h, n] = dL/dH_{n+1} (the gradient of the state leaving chunk n), float32; dh0 = dL/dH_0."""
        iv = tl.program_id(0)
        ik = tl.program_id(1)
        ibh = tl.program_id(2).to(tl.int64)
        ib = ibh // H
        ih = ibh % H
        G = HQ // H
        NT = tl.cdiv(S, C)
        ok = ik * BK + tl.arange(0, BK)
        ov = iv * BV + tl.arange(0, BV)
        mk = ok < K
        mv = ov < V
        mkv = mk[:, None] & mv[None, :]
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_DHT:
            acc += tl.load(dht + ibh * K * V + ok[:, None] * V + ov[None, :], mask=mkv, other=0).to(tl.float32)
        for nn in range(0, NT):
            n = NT - 1 - nn
            tl.store(dh + (ibh * NT + n) * K * V + ok[:, None] * V + ov[None, :], acc.to(dh.dtype.element_ty),
                     mask=mkv)
            ot = n * C + tl.arange(0, C)
            mt = ot < S
            last = tl.minimum(n * C + C, S) - 1
            mkt = mk[:, None] & mt[None, :]
            if GATE == 1:
                gb = gc + ib * gcb + ih * S
                fac = tl.exp(tl.load(gb + ot, mask=mt, other=0))[None, :] * scale
                acc = acc * tl.exp(tl.load(gb + last))
            elif GATE == 2:
                gb = gc + ib * gcb + ih * S * K
                fac = tl.exp(tl.load(gb + ot[None, :] * K + ok[:, None], mask=mkt, other=0)) * scale
                acc = acc * tl.exp(tl.load(gb + last * K + ok, mask=mk, other=0))[:, None]
            for m in range(0, G):
                ibq = ib * HQ + ih * G + m
                qt = tl.load(q + ibq * S * K + ot[None, :] * K + ok[:, None], mask=mkt, other=0).to(tl.float32)
                dd = tl.load(do + ibq * S * V + ot[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0)
                if GATE == 0:
                    qt = qt * scale
                else:
                    qt = qt * fac
                acc = tl.dot(qt.to(DT), dd.to(DT), acc, input_precision=PREC)
        if STORE_DH0:
            tl.store(dh0 + ibh * K * V + ok[:, None] * V + ov[None, :], acc, mask=mkv)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _bwd_dv_kernel(q, k, do, gc, dh, A, dv, S, H, HQ, gcb, scale,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       GATE: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """dv_s = (k_s * exp(last - gc_s)) dH_{n+1} + scale * sum_{group, t >= s} A_ts do_t."""
        iv = tl.program_id(0)
        n = tl.program_id(1)
        ibh = tl.program_id(2).to(tl.int64)
        ib = ibh // H
        ih = ibh % H
        G = HQ // H
        NT = tl.cdiv(S, C)
        ot = n * C + tl.arange(0, C)
        mt = ot < S
        oc = tl.arange(0, C)
        keep = (oc[:, None] >= oc[None, :]) & mt[:, None]
        ov = iv * BV + tl.arange(0, BV)
        mv = ov < V
        mtv = mt[:, None] & mv[None, :]
        last = tl.minimum(n * C + C, S) - 1
        acc = tl.zeros([C, BV], dtype=tl.float32)
        for ik in range(0, tl.cdiv(K, BK)):
            ok = ik * BK + tl.arange(0, BK)
            mk = ok < K
            mtk = mt[:, None] & mk[None, :]
            kk = tl.load(k + ibh * S * K + ot[:, None] * K + ok[None, :], mask=mtk, other=0).to(tl.float32)
            dhh = tl.load(dh + (ibh * NT + n) * K * V + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :],
                          other=0)
            if GATE == 1:
                gb = gc + ib * gcb + ih * S
                kk = kk * tl.exp(tl.load(gb + last) - tl.load(gb + ot, mask=mt, other=0))[:, None]
            elif GATE == 2:
                gb = gc + ib * gcb + ih * S * K
                gk = tl.load(gb + ot[:, None] * K + ok[None, :], mask=mtk, other=0)
                kk = kk * tl.exp(tl.load(gb + last * K + ok, mask=mk, other=0)[None, :] - gk)
            acc = tl.dot(kk.to(DT), dhh.to(DT), acc, input_precision=PREC)
        for m in range(0, G):
            ibq = ib * HQ + ih * G + m
            if GATE == 2:
                att = tl.load(A + ibq * S * C + ot[:, None] * C + oc[None, :], mask=mt[:, None], other=0)
                att = tl.where(keep, att, 0.0)
            else:
                att = tl.zeros([C, C], dtype=tl.float32)
                for ik in range(0, tl.cdiv(K, BK)):
                    ok = ik * BK + tl.arange(0, BK)
                    mk = ok < K
                    qq = tl.load(q + ibq * S * K + ot[:, None] * K + ok[None, :], mask=mt[:, None] & mk[None, :],
                                 other=0)
                    kt = tl.load(k + ibh * S * K + ot[None, :] * K + ok[:, None], mask=mk[:, None] & mt[None, :],
                                 other=0)
                    att = tl.dot(qq.to(DT), kt.to(DT), att, input_precision=PREC)
                if GATE == 1:
                    gq = tl.load(gc + ib * gcb + ih * S + ot, mask=mt, other=0)
                    att = tl.where(keep, att * tl.exp(tl.where(keep, gq[:, None] - gq[None, :], 0.0)), 0.0)
                else:
                    att = tl.where(keep, att, 0.0)
            dd = tl.load(do + ibq * S * V + ot[:, None] * V + ov[None, :], mask=mtv, other=0)
            acc = tl.dot(tl.trans(att * scale).to(DT), dd.to(DT), acc, input_precision=PREC)
        tl.store(dv + ibh * S * V + ot[:, None] * V + ov[None, :], acc.to(dv.dtype.element_ty), mask=mtv)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _bwd_dqk_kernel(q, k, v, do, gc, h, dh, dq, dk, dgp, S, H, HQ, gcb, scale,
                        K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        GATE: tl.constexpr, STORE_DG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """dq, dk (and the partial gate gradient of this K tile) with no gate or a scalar gate."""
        ik = tl.program_id(0)
        n = tl.program_id(1)
        ibh = tl.program_id(2).to(tl.int64)
        ib = ibh // H
        ih = ibh % H
        G = HQ // H
        NT = tl.cdiv(S, C)
        ot = n * C + tl.arange(0, C)
        mt = ot < S
        oc = tl.arange(0, C)
        keep = (oc[:, None] >= oc[None, :]) & mt[:, None]
        ok = ik * BK + tl.arange(0, BK)
        mk = ok < K
        mtk = mt[:, None] & mk[None, :]
        last = tl.minimum(n * C + C, S) - 1
        hbase = h + (ibh * NT + n) * K * V
        dhbase = dh + (ibh * NT + n) * K * V
        kk = tl.load(k + ibh * S * K + ot[:, None] * K + ok[None, :], mask=mtk, other=0)
        dkk = tl.zeros([C, BK], dtype=tl.float32)
        hd = tl.zeros([BK], dtype=tl.float32)
        for iv in range(0, tl.cdiv(V, BV)):
            ov = iv * BV + tl.arange(0, BV)
            mv = ov < V
            vv = tl.load(v + ibh * S * V + ot[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0)
            dhh = tl.load(dhbase + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0)
            dkk = tl.dot(vv.to(DT), tl.trans(dhh).to(DT), dkk, input_precision=PREC)
            if STORE_DG:
                hh = tl.load(hbase + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0)
                hd += tl.sum(hh.to(tl.float32) * dhh, 1)
        if GATE == 1:
            gb = gc + ib * gcb + ih * S
            gk = tl.load(gb + ot, mask=mt, other=0)
            gl = tl.load(gb + last)
            dkk = dkk * tl.exp(gl - gk)[:, None]
            ds_fac = tl.exp(tl.where(keep, gk[:, None] - gk[None, :], 0.0))
        carry = 0.0
        if STORE_DG:
            carry = tl.exp(gl) * tl.sum(hd, 0) + tl.sum(tl.sum(kk.to(tl.float32) * dkk, 1), 0)
        dgrow = tl.zeros([C], dtype=tl.float32)
        for m in range(0, G):
            ibq = ib * HQ + ih * G + m
            dqm = tl.zeros([C, BK], dtype=tl.float32)
            ds = tl.zeros([C, C], dtype=tl.float32)
            for iv in range(0, tl.cdiv(V, BV)):
                ov = iv * BV + tl.arange(0, BV)
                mv = ov < V
                mtv = mt[:, None] & mv[None, :]
                dd = tl.load(do + ibq * S * V + ot[:, None] * V + ov[None, :], mask=mtv, other=0)
                vv = tl.load(v + ibh * S * V + ot[:, None] * V + ov[None, :], mask=mtv, other=0)
                hh = tl.load(hbase + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0)
                dqm = tl.dot(dd.to(DT), tl.trans(hh).to(DT), dqm, input_precision=PREC)
                ds = tl.dot(dd.to(DT), tl.trans(vv).to(DT), ds, input_precision=PREC)
            if GATE == 1:
                dqm = dqm * (tl.exp(gk) * scale)[:, None]
                ds = tl.where(keep, ds * ds_fac, 0.0) * scale
            else:
                dqm = dqm * scale
                ds = tl.where(keep, ds, 0.0) * scale
            qq = tl.load(q + ibq * S * K + ot[:, None] * K + ok[None, :], mask=mtk, other=0)
            dqm = tl.dot(ds.to(DT), kk.to(DT), dqm, input_precision=PREC)
            dkk = tl.dot(tl.trans(ds).to(DT), qq.to(DT), dkk, input_precision=PREC)
            tl.store(dq + ibq * S * K + ot[:, None] * K + ok[None, :], dqm.to(dq.dtype.element_ty), mask=mtk)
            if STORE_DG:
                dgrow += tl.sum(qq.to(tl.float32) * dqm, 1)
        tl.store(dk + ibh * S * K + ot[:, None] * K + ok[None, :], dkk.to(dk.dtype.element_ty), mask=mtk)
        if STORE_DG:
            dgrow -= tl.sum(kk.to(tl.float32) * dkk, 1)
            rev = tl.sum(dgrow, 0) - tl.cumsum(dgrow, 0) + dgrow
            tl.store(dgp + (ik * tl.num_programs(2) + ibh) * S + ot, rev + carry, mask=mt)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _gla_bwd_dA_kernel(v, do, dA, S, H, HQ, scale, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                           DT: tl.constexpr, PREC: tl.constexpr):
        """dA[t, s] = scale * do_t . v_s for s <= t (B, HQ, S, C) float32."""
        n = tl.program_id(0)
        ibq = tl.program_id(1).to(tl.int64)
        ib = ibq // HQ
        ih = (ibq % HQ) // (HQ // H)
        ibh = ib * H + ih
        ot = n * C + tl.arange(0, C)
        mt = ot < S
        oc = tl.arange(0, C)
        keep = (oc[:, None] >= oc[None, :]) & mt[:, None]
        acc = tl.zeros([C, C], dtype=tl.float32)
        for iv in range(0, tl.cdiv(V, BV)):
            ov = iv * BV + tl.arange(0, BV)
            mtv = mt[:, None] & (ov < V)[None, :]
            dd = tl.load(do + ibq * S * V + ot[:, None] * V + ov[None, :], mask=mtv, other=0)
            vv = tl.load(v + ibh * S * V + ot[:, None] * V + ov[None, :], mask=mtv, other=0)
            acc = tl.dot(dd.to(DT), tl.trans(vv).to(DT), acc, input_precision=PREC)
        tl.store(dA + ibq * S * C + ot[:, None] * C + oc[None, :], tl.where(keep, acc * scale, 0.0),
                 mask=mt[:, None])

    @triton.jit(do_not_specialize=_RUNTIME)
    def _gla_bwd_intra_kernel(q, k, gc, dA, dqi, dki, S, H, HQ, gcb,
                              K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                              PREC: tl.constexpr):
        """The within-chunk parts of dq (per query head) and dk (summed over the group) for one sub-chunk."""
        NC: tl.constexpr = C // BC
        ik = tl.program_id(0)
        pid = tl.program_id(1)
        ibh = tl.program_id(2).to(tl.int64)
        n = pid // NC
        i = pid % NC
        ib = ibh // H
        ih = ibh % H
        G = HQ // H
        r0 = n * C + i * BC
        if r0 >= S:
            return
        ob = tl.arange(0, BC)
        oi = r0 + ob
        mi = oi < S
        ok = ik * BK + tl.arange(0, BK)
        mk = ok < K
        mik = mi[:, None] & mk[None, :]
        kb = k + ibh * S * K
        gb = gc + ib * gcb + ih * S * K
        gi = tl.load(gb + oi[:, None] * K + ok[None, :], mask=mik, other=0)
        gr = tl.load(gb + r0 * K + ok, mask=mk, other=0)                      # first row of the sub-chunk
        gl = tl.load(gb + (tl.minimum(r0 + BC, S) - 1) * K + ok, mask=mk, other=0)  # its last row
        fast = tl.max(gr - gl, 0) < SPAN      # the diagonal blocks as products through a reference row
        ki = tl.load(kb + oi[:, None] * K + ok[None, :], mask=mik, other=0).to(tl.float32)
        dk = tl.zeros([BC, BK], dtype=tl.float32)
        for m in range(0, G):
            ibq = ib * HQ + ih * G + m
            qb = q + ibq * S * K
            dAb = dA + ibq * S * C
            dq = tl.zeros([BC, BK], dtype=tl.float32)
            for j in range(0, i):
                oj = n * C + j * BC + ob
                dAij = tl.load(dAb + oi[:, None] * C + (j * BC + ob)[None, :], mask=mi[:, None], other=0)
                kj = tl.load(kb + oj[:, None] * K + ok[None, :], mask=mk[None, :], other=0).to(tl.float32)
                gj = tl.load(gb + oj[:, None] * K + ok[None, :], mask=mk[None, :], other=0)
                dq = tl.dot(dAij, kj * tl.exp(gr[None, :] - gj), dq, input_precision=PREC)
            if fast:
                dAii = tl.load(dAb + oi[:, None] * C + (i * BC + ob)[None, :], mask=mi[:, None], other=0)
                dq = tl.dot(dAii, ki * tl.exp(tl.where(mik, gr[None, :] - gi, 0.0)), dq, input_precision=PREC)
                dq = dq * tl.exp(tl.where(mik, gi - gr[None, :], 0.0))
            else:
                dq = dq * tl.exp(tl.where(mik, gi - gr[None, :], 0.0))
                for c in range(0, BC):
                    s = r0 + c
                    ms = mk & ((ok * 0 + s) < S)
                    dAc = tl.load(dAb + oi * C + i * BC + c, mask=mi, other=0)
                    ks = tl.load(kb + s * K + ok, mask=ms, other=0).to(tl.float32)
                    gs = tl.load(gb + s * K + ok, mask=ms, other=0)
                    keep = ((oi >= s) & mi)[:, None]
                    dq += tl.where(keep, dAc[:, None] * ks[None, :] * tl.exp(tl.where(keep, gi - gs[None, :], 0.0)),
                                   0.0)
            tl.store(dqi + ibq * S * K + oi[:, None] * K + ok[None, :], dq, mask=mik)
            dkm = tl.zeros([BC, BK], dtype=tl.float32)
            for j in range(i + 1, NC):
                oj = n * C + j * BC + ob
                mj = oj < S
                mjk = mj[:, None] & mk[None, :]
                dAji = tl.load(dAb + oj[:, None] * C + (i * BC + ob)[None, :], mask=mj[:, None], other=0)
                qj = tl.load(qb + oj[:, None] * K + ok[None, :], mask=mjk, other=0).to(tl.float32)
                gj = tl.load(gb + oj[:, None] * K + ok[None, :], mask=mjk, other=0)
                dkm = tl.dot(tl.trans(dAji), qj * tl.exp(tl.where(mjk, gj - gl[None, :], 0.0)), dkm,
                             input_precision=PREC)
            if fast:
                dAii = tl.load(dAb + oi[:, None] * C + (i * BC + ob)[None, :], mask=mi[:, None], other=0)
                qi = tl.load(qb + oi[:, None] * K + ok[None, :], mask=mik, other=0).to(tl.float32)
                dkm = tl.dot(tl.trans(dAii), qi * tl.exp(tl.where(mik, gi - gl[None, :], 0.0)), dkm,
                             input_precision=PREC)
                dk += dkm * tl.exp(tl.where(mik, gl[None, :] - gi, 0.0))
            else:
                dk += dkm * tl.exp(tl.where(mik, gl[None, :] - gi, 0.0))
                for c in range(0, BC):
                    t = r0 + c
                    mt_ = (ob * 0 + t) < S
                    dAr = tl.load(dAb + t * C + i * BC + ob, mask=mt_, other=0)
                    qt = tl.load(qb + t * K + ok, mask=mk & ((ok * 0 + t) < S), other=0).to(tl.float32)
                    gt = tl.load(gb + t * K + ok, mask=mk & ((ok * 0 + t) < S), other=0)
                    keep = ((oi <= t) & mi & mt_)[:, None]
                    dk += tl.where(keep, dAr[:, None] * qt[None, :] * tl.exp(tl.where(keep, gt[None, :] - gi, 0.0)),
                                   0.0)
        tl.store(dki + ibh * S * K + oi[:, None] * K + ok[None, :], dk, mask=mik)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _gla_bwd_inter_kernel(q, k, v, do, gc, h, dh, dqi, dki, dq, dk, dg, S, H, HQ, gcb, scale,
                              K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                              BV: tl.constexpr, STORE_DG: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """dq, dk = the within-chunk parts + the state parts; dg = reverse cumsum of q dq - k dk + carry."""
        ik = tl.program_id(0)
        n = tl.program_id(1)
        ibh = tl.program_id(2).to(tl.int64)
        ib = ibh // H
        ih = ibh % H
        G = HQ // H
        NT = tl.cdiv(S, C)
        ot = n * C + tl.arange(0, C)
        mt = ot < S
        ok = ik * BK + tl.arange(0, BK)
        mk = ok < K
        mtk = mt[:, None] & mk[None, :]
        last = tl.minimum(n * C + C, S) - 1
        hbase = h + (ibh * NT + n) * K * V
        dhbase = dh + (ibh * NT + n) * K * V
        gb = gc + ib * gcb + ih * S * K
        gk = tl.load(gb + ot[:, None] * K + ok[None, :], mask=mtk, other=0)
        gl = tl.load(gb + last * K + ok, mask=mk, other=0)
        kk = tl.load(k + ibh * S * K + ot[:, None] * K + ok[None, :], mask=mtk, other=0).to(tl.float32)
        dkin = tl.zeros([C, BK], dtype=tl.float32)
        hd = tl.zeros([BK], dtype=tl.float32)
        for iv in range(0, tl.cdiv(V, BV)):
            ov = iv * BV + tl.arange(0, BV)
            mv = ov < V
            vv = tl.load(v + ibh * S * V + ot[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0)
            dhh = tl.load(dhbase + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0)
            dkin = tl.dot(vv.to(DT), tl.trans(dhh).to(DT), dkin, input_precision=PREC)
            if STORE_DG:
                hh = tl.load(hbase + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0)
                hd += tl.sum(hh.to(tl.float32) * dhh, 1)
        dkin = dkin * tl.exp(tl.where(mtk, gl[None, :] - gk, 0.0))
        dkk = tl.load(dki + ibh * S * K + ot[:, None] * K + ok[None, :], mask=mtk, other=0) + dkin
        tl.store(dk + ibh * S * K + ot[:, None] * K + ok[None, :], dkk.to(dk.dtype.element_ty), mask=mtk)
        dgv = -kk * dkk
        for m in range(0, G):
            ibq = ib * HQ + ih * G + m
            dqm = tl.zeros([C, BK], dtype=tl.float32)
            for iv in range(0, tl.cdiv(V, BV)):
                ov = iv * BV + tl.arange(0, BV)
                mv = ov < V
                dd = tl.load(do + ibq * S * V + ot[:, None] * V + ov[None, :], mask=mt[:, None] & mv[None, :], other=0)
                hh = tl.load(hbase + ok[:, None] * V + ov[None, :], mask=mk[:, None] & mv[None, :], other=0)
                dqm = tl.dot(dd.to(DT), tl.trans(hh).to(DT), dqm, input_precision=PREC)
            dqm = dqm * scale * tl.exp(gk)
            dqm += tl.load(dqi + ibq * S * K + ot[:, None] * K + ok[None, :], mask=mtk, other=0)
            tl.store(dq + ibq * S * K + ot[:, None] * K + ok[None, :], dqm.to(dq.dtype.element_ty), mask=mtk)
            if STORE_DG:
                qq = tl.load(q + ibq * S * K + ot[:, None] * K + ok[None, :], mask=mtk, other=0).to(tl.float32)
                dgv += qq * dqm
        if STORE_DG:
            carry = tl.exp(gl) * hd + tl.sum(kk * dkin, 0)
            rev = tl.sum(dgv, 0)[None, :] - tl.cumsum(dgv, 0) + dgv
            tl.store(dg + ibh * S * K + ot[:, None] * K + ok[None, :], rev + carry[None, :], mask=mtk)


# ======================================================================================================
# launchers
# ======================================================================================================
def _np2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


# Tiles and launch settings per kernel, from the sweep of benchmarks/gpu_linear.py on an H200 (bf16, D 128;
# results/gpu_linear_h200.json, "tune"). BK/BV None: 64, or 32 when 64 leaves the GPU under-filled.
TUNE: dict[str, dict] = {
    "fwd_h": dict(BK=None, BV=None, num_warps=4, num_stages=3),
    "fwd_o": dict(BK=64, BV=128, num_warps=8, num_stages=2),
    "gla_A": dict(BK=32, num_warps=4, num_stages=2),
    "bwd_dh": dict(BK=32, BV=32, num_warps=4, num_stages=2),
    "bwd_dv": dict(BK=64, BV=64, num_warps=4, num_stages=2),
    "bwd_dqk": dict(BK=64, BV=64, num_warps=4, num_stages=3),
    "gla_dA": dict(BV=64, num_warps=4, num_stages=3),
    "gla_intra": dict(BK=64, num_warps=2, num_stages=2),
    "gla_inter": dict(BK=64, BV=64, num_warps=4, num_stages=3),
}


def _sms(device) -> int:
    try:
        return torch.cuda.get_device_properties(device).multi_processor_count
    except Exception:  # noqa: BLE001 - CPU tensors under the interpreter
        return 132


class _Cfg:
    """Tile sizes, launch settings and the matrix operands' dtype/precision for one call."""

    def __init__(self, q, K: int, V: int, chunk: int, high_precision: bool, heads: int | None = None):
        self.C = chunk
        self.BC = min(SUB, chunk)
        self.K, self.V = K, V
        fp32 = q.dtype == torch.float32
        self.hp = high_precision or fp32
        self.interp = _interpreting()
        # (Triton's CPU interpreter multiplies bfloat16 operands wrongly: it gets them as float32, exactly.)
        self.DT = tl.float32 if self.hp or (self.interp and q.dtype == torch.bfloat16) else _tl_dtype(q.dtype)
        self.PREC = "tf32x3" if fp32 else "tf32"
        self.seq_programs = (heads or 1) * q.shape[0]
        self.sms = _sms(q.device) if q.is_cuda else 132

    def tile(self, n: int, want) -> int:
        return max(16, min(int(want), _np2(n)))

    def t(self, name: str) -> tuple[dict, dict]:
        """(constexpr tiles, launch kwargs) of kernel `name`."""
        spec = dict(TUNE[name])
        tiles = {}
        for key, n in (("BK", self.K), ("BV", self.V)):
            if key in spec:
                want = spec.pop(key)
                if want is None:  # the state kernels walk the chunks: enough programs to fill the GPU (64-wide tiles
                    # left B1 H16 K128 V128 with 64 programs for 132 SMs: GLA's fwd_h 1.83 ms vs fla's 1.09 at S64k)
                    big = self.seq_programs * triton.cdiv(self.K, 64) * triton.cdiv(self.V, 64) >= self.sms
                    want = 64 if big else 32
                if name == "bwd_dqk" and key == "BV" and self.K > 128:
                    # wide feature maps (based: 273 Taylor features): each program holds K-wide dq/dk tiles; narrower
                    # V tiles measured 37.5 vs 50.7 ms fwd+bwd at B4 H16 S8192 Dv128 on the H200 (BK 32/128: 44/43)
                    want = 32
                tiles[key] = self.tile(n, want)
        return tiles, ({} if self.interp else spec)


def _gate_kind(g, K: int) -> int:
    if g is None:
        return 0
    return 2 if g.dim() == 4 else 1


def _cumsum(g: torch.Tensor, S: int, cfg: _Cfg) -> torch.Tensor:
    """Chunk-local cumulative log gates, float32, contiguous (B', H, S[, K])."""
    per_dim = g.dim() == 4
    g4 = g if per_dim else g.unsqueeze(-1)
    bg, hh, _, w = g4.shape
    out = torch.empty(bg, hh, S, w, device=g.device, dtype=torch.float32)
    bw = max(16, min(64, _np2(w)))
    grid = (triton.cdiv(S, cfg.C), triton.cdiv(w, bw), bg * hh)
    _cumsum_kernel[grid](g4, out, S, *g4.stride(), hh, W=w, C=cfg.C, BW=bw)
    return out if per_dim else out.squeeze(-1)


def _gc_bstride(gc: torch.Tensor | None, B: int) -> int:
    if gc is None or gc.shape[0] == 1:
        return 0
    return gc.stride(0)


def _states(k, v, gc, gate, h0, store_final, state_dtype, cfg):
    B, H, S, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(S, cfg.C)
    h = torch.empty(B, H, NT, K, V, device=k.device, dtype=state_dtype)
    ht = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32) if store_final else h
    tiles, kw = cfg.t("fwd_h")
    grid = (triton.cdiv(V, tiles["BV"]), triton.cdiv(K, tiles["BK"]), B * H)
    gcx = gc if gc is not None else k
    _fwd_h_kernel[grid](k, v, gcx, h, h0 if h0 is not None else h, ht, S, H, _gc_bstride(gc, B),
                        K=K, V=V, C=cfg.C, GATE=gate, HAS_H0=h0 is not None,
                        STORE_HT=store_final, DT=cfg.DT, PREC=cfg.PREC, **tiles, **kw)
    return h, (ht if store_final else None)


def _gla_A(q, k, gc, H, cfg):
    B, HQ, S, K = q.shape
    A = torch.empty(B, HQ, S, cfg.C, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(S, cfg.C) * (cfg.C // cfg.BC), B * HQ)
    tiles, kw = cfg.t("gla_A")
    _gla_fwd_A_kernel[grid](q, k, gc, A, S, H, HQ, _gc_bstride(gc, B), K=K, C=cfg.C, BC=cfg.BC,
                            PREC=cfg.PREC, **tiles, **kw)
    return A


def chunk_decay_fwd(q, k, v, gc, scale: float, h0=None, output_final_state: bool = False, cfg: _Cfg | None = None,
                    keep_A: bool = False, zn=None):
    """q (B, HQ, S, K), k (B, H, S, K), v (B, H, S, V) contiguous; gc None or chunk-local cumulative log gates
    (B|1, H, S) / (B|1, H, S, K) float32; h0 None or (B, H, K, V) float32; zn None or, to normalise (no gates),
    the normaliser entering each chunk (B, H, NT, K) float32 -> (o, final state or None, A or None, the
    normaliser (B, HQ, S) float32 or None)."""
    B, HQ, S, K = q.shape
    H, V = k.shape[1], v.shape[-1]
    cfg = cfg or _Cfg(q, K, V, CHUNK, HIGH_PRECISION, H)
    gate = _gate_kind(gc, K)
    state_dtype = torch.float32 if cfg.hp else q.dtype
    h, ht = _states(k, v, gc, gate, h0, output_final_state, state_dtype, cfg)
    A = _gla_A(q, k, gc, H, cfg) if gate == 2 else None
    o = torch.empty(B, HQ, S, V, device=q.device, dtype=q.dtype)
    if zn is not None and gate:
        raise ValueError("chunk_decay_fwd: the normaliser (zn) is for ungated linear attention; got gates")
    den = torch.empty(B, HQ, S, device=q.device, dtype=torch.float32) if zn is not None else None
    tiles, kw = cfg.t("fwd_o")
    grid = (triton.cdiv(V, tiles["BV"]), triton.cdiv(S, cfg.C), B * HQ)
    gcx = gc if gc is not None else k
    _fwd_o_kernel[grid](q, k, v, gcx, h, A if A is not None else h, o, zn if zn is not None else h,
                        den if den is not None else h, S, H, HQ, _gc_bstride(gc, B), scale,
                        K=K, V=V, C=cfg.C, GATE=gate, NORM=zn is not None, DT=cfg.DT, PREC=cfg.PREC, **tiles, **kw)
    return o, ht, (A if keep_A else None), den


def chunk_decay_bwd(q, k, v, gc, scale: float, h0, do, dht, A=None, need_dg: bool = False, cfg: _Cfg | None = None,
                    grad_dtype: torch.dtype | None = None):
    """Gradients (dq, dk, dv, dg or None, dh0 or None) of `chunk_decay_fwd`; dg is dL/dg for the raw log gates
    (B, H, S[, K]) float32 (summing over a broadcast batch is the caller's); dq/dk in `grad_dtype` (default: the
    inputs')."""
    B, HQ, S, K = q.shape
    H, V = k.shape[1], v.shape[-1]
    cfg = cfg or _Cfg(q, K, V, CHUNK, HIGH_PRECISION, H)
    gate = _gate_kind(gc, K)
    need_dg = need_dg and gate != 0
    NT = triton.cdiv(S, cfg.C)
    gcb = _gc_bstride(gc, B)
    gcx = gc if gc is not None else k
    # states and their gradients accumulate in float32 and are stored per chunk in the inputs' dtype, as in the
    # forward (float32 under HIGH_PRECISION or float32 inputs): half the bytes the backward kernels move
    state_dtype = torch.float32 if cfg.hp else q.dtype
    h, _ = _states(k, v, gc, gate, h0, False, state_dtype, cfg)
    dh = torch.empty(B, H, NT, K, V, device=q.device, dtype=state_dtype)
    dh0 = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if h0 is not None else None
    tiles, kw = cfg.t("bwd_dh")
    grid = (triton.cdiv(V, tiles["BV"]), triton.cdiv(K, tiles["BK"]), B * H)
    _bwd_dh_kernel[grid](q, do, gcx, dh, dht if dht is not None else dh, dh0 if dh0 is not None else dh,
                         S, H, HQ, gcb, scale, K=K, V=V, C=cfg.C, GATE=gate,
                         HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, DT=cfg.DT, PREC=cfg.PREC, **tiles, **kw)
    if gate == 2 and A is None:
        A = _gla_A(q, k, gc, H, cfg)
    dv = torch.empty_like(v)
    tiles, kw = cfg.t("bwd_dv")
    grid = (triton.cdiv(V, tiles["BV"]), NT, B * H)
    _bwd_dv_kernel[grid](q, k, do, gcx, dh, A if A is not None else dh, dv, S, H, HQ, gcb, scale,
                         K=K, V=V, C=cfg.C, GATE=gate, DT=cfg.DT, PREC=cfg.PREC, **tiles, **kw)
    dq = torch.empty_like(q, dtype=grad_dtype or q.dtype)
    dk = torch.empty_like(k, dtype=grad_dtype or k.dtype)
    dg = None
    if gate != 2:
        tiles, kw = cfg.t("bwd_dqk")
        nk = triton.cdiv(K, tiles["BK"])
        dgp = torch.empty(nk, B * H, S, device=q.device, dtype=torch.float32) if need_dg else dh
        _bwd_dqk_kernel[(nk, NT, B * H)](q, k, v, do, gcx, h, dh, dq, dk, dgp, S, H, HQ, gcb, scale,
                                         K=K, V=V, C=cfg.C, GATE=gate, STORE_DG=need_dg,
                                         DT=cfg.DT, PREC=cfg.PREC, **tiles, **kw)
        if need_dg:
            dg = dgp.sum(0).view(B, H, S)
    else:
        dA = torch.empty(B, HQ, S, cfg.C, device=q.device, dtype=torch.float32)
        tiles, kw = cfg.t("gla_dA")
        _gla_bwd_dA_kernel[(NT, B * HQ)](v, do, dA, S, H, HQ, scale, V=V, C=cfg.C, DT=cfg.DT,
                                         PREC=cfg.PREC, **tiles, **kw)
        dqi = torch.empty(B, HQ, S, K, device=q.device, dtype=torch.float32)
        dki = torch.empty(B, H, S, K, device=q.device, dtype=torch.float32)
        tiles, kw = cfg.t("gla_intra")
        _gla_bwd_intra_kernel[(triton.cdiv(K, tiles["BK"]), NT * (cfg.C // cfg.BC), B * H)](
            q, k, gc, dA, dqi, dki, S, H, HQ, gcb, K=K, C=cfg.C, BC=cfg.BC, PREC=cfg.PREC, **tiles, **kw)
        dg = torch.empty(B, H, S, K, device=q.device, dtype=torch.float32) if need_dg else dh
        tiles, kw = cfg.t("gla_inter")
        _gla_bwd_inter_kernel[(triton.cdiv(K, tiles["BK"]), NT, B * H)](
            q, k, v, do, gc, h, dh, dqi, dki, dq, dk, dg, S, H, HQ, gcb, scale, K=K, V=V, C=cfg.C,
            STORE_DG=need_dg, DT=cfg.DT, PREC=cfg.PREC, **tiles, **kw)
        dg = dg if need_dg else None
    return dq, dk, dv, dg, dh0


# ======================================================================================================
# autograd
# ======================================================================================================
_WARNED: set[str] = set()


def _warn_once(where: str, err: BaseException) -> None:
    if where not in _WARNED:
        _WARNED.add(where)
        warnings.warn(f"attnzoo triton backend: the {where} kernels failed ({type(err).__name__}: {err}); "
                      "falling back to the torch chunk path (this warning is shown once)", RuntimeWarning,
                      stacklevel=3)


def _torch_chunk(q, k, v, g, scale, h0):
    """The torch chunk path (the shared engine) on the same operands, float32 state: the fallback."""
    from ...variants.linear._decay import decay_chunk

    B, H, _, K = k.shape
    state = h0 if h0 is not None else torch.zeros(B, H, K, v.shape[-1], device=q.device, dtype=torch.float32)
    o, st = decay_chunk(q, k, v, g, scale, state.float(), CHUNK)
    return o.to(q.dtype), st


class _ChunkDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, output_final_state):
        K, V = q.shape[-1], v.shape[-1]
        cfg = _Cfg(q, K, V, CHUNK, HIGH_PRECISION, k.shape[1])
        gc = _cumsum(g, q.shape[2], cfg) if g is not None else None
        keep_A = gc is not None and gc.dim() == 4 and any(ctx.needs_input_grad)
        o, ht, A, _ = chunk_decay_fwd(q, k, v, gc, scale, h0, output_final_state, cfg, keep_A=keep_A)
        ctx.save_for_backward(q, k, v, g, gc, h0, A)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, gc, h0, A = ctx.saved_tensors
        need_dg = g is not None and ctx.needs_input_grad[3]
        try:
            dq, dk, dv, dg, dh0 = _backward_kernels(q, k, v, gc, ctx.scale, h0, do.contiguous(),
                                                    None if dht is None else dht.contiguous(), A, need_dg)
        except Exception as err:  # noqa: BLE001 - any compile/launch failure falls back
            _warn_once("backward", err)
            dq, dk, dv, dg, dh0 = _backward_torch(q, k, v, g, ctx.scale, h0, do, dht)
        if dg is not None and g is not None:
            if dg.shape[0] != g.shape[0]:
                dg = dg.sum(0, keepdim=True)
            dg = dg.to(g.dtype)
        return dq, dk, dv, (dg if need_dg else None), dh0, None, None


def _backward_kernels(q, k, v, gc, scale, h0, do, dht, A, need_dg, grad_dtype=None):
    return chunk_decay_bwd(q, k, v, gc, scale, h0, do, dht, A, need_dg, grad_dtype=grad_dtype)


def _backward_torch(q, k, v, g, scale, h0, do, dht):
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (q, k, v, g, h0)]
        o, st = _torch_chunk(*leaves[:4], scale, leaves[4])
        outs, grads = [o], [do]
        if dht is not None:
            outs.append(st)
            grads.append(dht)
        wrt = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
        res = [next(got) if t is not None else None for t in leaves]
    return res[0], res[1], res[2], res[3], res[4]


def _launch(q, k, v, g, scale: float, h0, output_final_state: bool):
    """The kernels under autograd: (o (B, HQ, S, V) in q's dtype, final state float32 or None)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    h0 = None if h0 is None else h0.float().contiguous()
    return _ChunkDecay.apply(q, k, v, g, h0, float(scale), bool(output_final_state))


def chunk_decay(q, k, v, g=None, scale: float | None = None, initial_state=None, output_final_state: bool = False):
    """The decaying-state linear attention of `_decay.decay_chunk` through the Triton kernels: q (B, HQ, S, K),
    k (B, H, S, K), v (B, H, S, V), g None | (B|1, H, S) | (B|1, H, S, K) log gates <= 0 ->
    (o, final state (B, H, K, V) float32 or None). No fallback here: errors propagate."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _launch(q, k, v, g, scale, initial_state, output_final_state)


def _chunked(x: torch.Tensor, C: int) -> torch.Tensor:
    """(B, H, S, K) -> (B, H, NT, C, K), zero-padded to whole chunks (a view when S is a multiple of C)."""
    B, H, S, K = x.shape
    nt = -(-S // C)
    if nt * C > S:
        x = torch.nn.functional.pad(x, (0, 0, 0, nt * C - S))
    return x.reshape(B, H, nt, C, K)


def _running_sums(x: torch.Tensor, C: int, reverse: bool = False) -> torch.Tensor:
    """Inclusive sums of x (B, H, S, K) along S, from the start (or from the end), float32. Scanned inside chunks
    and across chunk totals: torch's scan along the S axis of this layout runs one thread per (B, H, K) column,
    measured 6 ms at B4 H16 S8192 K128 on an H200."""
    S = x.shape[2]
    xc = _chunked(x, C)
    within = xc.cumsum(3, dtype=torch.float32)
    totals = within[:, :, :, -1]
    if reverse:   # sum over u >= t: the chunk's total minus what came before t, plus the chunks after
        after = totals.flip(2).cumsum(2).flip(2) - totals
        out = totals.unsqueeze(3) - within + xc + after.unsqueeze(3)
    else:
        out = within + (totals.cumsum(2) - totals).unsqueeze(3)
    return out.flatten(2, 3)[:, :, :S]


def _normaliser_states(k, z0, C: int):
    """z_n, the normaliser entering each chunk (z0 + the keys of the chunks before), (B, H, NT, K) float32, and
    the final normaliser (B, H, K): O(S K), from per-chunk key sums."""
    per = _chunked(k, C).sum(3, dtype=torch.float32)
    inclusive = per.cumsum(2)
    if z0 is not None:
        inclusive = inclusive + z0.unsqueeze(2)
    return inclusive - per, inclusive[:, :, -1]


class _NormalisedChunk(torch.autograd.Function):
    """o_t = (q_t S_t) / (q_t z_t), S_t = S_0 + sum_{s <= t} k_s^T v_s, z_t = z_0 + sum_{s <= t} k_s (no gates).
    The kernels compute the numerator and the normaliser together (`_fwd_o_kernel`, NORM); the backward runs the
    numerator's kernels on do / den and adds the normaliser's terms in torch: with dden_t = -(do_t . o_t) / den_t,
    dq_t += dden_t z_t, dk_s += sum_{t >= s} dden_t q_t, dz_0 += sum_t dden_t q_t."""

    @staticmethod
    def forward(ctx, q, k, v, h0, z0, output_final_state):
        cfg = _Cfg(q, q.shape[-1], v.shape[-1], CHUNK, HIGH_PRECISION, k.shape[1])
        zn, zT = _normaliser_states(k, z0, cfg.C)
        o, ht, _, den = chunk_decay_fwd(q, k, v, None, 1.0, h0, output_final_state, cfg, zn=zn)
        ctx.save_for_backward(q, k, v, h0, z0, o, den)
        return o, ht, zT

    @staticmethod
    def backward(ctx, do, dht, dzT):
        q, k, v, h0, z0, o, den = ctx.saved_tensors
        rden = torch.where(den == 0, 0.0, 1.0 / den)
        try:
            do_num = (do.float() * rden.unsqueeze(-1)).to(q.dtype)
            dq, dk, dv, _, dh0 = _backward_kernels(q, k, v, None, 1.0, h0, do_num.contiguous(),
                                                   None if dht is None else dht.contiguous(), None, False,
                                                   grad_dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - any compile/launch failure falls back
            _warn_once("backward", err)
            return _normalised_backward_torch(q, k, v, h0, z0, do, dht, dzT)
        B, H, S, K = k.shape
        G = q.shape[1] // H
        dden = -(do.float() * o.float()).sum(-1) * rden                       # (B, HQ, S)
        zt = _running_sums(k, CHUNK)                                           # z_t without z_0
        if z0 is not None:
            zt = zt + z0.unsqueeze(2)
        dq = dq.view(B, H, G, S, K).addcmul_(dden.view(B, H, G, S, 1), zt.unsqueeze(2))
        qd = dden.view(B, H, G, S, 1) * q.view(B, H, G, S, K)
        qd = qd.sum(2) if G > 1 else qd.squeeze(2)                            # float32 (B, H, S, K)
        dk = dk.add_(_running_sums(qd, CHUNK, reverse=True))
        dz0 = qd.sum(2) if z0 is not None else None
        if dzT is not None:                                                    # z_T = z_0 + sum_s k_s
            dk = dk + dzT.unsqueeze(2)
            dz0 = dz0 + dzT if dz0 is not None else None
        return dq.view_as(q).to(q.dtype), dk.to(k.dtype), dv, dh0, dz0, None


def _normalised_backward_torch(q, k, v, h0, z0, do, dht, dzT):
    """`_NormalisedChunk`'s gradients through the torch chunk path (ones column for the normaliser): the fallback."""
    from ...variants.linear._decay import normalise, with_ones

    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (q, k, v, h0, z0)]
        lq, lk, lv, lh0, lz0 = leaves
        state = None
        if lh0 is not None or lz0 is not None:
            B, H, _, K = lk.shape
            s0 = lh0 if lh0 is not None else lk.new_zeros(B, H, K, lv.shape[-1], dtype=torch.float32)
            z = lz0 if lz0 is not None else lk.new_zeros(B, H, K, dtype=torch.float32)
            state = torch.cat([s0, z.unsqueeze(-1)], dim=-1)
        o, st = _torch_chunk(lq, lk, with_ones(lv), None, 1.0, state)
        outs, grads = [normalise(o)], [do]
        if dht is not None:
            outs.append(st[..., :-1])
            grads.append(dht)
        if dzT is not None:
            outs.append(st[..., -1])
            grads.append(dzT)
        wrt = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
        res = [next(got) if t is not None else None for t in leaves]
    return res[0], res[1], res[2], res[3], res[4], None


def chunk_normalised(q, k, v, initial_state=None, initial_normaliser=None, output_final_state: bool = False):
    """Normalised linear attention without gates through the kernels: q (B, HQ, S, K) features, k (B, H, S, K),
    v (B, H, S, V); initial state (B, H, K, V) and normaliser (B, H, K) or None -> (o in q's dtype, final state
    float32 or None, final normaliser (B, H, K) float32). Rows whose normaliser is 0 give zeros."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    z0 = None if initial_normaliser is None else initial_normaliser.float().contiguous()
    return _NormalisedChunk.apply(q, k, v, h0, z0, bool(output_final_state))


# ======================================================================================================
# the backend
# ======================================================================================================
def serves(cls) -> bool:
    return getattr(cls, "family", None) == "linear" and getattr(cls, "name", None) in SERVED


def why_not(variant, call, q) -> str | None:
    if not serves(type(variant)):
        return f"{variant.name}: the triton backend serves {list(SERVED)} (decaying-state linear attention) only"
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if q.device.type != "cuda":
        return f"triton kernels run on CUDA tensors; q is on {q.device}"
    opts = getattr(call, "options", None) or {}
    mode = opts.get("mode") or variant.default_mode
    if mode != "chunk":
        return f"the triton kernels are the chunk form; mode={mode!r} runs on the torch backend"
    if opts.get("cu_seqlens") is not None and variant.name == "cosine":
        return "cosine's packed sequences (cu_seqlens) run on the torch backend (its state counts the tokens seen)"
    if q.dtype not in DTYPES:
        return f"the triton kernels take float16/bfloat16/float32, got {q.dtype}"
    return None


class Operands(NamedTuple):
    """What the kernels compute for a variant: S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t;
    `norm`: divided by q_t z_t, z_t = z0 + sum_{s <= t} k_s (`chunk_normalised`); cosine's tokens seen before in n0."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor | None
    scale: float
    norm: bool
    h0: torch.Tensor | None     # (B, H, K, V): a normalised variant's state without its z column
    n0: torch.Tensor | None
    z0: torch.Tensor | None = None   # a normalised variant's initial z (the torch path's last state column)


def _operands(variant, q, k, v, call, h0=None) -> Operands:
    """Based's Taylor features in float32, then the inputs' dtype; linear's elementwise feature maps in the inputs'
    dtype; fixed decays as per-head log gates; cosine's values scaled by position and q/k L2-normalised."""
    s = call.shapes
    if variant.name == "gla":
        return Operands(q, k, v, call.inputs["g"], call.scale, False, h0, None)
    if variant.name in ("retention", "lightning"):
        like = torch.empty(0, dtype=torch.float64, device=q.device)
        logg = variant.decays(s.kv_heads, like).log().float()
        return Operands(q, k, v, logg.view(1, -1, 1).expand(1, s.kv_heads, s.sk), call.scale, False, h0, None)
    if variant.name == "cosine":
        from ...variants.linear.cosine.naive import l2_normalise, position_scaled_values, split_state

        n0 = torch.zeros(s.batch, s.kv_heads, 1, 1, device=q.device)
        if h0 is not None:
            h0, n0 = split_state(h0.float())
        vs = position_scaled_values(v, n0, variant.powers(s.kv_heads, n0), torch.float32).to(v.dtype)
        qk, kk = l2_normalise(q.float()).to(q.dtype), l2_normalise(k.float()).to(k.dtype)
        return Operands(qk, kk, vs, None, call.scale, False, h0, n0)
    if variant.name == "based":  # the Taylor features hold sqrt(scale): the kernels multiply by 1
        from ...variants.linear.based.naive import taylor_features

        fq, fk, scale = taylor_features(q.float(), call.scale), taylor_features(k.float(), call.scale), 1.0
    else:
        from ...variants.linear.linear.naive import FEATURE_MAPS

        phi = FEATURE_MAPS[variant.config["feature_map"]]   # elementwise: in the inputs' dtype (no float32 copies)
        fq, fk, scale = phi(q), phi(k), call.scale
    fq, fk = fq.to(q.dtype), fk.to(k.dtype)
    if not variant.config["normalize"]:
        return Operands(fq, fk, v, None, scale, False, h0, None)
    split = (None, None) if h0 is None else (h0[..., :-1], h0[..., -1])
    return Operands(fq, fk, v, None, 1.0, True, split[0], None, split[1])   # scale cancels in the ratio


def _run_kernels(call, op: Operands):
    s = call.shapes
    opts = getattr(call, "options", None) or {}
    final = bool(opts.get("output_final_state"))
    qk = op.q
    if s.sq < s.sk:  # cross pattern: queries are the last Sq positions; earlier keys only build the state
        qk = torch.cat([qk.new_zeros(s.batch, s.q_heads, s.sk - s.sq, qk.shape[-1]), qk], dim=2)
    if op.norm:
        o, ht, zT = chunk_normalised(qk, op.k, op.v, op.h0, op.z0, final)
        ht = torch.cat([ht, zT.unsqueeze(-1)], dim=-1) if final else None
    else:
        o, ht = _launch(qk, op.k, op.v, op.g, op.scale, op.h0, final)
    o = o[:, :, s.sk - s.sq:]
    if op.n0 is not None and ht is not None:  # cosine: the state carries the tokens seen as its last row
        from ...variants.linear.cosine.naive import join_state

        ht = join_state(ht, op.n0 + s.sk)
    return (o, ht) if opts.get("output_final_state") else o


def _quadratic(variant, call, h0) -> bool:
    """`based` without state in or out, up to based.PARALLEL_MAX_LEN keys: the quadratic-form kernels."""
    from . import based

    opts = getattr(call, "options", None) or {}
    return (variant.name == "based" and h0 is None and not opts.get("output_final_state")
            and call.shapes.sk <= based.PARALLEL_MAX_LEN)


def _groups(lengths: list[int], slack: float = 1.25) -> list[list[int]]:
    """Packed sequences grouped so that padding a group to its longest costs at most `slack` times its tokens:
    lists of sequence indices, longest first (so one long sequence and many short ones never pad to the long one)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        if groups:
            g = groups[-1]
            if (len(g) + 1) * lengths[g[0]] <= slack * (sum(lengths[j] for j in g) + lengths[i]):
                g.append(i)
                continue
        groups.append([i])
    return groups


def _run_packed(variant, q, k, v, call, segments, h0):
    """Packed sequences (B = 1, cu_seqlens): each group of `_groups` padded to its longest sequence and run as one
    batch, each sequence with its own initial and final state. Padded positions hold zero keys (after the feature
    map), values and log gates, so they change no state; their outputs are dropped."""
    final = bool(call.options.get("output_final_state"))
    lengths = [b - a for a, b in segments]
    per_token = variant.per_token_inputs()
    outs, positions, states, order = [], [], [], []
    for group in _groups(lengths):
        n, L = len(group), lengths[group[0]]
        starts = torch.tensor([segments[i][0] for i in group], device=q.device)
        t = torch.arange(L, device=q.device)
        valid = t[None, :] < torch.tensor([lengths[i] for i in group], device=q.device)[:, None]      # (n, L)
        idx = torch.where(valid, starts[:, None] + t[None, :], starts[:, None])

        def gather(x):  # (1, H, S, ...) -> (n, H, L, ...), zeros where padded
            xb = x[0][:, idx].transpose(0, 1)
            return xb * valid.view(n, 1, L, *([1] * (xb.dim() - 3)))

        qb, kb, vb = gather(q), gather(k), gather(v)
        cb = variant.prepare(qb, kb, vb, True, call.scale,
                             {name: gather(x) if name in per_token else x for name, x in call.inputs.items()})
        cb.options = {"mode": "chunk", "initial_state": None, "output_final_state": final, "cu_seqlens": None}
        h0b = None if h0 is None else h0[group]
        if _quadratic(variant, cb, h0b):
            from .based import based_parallel

            res = based_parallel(qb, kb, vb, cb.scale, bool(variant.config["normalize"]))
        else:
            op = _operands(variant, qb, kb, vb, cb, h0b)
            keep = valid[:, None, :, None]
            g = None if op.g is None else op.g * (keep if op.g.dim() == 4 else valid[:, None])
            res = _run_kernels(cb, op._replace(k=op.k * keep, v=op.v * keep, g=g))
        ob, st = res if final else (res, None)
        outs.append(ob.transpose(0, 1)[:, valid])                     # (HQ, tokens of the group, Dv)
        positions.append(idx[valid])
        states.append(st)
        order.extend(group)
    o = torch.cat(outs, 1)[:, torch.argsort(torch.cat(positions))].unsqueeze(0)
    if not final:
        return o
    return o, torch.cat(states)[torch.argsort(torch.tensor(order, device=q.device))]


def run(variant, q, k, v, call):
    s = call.shapes
    opts = getattr(call, "options", None) or {}
    # the torch path's checks and messages (outside the fallback)
    segments = variant._segments(opts["cu_seqlens"], s) if opts.get("cu_seqlens") is not None else None
    h0 = opts.get("initial_state")
    if h0 is not None:
        h0 = variant._check_state(h0, s.batch if segments is None else len(segments), s, q)
    if segments is not None:
        def kernels():
            return _run_packed(variant, q, k, v, call, segments, h0)
    elif _quadratic(variant, call, h0):
        from .based import based_parallel

        def kernels():
            return based_parallel(q, k, v, call.scale, bool(variant.config["normalize"]),
                                  fallback=lambda *qkv: variant.forward_torch(*qkv, call))
    else:
        operands = _operands(variant, q, k, v, call, h0)  # the variant's own checks (cosine's count row) raise here

        def kernels():
            return _run_kernels(call, operands)
    try:
        return kernels()
    except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or launch falls back
        _warn_once("forward", err)
        return variant.forward_torch(q, k, v, call)


def backend():
    from ...core.dispatch import Backend

    return Backend("triton", 40, why_not, run, serves=serves,
                   doc="Triton chunk kernels for decaying-state linear attention (gla, retention, lightning, "
                       "linear, based, cosine): forward and backward, on CUDA")


__all__ = ["chunk_decay", "chunk_normalised", "chunk_decay_fwd", "chunk_decay_bwd", "why_not", "run", "serves",
           "backend", "CHUNK", "HIGH_PRECISION", "TUNE"]
