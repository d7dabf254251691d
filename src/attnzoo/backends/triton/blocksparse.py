"""Triton kernels for exact softmax attention over a block-sparse structure: every mask variant (windows, sinks,
documents, prefix-LM, block-RAG, dilated and per-head windows, neighborhoods, ...) on CUDA, forward and backward.

The variant's block structure (`core/blocks.py`, what the torch and flex backends use) is turned into a `Layout`
for BLOCK_M x BLOCK_N tiles (128 queries x 64 keys; built in `tables.py`):

- per (batch', head', query block): the key blocks whose tile the mask leaves full (no mask work), and the key
  blocks of partial tiles, each with a tile id;
- per partial tile, its mask as bits (BLOCK_M rows of BLOCK_N / 32 int32 words), evaluated once from the
  variant's own mask function on that tile only: any mask the variant can write is exact in the kernel, and
  the kernel's cost per partial tile is one 1 KB load;
- the same lists transposed (per key block: its query blocks) for the dK/dV kernel.

Causality, bottom-right alignment (query i at position i + Sk - Sq) and the ends of the sequences are part of
the bits (the last key tile of a ragged Sk is always partial). Layouts are cached per (configuration, shapes,
causal, device) and rebuilt only when the call's inputs change (`reuse.InputsKey`): a repeated call does no
host work beyond the launch. Building one reads the number of partial tiles (one device sync per build).

Kernels (FlashAttention-2's algorithm, our code): `_fwd` (one program per query block and query head: online
softmax in base 2 over the full then the partial tiles; saves the log-sum-exp), `_bwd_delta` (rowsum(O dO)),
`_bwd_dq` (the forward's walk, dQ = dS K), `_bwd_dkdv` (one program per key block and KV head, walking every query
head of its group over the transposed lists of a second layout of 64 x 128 tiles, so its products have 128 rows:
GQA without repeating K/V; a key block with far more query tiles than the mean, a sink, is split over several
programs that add into float32 accumulators). Rows with no allowed key give zeros and zero gradients.
K/V (forward, dQ) and Q/dO (dK/dV) tiles come through tensor descriptors (Hopper's copy engine) on large calls
whose head dims are powers of two, else through pointers (`OPTIONS`).
A dilated window whose heads share one lattice runs as `dilation` bands on strided views of the queries and keys
of each residue class (`LatticeSparse`; the kernels index batch, class, head and position, so one launch runs
every class where the dilation divides the lengths): its tiles hold only allowed lattice points, where the whole
sequence's tiles are 1/dilation allowed.
If a kernel fails to compile or launch, the call falls back to flex (CUDA) or torch with a one-time warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ...core.checks import Shapes
from ...core.variant import Call, SoftmaxVariant
from .linear import _interpreting
from .tables import Layout, build_layout, layout_for, stats, tile_lists  # noqa: F401 - re-exported

try:
    import triton
    import triton.language as tl

    TRITON_ERROR: str | None = None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # a triton without host-side tensor descriptors: the forward reads through pointers
        TensorDescriptor = None
except ImportError as _err:  # pragma: no cover - exercised where triton is absent
    triton = tl = TensorDescriptor = None
    TRITON_ERROR = f"triton is not importable ({_err})"

BLOCK_M = 128  # queries a tile (forward and dQ)
BLOCK_N = 64   # keys a tile (a multiple of 32: one int32 word per 32 keys of a mask row)
# dK/dV walk the transposed lists of their own layout, 64 queries x 128 keys, so that every product of that
# kernel has 128 rows (the key block), as FlashAttention-2's backward; its tables are built at the first backward.
BWD_BLOCK_M = 64
BWD_BLOCK_N = 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- kernels ----------------------------------------------------------------------------------------------------------

if triton is not None:
    _KEYS = ["BD", "BDV", "BM", "BN"]
    # sizes that change between calls: not specialised on (no recompilation, and no autotuning, per length)
    _RUNTIME = ["sq", "sk", "hq", "hkv", "group", "row_b", "row_h", "nmax", "nc"]

    def _configs(kind: str):
        if _interpreting():
            return [triton.Config({}, num_warps=4, num_stages=1)]
        if kind == "fwd":
            return [triton.Config({}, num_warps=w, num_stages=st) for w, st in ((8, 3), (4, 3), (8, 2), (8, 4))]
        return [triton.Config({}, num_warps=w, num_stages=st) for w, st in ((8, 2), (4, 2), (8, 3))]

    def _autotune(kind: str):
        keys = _KEYS + ["TMA", "WS"] if kind == "fwd" else _KEYS + ["TMA"]
        try:
            return triton.autotune(_configs(kind), key=keys, cache_results=True)
        except TypeError:  # a triton without the on-disk autotune cache
            return triton.autotune(_configs(kind), key=keys)

    @triton.jit
    def _tile_allowed(BITS, tile, BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr):
        """bool (BM, BN): the partial tile's mask from its bits (W loads of BM words, spread over the columns)."""
        rows = (tile * BM + tl.arange(0, BM)) * W
        cols = tl.arange(0, BN)
        bits = tl.zeros([BM, BN], tl.int32)
        for w in tl.static_range(W):
            word = tl.load(BITS + rows + w)
            bits = tl.where((cols // 32 == w)[None, :], word[:, None] >> (cols % 32)[None, :], bits)
        return (bits & 1) != 0

    @triton.jit
    def _tile_allowed_t(BITS, tile, BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr):
        """bool (BN, BM): the partial tile's mask, transposed (keys x queries)."""
        rows = (tile * BM + tl.arange(0, BM)) * W
        cols = tl.arange(0, BN)
        bits = tl.zeros([BN, BM], tl.int32)
        for w in tl.static_range(W):
            word = tl.load(BITS + rows + w)
            bits = tl.where((cols // 32 == w)[:, None], word[None, :] >> (cols % 32)[:, None], bits)
        return (bits & 1) != 0

    @triton.jit
    def _online_step(acc, m_i, l_i, s, v, qk_scale, MASKED: tl.constexpr, PREC: tl.constexpr):
        """One key tile of the online softmax in base 2. `s` holds the unscaled scores (-inf where masked), so
        that the scale folds into the exponent's multiply-add; `m_i` is in scaled units."""
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        else:  # a full tile gives every row a finite maximum
            m_use = m_new
        p = tl.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        return acc, m_new, l_i

    @triton.jit
    def _desc_pair(desc_x, desc_y, b, c, h, row0, ROWS: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr,
                   TMA: tl.constexpr):
        """x transposed (BX, ROWS) and y (ROWS, BY) of rows [row0, row0 + ROWS) through tensor descriptors of rank
        TMA (5 with a class dimension); rows past the end read as zeros."""
        if TMA == 5:
            x = desc_x.load([b, c, h, row0, 0]).reshape(ROWS, BX).T
            y = desc_y.load([b, c, h, row0, 0]).reshape(ROWS, BY)
        else:
            x = desc_x.load([b, h, row0, 0]).reshape(ROWS, BX).T
            y = desc_y.load([b, h, row0, 0]).reshape(ROWS, BY)
        return x, y

    @triton.jit
    def _kv_tile(k_base, v_base, desc_k, desc_v, b, c, hk, jn, sk, s_ks, s_vs,
                 D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr,
                 TMA: tl.constexpr, EDGE: tl.constexpr):
        """K transposed (BD, BN) and V (BN, BDV) of key block `jn`: through the tensor-memory accelerator (TMA = the
        descriptors' rank, 5 with classes; reads past Sk give zeros) or through pointers (TMA = 0; masked past Sk
        where EDGE)."""
        if TMA:
            k, v = _desc_pair(desc_k, desc_v, b, c, hk, jn * BN, BN, BD, BDV, TMA)
        else:
            kn = jn * BN + tl.arange(0, BN)
            offs_d = tl.arange(0, BD)
            offs_dv = tl.arange(0, BDV)
            if EDGE:
                k = tl.load(k_base + kn[None, :] * s_ks + offs_d[:, None], mask=(offs_d[:, None] < D) & (kn[None, :] < sk),
                            other=0.0)
                v = tl.load(v_base + kn[:, None] * s_vs + offs_dv[None, :],
                            mask=(offs_dv[None, :] < DV) & (kn[:, None] < sk), other=0.0)
            else:
                k = tl.load(k_base + kn[None, :] * s_ks + offs_d[:, None], mask=offs_d[:, None] < D, other=0.0)
                v = tl.load(v_base + kn[:, None] * s_vs + offs_dv[None, :], mask=offs_dv[None, :] < DV, other=0.0)
        return k, v

    @triton.jit
    def _split(bh, heads, nc):
        """Program axis 1 = (batch, class, head): the ids. Classes are the residue classes of a dilated mask
        (strided views sharing one table), nc = 1 otherwise."""
        bc = bh // heads
        return bc // nc, bc % nc, bh % heads

    @triton.jit
    def _at(b, c, h, s_b, s_c, s_h):
        return b.to(tl.int64) * s_b + c.to(tl.int64) * s_c + h * s_h

    @triton.jit
    def _query_program(Q, K, V, sq, hq, nc, group, row_b, row_h, s_qb, s_qc, s_qh, s_qs, s_kb, s_kc, s_kh, s_vb, s_vc,
                       s_vh, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
        """A (query block, batch x class x query head) program: its ids, table row, queries and K/V head bases.
        Query blocks run last to first: under causality the longest rows start first."""
        i = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        b, c, h = _split(bh, hq, nc)
        hk = h // group
        offs_m = i * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        q = tl.load(Q + _at(b, c, h, s_qb, s_qc, s_qh) + offs_m[:, None] * s_qs + offs_d[None, :],
                    mask=(offs_m[:, None] < sq) & (offs_d[None, :] < D), other=0.0)
        return (bh, b, c, h, b * row_b + h * row_h + i, offs_m, q, K + _at(b, c, hk, s_kb, s_kc, s_kh),
                V + _at(b, c, hk, s_vb, s_vc, s_vh))

    @_autotune("fwd")
    @triton.jit(do_not_specialize=_RUNTIME[:3] + _RUNTIME[4:])
    def _fwd(Q, K, V, O, LSE, FN, FI, PN, PI, PT, BITS, desc_k, desc_v,
             sq, sk, hq, group, qk_scale, row_b, row_h, nmax, nc,
             s_qb, s_qc, s_qh, s_qs, s_kb, s_kc, s_kh, s_ks, s_vb, s_vc, s_vh, s_vs, s_ob, s_oc, s_oh, s_os,
             D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, PREC: tl.constexpr,
             TMA: tl.constexpr, WS: tl.constexpr):
        bh, b, c, h, r, offs_m, q, k_base, v_base = _query_program(
            Q, K, V, sq, hq, nc, group, row_b, row_h, s_qb, s_qc, s_qh, s_qs, s_kb, s_kc, s_kh, s_vb, s_vc, s_vh,
            D, BD, BM)
        hk = h // group
        offs_dv = tl.arange(0, BDV)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BDV], tl.float32)
        for j in tl.range(tl.load(FN + r), warp_specialize=WS):
            k, v = _kv_tile(k_base, v_base, desc_k, desc_v, b, c, hk, tl.load(FI + r * nmax + j), sk, s_ks, s_vs,
                            D, DV, BD, BDV, BN, TMA, False)
            acc, m_i, l_i = _online_step(acc, m_i, l_i, tl.dot(q, k, input_precision=PREC), v, qk_scale, False, PREC)
        for j in tl.range(tl.load(PN + r), warp_specialize=WS):
            k, v = _kv_tile(k_base, v_base, desc_k, desc_v, b, c, hk, tl.load(PI + r * nmax + j), sk, s_ks, s_vs,
                            D, DV, BD, BDV, BN, TMA, True)
            s = tl.where(_tile_allowed(BITS, tl.load(PT + r * nmax + j), BM, BN, W),
                         tl.dot(q, k, input_precision=PREC), float("-inf"))
            acc, m_i, l_i = _online_step(acc, m_i, l_i, s, v, qk_scale, True, PREC)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        # base-2 log-sum-exp of the scaled scores; +inf on empty rows makes every backward weight 0
        lse = tl.where(empty, float("inf"), m_use + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(O + _at(b, c, h, s_ob, s_oc, s_oh) + offs_m[:, None] * s_os + offs_dv[None, :],
                 out.to(O.dtype.element_ty), mask=(offs_m[:, None] < sq) & (offs_dv[None, :] < DV))
        tl.store(LSE + bh.to(tl.int64) * sq + offs_m, lse, mask=offs_m < sq)

    @_autotune("bwd")
    @triton.jit(do_not_specialize=_RUNTIME[:3] + _RUNTIME[4:])
    def _bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, FN, FI, PN, PI, PT, BITS, desc_k, desc_v,
                sq, sk, hq, group, qk_scale, scale, row_b, row_h, nmax, nc,
                s_qb, s_qc, s_qh, s_qs, s_kb, s_kc, s_kh, s_ks, s_vb, s_vc, s_vh, s_vs, s_ob, s_oc, s_oh, s_os,
                D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
        """dQ of one query block; DO and DQ share Q's / O's strides (s_o* for DO)."""
        bh, b, c, h, r, offs_m, q, k_base, v_base = _query_program(
            Q, K, V, sq, hq, nc, group, row_b, row_h, s_qb, s_qc, s_qh, s_qs, s_kb, s_kc, s_kh, s_vb, s_vc, s_vh,
            D, BD, BM)
        hk = h // group
        offs_d = tl.arange(0, BD)
        offs_dv = tl.arange(0, BDV)
        rows = offs_m[:, None] < sq
        do = tl.load(DO + _at(b, c, h, s_ob, s_oc, s_oh) + offs_m[:, None] * s_os + offs_dv[None, :],
                     mask=rows & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * sq + offs_m, mask=offs_m < sq, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * sq + offs_m, mask=offs_m < sq, other=0.0)
        dq = tl.zeros([BM, BD], tl.float32)
        for j in range(tl.load(FN + r)):
            kt, v = _kv_tile(k_base, v_base, desc_k, desc_v, b, c, hk, tl.load(FI + r * nmax + j), sk, s_ks, s_vs,
                             D, DV, BD, BDV, BN, TMA, False)
            p = tl.exp2(tl.dot(q, kt, input_precision=PREC) * qk_scale - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PREC)
        for j in range(tl.load(PN + r)):
            kt, v = _kv_tile(k_base, v_base, desc_k, desc_v, b, c, hk, tl.load(PI + r * nmax + j), sk, s_ks, s_vs,
                             D, DV, BD, BDV, BN, TMA, True)
            # masked before exp2: a masked score may exceed the row's log-sum-exp by any amount
            st = tl.where(_tile_allowed(BITS, tl.load(PT + r * nmax + j), BM, BN, W),
                          tl.dot(q, kt, input_precision=PREC) * qk_scale, float("-inf"))
            p = tl.exp2(st - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
            dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PREC)
        tl.store(DQ + _at(b, c, h, s_qb, s_qc, s_qh) + offs_m[:, None] * s_qs + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=rows & (offs_d[None, :] < D))

    @triton.jit(do_not_specialize=["sq", "hq", "nc"])
    def _bwd_delta(O, DO, DELTA, sq, hq, nc, s_ob, s_oc, s_oh, s_os, s_db, s_dc, s_dh, s_ds,
                   DV: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr):
        """delta = rowsum(O * dO) in float32 (FlashAttention's preprocessing), no float32 copies of O or dO."""
        bh = tl.program_id(1)
        b, c, h = _split(bh, hq, nc)
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        offs_dv = tl.arange(0, BDV)
        inside = (offs_m[:, None] < sq) & (offs_dv[None, :] < DV)
        o = tl.load(O + _at(b, c, h, s_ob, s_oc, s_oh) + offs_m[:, None] * s_os + offs_dv[None, :], mask=inside,
                    other=0.0)
        do = tl.load(DO + _at(b, c, h, s_db, s_dc, s_dh) + offs_m[:, None] * s_ds + offs_dv[None, :], mask=inside,
                     other=0.0)
        tl.store(DELTA + bh.to(tl.int64) * sq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
                 mask=offs_m < sq)

    @triton.jit
    def _dkdv_tile(k, v, dk, dv, LSE, DELTA, q_base, do_base, desc_q, desc_do, b, c, h, lh, i, sq,
                   s_qs, s_os, qk_scale, allowed, MASKED: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
                   PREC: tl.constexpr, TMA: tl.constexpr):
        offs_m = i * BM + tl.arange(0, BM)
        if TMA:  # rows past Sq read as zeros
            qt, do = _desc_pair(desc_q, desc_do, b, c, h, i * BM, BM, BD, BDV, TMA)
        else:
            offs_d = tl.arange(0, BD)
            offs_dv = tl.arange(0, BDV)
            qt = tl.load(q_base + offs_m[None, :] * s_qs + offs_d[:, None],
                         mask=(offs_m[None, :] < sq) & (offs_d[:, None] < D), other=0.0)
            do = tl.load(do_base + offs_m[:, None] * s_os + offs_dv[None, :],
                         mask=(offs_m[:, None] < sq) & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + lh + offs_m, mask=offs_m < sq, other=float("inf"))
        delta = tl.load(DELTA + lh + offs_m, mask=offs_m < sq, other=0.0)
        st = tl.dot(k, qt, input_precision=PREC) * qk_scale  # (BN, BM)
        if MASKED:  # before exp2: a masked score may exceed the row's log-sum-exp by any amount
            st = tl.where(allowed, st, float("-inf"))
        pt = tl.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
        dst = pt * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PREC)
        return dk, dv

    @_autotune("bwd")
    @triton.jit(do_not_specialize=_RUNTIME + ["n_acc"])
    def _bwd_dkdv(Q, K, V, DO, DK, DV_, LSE, DELTA, FN, FI, PN, PI, PT, BITS, desc_q, desc_do, WORK, ACC_K, ACC_V,
                  sq, sk, hq, hkv, group, qk_scale, scale, row_b, row_h, nmax, nc, n_acc,
                  s_qb, s_qc, s_qh, s_qs, s_kb, s_kc, s_kh, s_ks, s_vb, s_vc, s_vh, s_vs, s_ob, s_oc, s_oh, s_os,
                  D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, W: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
        """dK, dV of one key block of one KV head, summed over its group's query heads (DK/DV_ share K/V strides).
        One program per work item (key block j, its query tiles [t0, t1), accumulator slot): a key block with far
        more query tiles than the others (a sink every query sees) is split over several items that add into
        float32 accumulators (slot >= 0) instead of one program walking them all while the rest of the GPU
        idles; the others store directly (slot -1)."""
        w = tl.program_id(0)
        j = tl.load(WORK + 4 * w)
        t0 = tl.load(WORK + 4 * w + 1)
        t1 = tl.load(WORK + 4 * w + 2)
        slot = tl.load(WORK + 4 * w + 3)
        bch = tl.program_id(1)
        b, c, hk = _split(bch, hkv, nc)
        offs_n = j * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, BD)
        offs_dv = tl.arange(0, BDV)
        cols = offs_n[:, None] < sk
        k = tl.load(K + _at(b, c, hk, s_kb, s_kc, s_kh) + offs_n[:, None] * s_ks + offs_d[None, :],
                    mask=cols & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + _at(b, c, hk, s_vb, s_vc, s_vh) + offs_n[:, None] * s_vs + offs_dv[None, :],
                    mask=cols & (offs_dv[None, :] < DV), other=0.0)
        dk = tl.zeros([BN, BD], tl.float32)
        dv = tl.zeros([BN, BDV], tl.float32)
        for g in range(group):
            h = hk * group + g
            r = b * row_b + h * row_h + j
            q_base = Q + _at(b, c, h, s_qb, s_qc, s_qh)
            do_base = DO + _at(b, c, h, s_ob, s_oc, s_oh)
            lh = ((b * nc + c) * hq + h).to(tl.int64) * sq
            n_full = tl.load(FN + r)
            for t in range(tl.minimum(t0, n_full), tl.minimum(t1, n_full)):  # the full tiles of [t0, t1)
                i = tl.load(FI + r * nmax + t)
                dk, dv = _dkdv_tile(k, v, dk, dv, LSE, DELTA, q_base, do_base, desc_q, desc_do, b, c, h, lh, i, sq,
                                    s_qs, s_os, qk_scale, None, False, D, DV, BD, BDV, BM, PREC, TMA)
            n_all = n_full + tl.load(PN + r)
            for t in range(tl.maximum(t0, n_full), tl.minimum(t1, n_all)):  # then its partial tiles
                i = tl.load(PI + r * nmax + t - n_full)
                allowed = _tile_allowed_t(BITS, tl.load(PT + r * nmax + t - n_full), BM, BN, W)
                dk, dv = _dkdv_tile(k, v, dk, dv, LSE, DELTA, q_base, do_base, desc_q, desc_do, b, c, h, lh, i, sq,
                                    s_qs, s_os, qk_scale, allowed, True, D, DV, BD, BDV, BM, PREC, TMA)
        if slot < 0:
            tl.store(DK + _at(b, c, hk, s_kb, s_kc, s_kh) + offs_n[:, None] * s_ks + offs_d[None, :],
                     (dk * scale).to(DK.dtype.element_ty), mask=cols & (offs_d[None, :] < D))
            tl.store(DV_ + _at(b, c, hk, s_vb, s_vc, s_vh) + offs_n[:, None] * s_vs + offs_dv[None, :],
                     dv.to(DV_.dtype.element_ty), mask=cols & (offs_dv[None, :] < DV))
        else:  # accumulators (B x classes x Hkv, slots, BN, BD / BDV), float32
            base = (bch.to(tl.int64) * n_acc + slot) * BN
            rows = base + tl.arange(0, BN)
            tl.atomic_add(ACC_K + rows[:, None] * BD + offs_d[None, :], dk * scale)
            tl.atomic_add(ACC_V + rows[:, None] * BDV + offs_dv[None, :], dv)


# ---- launches ---------------------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


def _sizes(q, k, v, lay: Layout) -> dict:
    d, dv = q.shape[-1], v.shape[-1]
    return dict(D=d, DV=dv, BD=max(16, triton.next_power_of_2(d)), BDV=max(16, triton.next_power_of_2(dv)),
                BM=lay.block_m, BN=lay.block_n, W=lay.block_n // 32,
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _strides(*ts) -> list[int]:
    return [s for t in ts for s in t.stride()[:4]]


def _five(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, 1, H, S, D): the kernels index (batch, class, head, position); the residue classes of a
    dilated mask are a class dimension of strided views, everything else has one class."""
    return t.unsqueeze(1) if t.dim() == 4 else t


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# How the kernels read the tiles they walk (K, V in the forward and dQ; Q, dO in dK/dV): through tensor descriptors
# (Hopper's copy engine) where "tma" is on, the head dims are powers of two, the strides 16-byte aligned and the call
# has at least "tma_min_rows" (batch x class x head x query) rows, else through pointers. On the H200 descriptors
# made the forward ~10% faster at (4, 16, 8192, 128) but cost host time (a bare launch 133 vs 123 us; host-bound
# calls at (8, 16, 2048, 64) up to 30% slower forward+backward). "warp_specialize" splits each forward program into
# producer and consumer warps (Triton 3.6 fails to compile it for these loops on Hopper). Set by
# benchmarks/gpu_structured.py's sweep.
OPTIONS = {"tma": True, "tma_min_rows": 2**19, "warp_specialize": False}


def _descriptors(x, y, rows: int, sizes: dict, calls_rows: int):
    """(TMA, descriptors): tensor descriptors of x's and y's (rows x head dim) boxes and their rank (4, or 5 with a
    class dimension), or (0, (x, y)) where the kernels read through pointers."""
    if not (OPTIONS["tma"] and TensorDescriptor is not None and sizes["D"] == sizes["BD"]
            and sizes["DV"] == sizes["BDV"] and calls_rows >= OPTIONS["tma_min_rows"]):
        return 0, (x, y)
    if x.dim() == 5 and x.shape[1] == 1:  # one class: the plain 4D views
        x, y = x.squeeze(1), y.squeeze(1)
    if any(t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]) for t in (x, y)):
        return 0, (x, y)
    box = [1] * (x.dim() - 2)
    return x.dim(), tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), box + [rows, t.shape[-1]])
                          for t in (x, y))


def forward(q, k, v, lay: Layout, scale: float, out: torch.Tensor | None = None):
    """(out (B, Hq, Sq, Dv) in q's dtype, base-2 log-sum-exp float32 (B, Hq, Sq)); the kernels read q, k, v through
    their strides, the last dim contiguous (copied here when it is not), and write `out` (a view, e.g. a slice of a
    longer output, with its last dim contiguous) when it is given. 5D inputs (B, classes, H, S, D) run every class
    on the same tables in one launch (out, log-sum-exp 5D / 4D)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    four = q.dim() == 4
    q5, k5, v5 = (_five(t) for t in (q, k, v))
    b, nc, hq, sq, _ = q5.shape
    hkv, sk = k5.shape[2], k5.shape[3]
    o5 = torch.empty(b, nc, hq, sq, v.shape[-1], dtype=q.dtype, device=q.device) if out is None else _five(out)
    lse = torch.empty(b, nc, hq, sq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(sq, lay.block_m), b * nc * hq)
    sizes = _sizes(q, k, v, lay)
    tma, desc = _descriptors(k5, v5, lay.block_n, sizes, b * nc * hq * sq)
    _fwd[grid](q5, k5, v5, o5, lse, lay.full_num, lay.full_idx, lay.part_num, lay.part_idx, lay.part_tile, lay.bits,
               *desc, sq, sk, hq, hq // hkv, scale * LOG2E, lay.b_step, lay.h_step,
               lay.full_idx.shape[1], nc, *_strides(q5, k5, v5, o5), **sizes, TMA=tma,
               WS=OPTIONS["warp_specialize"])
    return (o5.squeeze(1), lse.squeeze(1)) if four else (o5, lse)


def _with_grad_buffer(t: torch.Tensor, dtype: torch.dtype):
    """(t, an empty gradient for it) with the same strides: the kernels write each gradient with its input's
    strides. A view that is not dense (a slice of a longer sequence) is copied first, else the gradient's writes
    would land outside its buffer; so is one whose last dim is not contiguous (the kernels assume it is)."""
    g = torch.empty_like(t, dtype=dtype)
    if g.stride() != t.stride() or t.stride(-1) != 1:
        t = t.contiguous()
        g = torch.empty_like(t, dtype=dtype)
    return t, g


def backward(q, k, v, o, lse, do, lay: Layout, lay_kv: Layout, scale: float, grad_dtype: torch.dtype | None = None,
             grads: tuple | None = None):
    """(dq, dk, dv): dQ over `lay` (the forward's tiles), dK/dV over `lay_kv`'s transposed lists; in `grad_dtype`
    (default: the inputs'), e.g. float32 for partial gradients that a caller sums before rounding once. `grads`:
    views to write them into instead, with q's, k's and v's strides. 4D or 5D (classes) as `forward`."""
    if grads is None:
        (q, dq), (k, dk), (v, dv) = (_with_grad_buffer(x, grad_dtype or x.dtype) for x in (q, k, v))
    else:
        dq, dk, dv = grads
        if any(g.stride() != t.stride() for g, t in zip(grads, (q, k, v))):
            raise ValueError("grads must have the strides of q, k and v: the kernels write each with its input's")
    do = do if do.dtype == q.dtype and do.stride(-1) == 1 else do.to(q.dtype).contiguous()  # strides passed
    q5, k5, v5, o5, do5, dq5, dk5, dv5 = (_five(t) for t in (q, k, v, o, do, dq, dk, dv))
    lse5 = lse.unsqueeze(1) if lse.dim() == 3 else lse
    b, nc, hq, sq, _ = q5.shape
    hkv, sk = k5.shape[2], k5.shape[3]
    delta = torch.empty(b, nc, hq, sq, dtype=torch.float32, device=q.device)
    sizes = _sizes(q, k, v, lay)
    _bwd_delta[(triton.cdiv(sq, 64), b * nc * hq)](o5, do5, delta, sq, hq, nc, *o5.stride()[:4], *do5.stride()[:4],
                                                   DV=sizes["DV"], BDV=sizes["BDV"], BM=64)
    tma, desc = _descriptors(k5, v5, lay.block_n, sizes, b * nc * hq * sq)
    _bwd_dq[(triton.cdiv(sq, lay.block_m), b * nc * hq)](
        q5, k5, v5, do5, dq5, lse5, delta, lay.full_num, lay.full_idx, lay.part_num, lay.part_idx, lay.part_tile,
        lay.bits, *desc, sq, sk, hq, hq // hkv, scale * LOG2E, scale, lay.b_step, lay.h_step,
        lay.full_idx.shape[1], nc, *_strides(q5, k5, v5, do5), **sizes, TMA=tma)
    sizes = _sizes(q, k, v, lay_kv)
    tma, desc = _descriptors(q5, do5, lay_kv.block_m, sizes, b * nc * hq * sq)
    work, n_acc, acc_rows, acc_keys = _dkdv_schedule(lay_kv, sk)
    if n_acc:
        acc_k = torch.zeros(b * nc * hkv, n_acc * lay_kv.block_n, sizes["BD"], dtype=torch.float32, device=q.device)
        acc_v = torch.zeros(b * nc * hkv, n_acc * lay_kv.block_n, sizes["BDV"], dtype=torch.float32, device=q.device)
    else:
        acc_k = acc_v = delta  # not read
    _bwd_dkdv[(work.shape[0], b * nc * hkv)](
        q5, k5, v5, do5, dk5, dv5, lse5, delta, lay_kv.t_full_num, lay_kv.t_full_idx, lay_kv.t_part_num,
        lay_kv.t_part_idx, lay_kv.t_part_tile, lay_kv.bits, *desc, work, acc_k, acc_v, sq, sk, hq, hkv, hq // hkv,
        scale * LOG2E, scale, lay_kv.t_b_step, lay_kv.t_h_step, lay_kv.t_full_idx.shape[1], nc, n_acc,
        *_strides(q5, k5, v5, do5), **sizes, TMA=tma)
    if n_acc:  # the split key blocks' sums
        for g, acc in ((dk5, acc_k[..., :k.shape[-1]]), (dv5, acc_v[..., :v.shape[-1]])):
            g[:, :, :, acc_keys] = acc[:, acc_rows].view(b, nc, hkv, -1, acc.shape[-1]).to(g.dtype)
    return dq, dk, dv


DKDV_MIN_CHUNK = 32  # query tiles a dK/dV program walks at most when its key block is split (see _dkdv_schedule)
DKDV_SPLIT_OVER_MEAN = 4  # split key blocks with more than this many times the mean query tiles
DKDV_CHUNK: int | None = None  # a fixed chunk instead (tests split every block this way)


def _dkdv_schedule(lay_kv: Layout, sk: int):
    """(work int32 (items, 4): key block, first and end query-tile index, accumulator slot or -1; slots; the
    accumulator rows and key positions of the split blocks). A key block whose most loaded row has more than
    DKDV_SPLIT_OVER_MEAN times the mean query tiles (a sink) is split into chunks of max(DKDV_MIN_CHUNK, twice
    the mean); milder imbalance (documents of unequal lengths) is left alone: on the H200 splitting it saved
    nothing and its float32 accumulators cost up to a third more memory. Built once per layout
    (one device read) and kept on it, so it goes when the layout does."""
    schedules = lay_kv.__dict__.setdefault("dkdv_schedules", {})
    key = (DKDV_CHUNK, DKDV_MIN_CHUNK, DKDV_SPLIT_OVER_MEAN)
    if key in schedules:
        return schedules[key]
    nk = -(-sk // lay_kv.block_n)
    counts = (lay_kv.t_full_num + lay_kv.t_part_num).view(-1, nk).amax(0).tolist()
    mean = -(-sum(counts) // max(len(counts), 1))
    chunk = DKDV_CHUNK or max(DKDV_MIN_CHUNK, 2 * mean)
    work, split = [], []
    for j, n in enumerate(counts):
        if n <= chunk or (DKDV_CHUNK is None and n <= DKDV_SPLIT_OVER_MEAN * mean):
            work.append((j, 0, n, -1))
            continue
        work += [(j, t0, t0 + chunk, len(split)) for t0 in range(0, n, chunk)]
        split.append(j)
    bn = lay_kv.block_n
    keys = [range(j * bn, min((j + 1) * bn, sk)) for j in split]
    dev = lay_kv.t_full_num.device
    schedule = (torch.tensor(work, dtype=torch.int32, device=dev), len(split),
                torch.tensor([s * bn + i for s, r in enumerate(keys) for i in range(len(r))], dtype=torch.long,
                             device=dev),
                torch.tensor([i for r in keys for i in r], dtype=torch.long, device=dev))
    schedules[key] = schedule
    return schedule


class BlockSparse(torch.autograd.Function):
    """The kernels under autograd: `apply(q, k, v, lay, scale, tables)`, `lay` the forward's tables and `tables`
    what the backward needs: `.backward_layout()` (dK/dV's transposed lists) and `.fallback(q, k, v)` (the output
    by another path, differentiated when a backward kernel fails)."""

    @staticmethod
    def forward(ctx, q, k, v, lay, scale, tables):
        o, lse = forward(q, k, v, lay, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.lay, ctx.scale, ctx.tables = lay, scale, tables
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        try:
            dq, dk, dv = backward(q, k, v, o, lse, do, ctx.lay, ctx.tables.backward_layout(), ctx.scale)
        except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or launch falls back
            dq, dk, dv = _fallback_grads(ctx.tables, q, k, v, do, err)
        return dq, dk, dv, None, None, None


def _fallback_grads(tables, q, k, v, do, err: Exception):
    """dq, dk, dv of `tables.fallback` (another path) after a backward kernel failed, with the one-time warning."""
    _warn_once("backward", err)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        return torch.autograd.grad(tables.fallback(*leaves), leaves, do)


# ---- dilated masks as independent lattice classes ------------------------------------------------------------------

_lattices: dict = {}


def _lattice(variant, call: Call):
    """(d, folded, [(a, r, band, sub-call), ...]) when the variant runs as `dilation` bands on strided subsequences
    (query indices a, a + d, ... against key indices r, r + d, ...; `DilatedWindow.lattice`), else None. Every key
    class then belongs to exactly one query class, so each gradient element is written once. `folded`: every class
    pairs with its own key class (a = r) on lengths that d divides, so all share one band and one launch runs them
    as a class dimension of (B, d, H, S / d, D) views."""
    lattice = getattr(variant, "lattice", None)
    if lattice is None:
        return None
    key = (variant.key, call.shapes, call.causal, call.device)
    if key not in _lattices:
        got = lattice(call)
        s = call.shapes
        if got is None or s.sq < got[0] or s.sk < got[0]:
            _lattices[key] = None
        else:
            d, classes = got
            folded = all(a == r for a, r, _ in classes) and s.sq % d == 0 and s.sk % d == 0
            _lattices[key] = d, folded, [
                (a, r, band, Call(Shapes(s.batch, s.q_heads, s.kv_heads, len(range(a, s.sq, d)),
                                         len(range(r, s.sk, d)), s.d, s.dv), call.scale, False, {}, call.device))
                for a, r, band in classes]
    return _lattices[key]


def _classes(t: torch.Tensor, d: int) -> torch.Tensor:
    """(B, H, S, D) -> the view (B, d, H, S / d, D) whose class c holds positions c, c + d, ..."""
    b, h, n, e = t.shape
    return t.view(b, h, n // d, d, e).permute(0, 3, 1, 2, 4)


def _launches(d: int, folded: bool, parts):
    """(query-side view, key-side view, band, sub-call) of each launch."""
    if folded:
        _, _, band, sub = parts[0]
        return [(lambda t: _classes(t, d), lambda t: _classes(t, d), band, sub)]
    return [((lambda t, a=a: t[:, :, a::d]), (lambda t, r=r: t[:, :, r::d]), band, sub) for a, r, band, sub in parts]


def table_calls(variant, call: Call) -> list:
    """The (variant, call) pairs whose tables the backend builds for `call`: a dilated window's residue-class bands
    (one band when the classes are folded into one launch), else the variant's own."""
    lattice = _lattice(variant, call)
    if lattice is None:
        return [(variant, call)]
    _, folded, parts = lattice
    return [(band, sub) for _, _, band, sub in (parts[:1] if folded else parts)]


def _lattice_forward(q, k, v, launches, scale: float):
    """(output, [log-sum-exp of each launch]), writing every class's rows of one output."""
    o = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    lses = [forward(qs(q), ks(k), ks(v), layout_for(band, sub, BLOCK_M, BLOCK_N, "forward"), scale, out=qs(o))[1]
            for qs, ks, band, sub in launches]
    return o, lses


class LatticeSparse(torch.autograd.Function):
    """A dilated mask's classes under autograd: `apply(q, k, v, launches, scale, tables)`, `launches` from
    `_launches` and `tables` the whole mask's `_MaskTables` (for the fallback)."""

    @staticmethod
    def forward(ctx, q, k, v, launches, scale, tables):
        o, lses = _lattice_forward(q, k, v, launches, scale)
        ctx.save_for_backward(q, k, v, o, *lses)
        ctx.launches, ctx.scale, ctx.tables = launches, scale, tables
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, *lses = ctx.saved_tensors
        try:
            (q, dq), (k, dk), (v, dv) = (_with_grad_buffer(x, x.dtype) for x in (q, k, v))
            do = do if do.dtype == q.dtype and do.stride(-1) == 1 else do.to(q.dtype).contiguous()
            for (qs, ks, band, sub), lse in zip(ctx.launches, lses):
                backward(qs(q), ks(k), ks(v), qs(o), lse, qs(do), layout_for(band, sub, BLOCK_M, BLOCK_N, "forward"),
                         layout_for(band, sub, BWD_BLOCK_M, BWD_BLOCK_N, "transposed"), ctx.scale,
                         grads=(qs(dq), ks(dk), ks(dv)))
        except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or launch falls back
            dq, dk, dv = _fallback_grads(ctx.tables, *ctx.saved_tensors[:3], do, err)
        return dq, dk, dv, None, None, None


@dataclass
class _MaskTables:
    variant: SoftmaxVariant
    call: Call

    def backward_layout(self) -> Layout:
        return layout_for(self.variant, self.call, BWD_BLOCK_M, BWD_BLOCK_N, "transposed")

    def fallback(self, q, k, v):
        return _fallback(self.variant, q, k, v, self.call)


# ---- the backend ------------------------------------------------------------------------------------------------------

_warned: set = set()


def _warn_once(where: str, err: Exception) -> None:
    if where not in _warned:
        _warned.add(where)
        warnings.warn(f"attnzoo triton block-sparse {where} kernel failed ({type(err).__name__}: {err}); "
                      "running this call on flex/torch instead", RuntimeWarning, stacklevel=3)


def serves(cls) -> bool:
    return (issubclass(cls, SoftmaxVariant) and cls.has_mask and not cls.has_score and cls.normalization == "softmax"
            and not cls.carries)


def why_not(variant, call: Call, q) -> str | None:
    if not serves(type(variant)):
        return (f"{variant.name}: the triton block-sparse kernels serve softmax attention under a mask with no score "
                "modifier")
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if q.device.type != "cuda":
        return f"triton kernels run on CUDA tensors; q is on {q.device}"
    if q.dtype not in DTYPES:
        return f"the triton kernels take float16/bfloat16/float32, got {q.dtype}"
    if max(call.shapes.d, call.shapes.dv) > 256:
        return f"head dims up to 256, got D={call.shapes.d}, Dv={call.shapes.dv}"
    if any(t.requires_grad for t in call.inputs.values()):
        return "an input tensor requires grad: the kernels give gradients of q, k, v only"
    return None


def _fallback(variant, q, k, v, call):
    from .. import flex as _flex
    from ..torch_blockwise import softmax_blockwise

    if q.device.type == "cuda" and _flex.can_run(variant, call, q) is None:
        return _flex.flex(variant, q, k, v, call)
    return softmax_blockwise(variant, q, k, v, call)


def run(variant, q, k, v, call: Call):
    try:
        lattice = _lattice(variant, call)
        if lattice is not None:
            q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
            launches = _launches(*lattice)
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                return LatticeSparse.apply(q, k, v, launches, call.scale, _MaskTables(variant, call))
            return _lattice_forward(q, k, v, launches, call.scale)[0]
        lay = layout_for(variant, call, BLOCK_M, BLOCK_N, "forward")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return BlockSparse.apply(q, k, v, lay, call.scale, _MaskTables(variant, call))
        return forward(q, k, v, lay, call.scale)[0]
    except Exception as err:  # noqa: BLE001 - a kernel that fails to compile or launch falls back
        _warn_once("forward", err)
        return _fallback(variant, q, k, v, call)


__all__ = ["BLOCK_M", "BLOCK_N", "BlockSparse", "LatticeSparse", "Layout", "backward", "build_layout", "forward",
           "layout_for", "run", "serves", "stats", "table_calls", "tile_lists", "why_not"]
