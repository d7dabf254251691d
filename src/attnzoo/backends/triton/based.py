"""Triton kernels for Based's linear attention in its parallel (quadratic) form, the definition of
`variants/linear/based/naive.py` computed tile by tile without the 1 + D + D^2 Taylor features:

    s_ij = scale * q_i . k_j,    a_ij = 1 + s_ij + s_ij^2 / 2   (j <= i),
    z_i  = sum_j a_ij,           o_i  = sum_j a_ij v_j / z_i      (normalize=False: o_i = sum_j a_ij v_j).

Like FlashAttention with exp replaced by the Taylor polynomial, and simpler: a is a polynomial, so there is no
running maximum; z is the row sum. Work is O(S^2 (D + Dv)) against the chunk form's O(S F Dv) with
F = 1 + D + D^2 features (273 for D = 16): at Based's small D the quadratic form is the faster one up to
`PARALLEL_MAX_LEN` tokens (measured on an H200 by benchmarks/gpu_linear.py --only-feature-maps), the chunk
kernels beyond.

Backward, with P = a / z (normalised) and delta_i = do_i . o_i:
    dv_j = sum_i P_ij do_i,    da_ij = (do_i . v_j - delta_i) / z_i   (unnormalised: do_i . v_j),
    ds_ij = da_ij (1 + s_ij),  dq_i = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i.
Two kernels as in FlashAttention-2: dK/dV per key tile (the group's query heads summed in-kernel: GQA without
copies or atomics) and dQ per query tile. Queries are the last Sq of Sk positions (bottom-right causal).
"""
from __future__ import annotations

import torch

from .linear import _interpreting, _np2, _tl_dtype, _warn_once, tl, triton

# Sk up to which `based` without state in or out runs these kernels rather than the chunk kernels
PARALLEL_MAX_LEN = 32768
# tiles and launch settings (forward, dK/dV, dQ), from the sweep in benchmarks/gpu_linear.py on an H200
TUNE: dict[str, dict] = {
    "fwd": dict(BM=64, BN=64, num_warps=4, num_stages=3),
    "dkdv": dict(BM=128, BN=64, num_warps=4, num_stages=2),
    "dq": dict(BM=128, BN=64, num_warps=8, num_stages=3),
}

if triton is not None:
    _RUNTIME = ["SQ", "SK", "HQ", "G"]

    @triton.jit
    def _query_tile(q, SQ, SK, HQ, G, D: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr):
        """This program's query tile: (flat query head, its flat KV head, Sk - Sq, rows, dims, value dims, row mask,
        the q tile)."""
        im = tl.program_id(0)
        ibh = tl.program_id(1).to(tl.int64)
        ikv = ibh // HQ * (HQ // G) + (ibh % HQ) // G
        om = im * BM + tl.arange(0, BM)
        od = tl.arange(0, BD)
        mm = om < SQ
        qt = tl.load(q + ibh * SQ * D + om[:, None] * D + od[None, :], mask=mm[:, None] & (od < D)[None, :], other=0)
        return ibh, ikv, SK - SQ, om, od, tl.arange(0, BDV), mm, qt

    @triton.jit(do_not_specialize=_RUNTIME)
    def _fwd_kernel(q, k, v, o, rz, SQ, SK, HQ, G, scale,
                    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, NORM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """o (and 1 / z, float32, 0 where z = 0) for one query tile of one query head."""
        im = tl.program_id(0)
        ibh, ikv, off, om, od, odv, mm, qt = _query_tile(q, SQ, SK, HQ, G, D, BD, BDV, BM)
        kb = k + ikv * SK * D
        vb = v + ikv * SK * DV
        acc = tl.zeros([BM, BDV], dtype=tl.float32)
        zs = tl.zeros([BM], dtype=tl.float32)
        qpos = om + off
        full_end = tl.maximum(im * BM + off + 1, 0) // BN * BN   # key tiles wholly below the tile's first query
        hi = tl.minimum(im * BM + BM + off, SK)
        for start in range(0, hi, BN):
            on = start + tl.arange(0, BN)
            kt = tl.load(kb + on[None, :] * D + od[:, None], mask=(on < SK)[None, :] & (od < D)[:, None], other=0)
            vt = tl.load(vb + on[:, None] * DV + odv[None, :], mask=(on < SK)[:, None] & (odv < DV)[None, :], other=0)
            s = tl.dot(qt.to(DT), kt.to(DT), input_precision=PREC) * scale
            a = 1.0 + s + 0.5 * s * s
            if start >= full_end:
                a = tl.where((on[None, :] <= qpos[:, None]) & (on < SK)[None, :], a, 0.0)
            zs += tl.sum(a, axis=1)
            acc = tl.dot(a.to(DT), vt.to(DT), acc, input_precision=PREC)
        if NORM:
            r = tl.where(zs == 0, 0.0, 1.0 / tl.where(zs == 0, 1.0, zs))
            acc = acc * r[:, None]
            tl.store(rz + ibh * SQ + om, r, mask=mm)
        tl.store(o + ibh * SQ * DV + om[:, None] * DV + odv[None, :], acc.to(o.dtype.element_ty),
                 mask=mm[:, None] & (odv < DV)[None, :])

    @triton.jit(do_not_specialize=_RUNTIME)
    def _dkdv_kernel(q, k, v, do, rz, delta, dk, dv, SQ, SK, HQ, G, scale,
                     D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, NORM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """dk, dv for one key tile of one KV head, summed over the group's query heads. Rows and columns past
        SQ / SK need no mask: their q, k, do, v, delta and 1/z load as 0, so they add nothing kept."""
        jn = tl.program_id(0)
        ikv = tl.program_id(1).to(tl.int64)
        H = HQ // G
        ib = ikv // H
        off = SK - SQ
        on = jn * BN + tl.arange(0, BN)
        od = tl.arange(0, BD)
        odv = tl.arange(0, BDV)
        mn = on < SK
        md = (od < D)[None, :]
        mdv = (odv < DV)[None, :]
        kt = tl.load(k + ikv * SK * D + on[:, None] * D + od[None, :], mask=mn[:, None] & md, other=0)
        vt = tl.load(v + ikv * SK * DV + on[:, None] * DV + odv[None, :], mask=mn[:, None] & mdv, other=0)
        dk_acc = tl.zeros([BN, BD], dtype=tl.float32)
        dv_acc = tl.zeros([BN, BDV], dtype=tl.float32)
        lo = tl.maximum(jn * BN - off, 0) // BM * BM               # the first query tile that sees this key tile
        free = tl.maximum(jn * BN + BN - 1 - off, 0)               # query tiles from here on see all its keys
        for g in range(0, G):
            ihq = ib * HQ + (ikv % H) * G + g
            for start in range(lo, SQ, BM):
                om = start + tl.arange(0, BM)
                mm = om < SQ
                qt = tl.load(q + ihq * SQ * D + om[None, :] * D + od[:, None], mask=mm[None, :] & (od < D)[:, None],
                             other=0)                                   # (BD, BM)
                dot_ = tl.load(do + ihq * SQ * DV + om[:, None] * DV + odv[None, :], mask=mm[:, None] & mdv, other=0)
                sT = tl.dot(kt.to(DT), qt.to(DT), input_precision=PREC) * scale        # (BN, BM)
                aT = 1.0 + sT + 0.5 * sT * sT
                dpT = tl.dot(vt.to(DT), tl.trans(dot_).to(DT), input_precision=PREC)  # do_i . v_j, (BN, BM)
                if NORM:
                    ri = tl.load(rz + ihq * SQ + om, mask=mm, other=0.0)
                    di = tl.load(delta + ihq * SQ + om, mask=mm, other=0.0)
                    aT = aT * ri[None, :]
                    dpT = (dpT - di[None, :]) * ri[None, :]
                dsT = dpT * (1.0 + sT)
                if start < free:                                        # the diagonal: causal mask
                    keep = on[:, None] <= (om + off)[None, :]
                    aT = tl.where(keep, aT, 0.0)
                    dsT = tl.where(keep, dsT, 0.0)
                dv_acc = tl.dot(aT.to(DT), dot_.to(DT), dv_acc, input_precision=PREC)
                dk_acc = tl.dot(dsT.to(DT), tl.trans(qt).to(DT), dk_acc, input_precision=PREC)
        tl.store(dk + ikv * SK * D + on[:, None] * D + od[None, :], (dk_acc * scale).to(dk.dtype.element_ty),
                 mask=mn[:, None] & md)
        tl.store(dv + ikv * SK * DV + on[:, None] * DV + odv[None, :], dv_acc.to(dv.dtype.element_ty),
                 mask=mn[:, None] & mdv)

    @triton.jit(do_not_specialize=_RUNTIME)
    def _dq_kernel(q, k, v, do, rz, delta, dq, SQ, SK, HQ, G, scale,
                   D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, NORM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """dq for one query tile of one query head."""
        im = tl.program_id(0)
        ibh, ikv, off, om, od, odv, mm, qt = _query_tile(q, SQ, SK, HQ, G, D, BD, BDV, BM)
        dot_ = tl.load(do + ibh * SQ * DV + om[:, None] * DV + odv[None, :], mask=mm[:, None] & (odv < DV)[None, :],
                       other=0)
        if NORM:
            ri = tl.load(rz + ibh * SQ + om, mask=mm, other=0.0)
            di = tl.load(delta + ibh * SQ + om, mask=mm, other=0.0)
        kb = k + ikv * SK * D
        vb = v + ikv * SK * DV
        acc = tl.zeros([BM, BD], dtype=tl.float32)
        qpos = om + off
        full_end = tl.maximum(im * BM + off + 1, 0) // BN * BN
        hi = tl.minimum(im * BM + BM + off, SK)
        for start in range(0, hi, BN):
            on = start + tl.arange(0, BN)
            kt = tl.load(kb + on[:, None] * D + od[None, :], mask=(on < SK)[:, None] & (od < D)[None, :], other=0)
            vt = tl.load(vb + on[None, :] * DV + odv[:, None], mask=(on < SK)[None, :] & (odv < DV)[:, None], other=0)
            s = tl.dot(qt.to(DT), tl.trans(kt).to(DT), input_precision=PREC) * scale
            dp = tl.dot(dot_.to(DT), vt.to(DT), input_precision=PREC)
            if NORM:
                dp = (dp - di[:, None]) * ri[:, None]
            ds = dp * (1.0 + s)
            if start >= full_end:
                ds = tl.where((on[None, :] <= qpos[:, None]) & (on < SK)[None, :], ds, 0.0)
            acc = tl.dot(ds.to(DT), kt.to(DT), acc, input_precision=PREC)
        tl.store(dq + ibh * SQ * D + om[:, None] * D + od[None, :], (acc * scale).to(dq.dtype.element_ty),
                 mask=mm[:, None] & (od < D)[None, :])


def _settings(name: str, q) -> tuple[dict, dict]:
    spec = dict(TUNE[name])
    tiles = {n: spec.pop(n) for n in ("BM", "BN")}
    if _interpreting():
        return {n: min(t, 32) for n, t in tiles.items()}, {}   # the interpreter: small tiles, no launch settings
    return tiles, spec


def _common(q, k, v):
    D, DV = q.shape[-1], v.shape[-1]
    fp32 = q.dtype == torch.float32
    # Triton's CPU interpreter multiplies bfloat16 operands wrongly: give it float32 operands
    dt = tl.float32 if fp32 or (_interpreting() and q.dtype == torch.bfloat16) else _tl_dtype(q.dtype)
    return dict(D=D, DV=DV, BD=max(16, _np2(D)), BDV=max(16, _np2(DV)), DT=dt, PREC="tf32x3" if fp32 else "tf32")


def based_fwd(q, k, v, scale: float, normalize: bool):
    """q (B, HQ, SQ, D), k (B, H, SK, D), v (B, H, SK, DV) contiguous -> (o in q's dtype, 1 / z float32 (B, HQ, SQ),
    0 where z = 0; unset when not normalised)."""
    B, HQ, SQ, _ = q.shape
    H, SK = k.shape[1], k.shape[2]
    o = torch.empty(B, HQ, SQ, v.shape[-1], device=q.device, dtype=q.dtype)
    rz = torch.empty(B, HQ, SQ, device=q.device, dtype=torch.float32)
    tiles, kw = _settings("fwd", q)
    _fwd_kernel[(triton.cdiv(SQ, tiles["BM"]), B * HQ)](q, k, v, o, rz, SQ, SK, HQ, HQ // H, scale, NORM=normalize,
                                                        **_common(q, k, v), **tiles, **kw)
    return o, rz


def based_bwd(q, k, v, o, rz, do, scale: float, normalize: bool):
    """(dq, dk, dv) of `based_fwd`, in the inputs' dtypes."""
    B, HQ, SQ, _ = q.shape
    H, SK = k.shape[1], k.shape[2]
    delta = (do.float() * o.float()).sum(-1) if normalize else rz
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = _common(q, k, v)
    tiles, kw = _settings("dkdv", q)
    _dkdv_kernel[(triton.cdiv(SK, tiles["BN"]), B * H)](q, k, v, do, rz, delta, dk, dv, SQ, SK, HQ, HQ // H, scale,
                                                         NORM=normalize, **common, **tiles, **kw)
    tiles, kw = _settings("dq", q)
    _dq_kernel[(triton.cdiv(SQ, tiles["BM"]), B * HQ)](q, k, v, do, rz, delta, dq, SQ, SK, HQ, HQ // H, scale,
                                                       NORM=normalize, **common, **tiles, **kw)
    return dq, dk, dv


class _BasedParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, normalize, fallback):
        o, rz = based_fwd(q, k, v, scale, normalize)
        ctx.save_for_backward(q, k, v, o, rz)
        ctx.scale, ctx.normalize, ctx.fallback = scale, normalize, fallback
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, rz = ctx.saved_tensors
        try:
            dq, dk, dv = based_bwd(q, k, v, o, rz, do.contiguous(), ctx.scale, ctx.normalize)
        except Exception as err:  # noqa: BLE001 - a backward kernel that fails falls back to the torch path
            if ctx.fallback is None:
                raise
            _warn_once("based backward", err)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                dq, dk, dv = torch.autograd.grad(ctx.fallback(*leaves), leaves, do)
        return dq, dk, dv, None, None, None


def based_parallel(q, k, v, scale: float, normalize: bool = True, fallback=None) -> torch.Tensor:
    """Based's causal linear attention (no state in or out) through the quadratic-form kernels: q (B, HQ, SQ, D),
    k (B, H, SK, D), v (B, H, SK, DV) with SQ <= SK, queries the last SQ positions -> o (B, HQ, SQ, DV).
    `fallback(q, k, v)`, the same computation in torch, gives the gradients if the backward kernels fail."""
    return _BasedParallel.apply(q.contiguous(), k.contiguous(), v.contiguous(), float(scale), bool(normalize),
                                fallback)


__all__ = ["based_parallel", "based_fwd", "based_bwd", "PARALLEL_MAX_LEN", "TUNE"]
