"""Tile kernels: one (query segment x key segment) tile of a rank's work -> (output, log-sum-exp), and
FlashAttention's backward given the merged output and log-sum-exp of all tiles.

`cpu`: attnzoo's own fused CPU path (torch_blockwise: PyTorch's CPU flash kernel over the runs of
tiles the mask needs, masks from the variant's definition) on a `GlobalView`, so every exact softmax
mask variant runs. `flash`: PyTorch's CUDA FlashAttention-2 (`aten._flash_attention_forward` /
`_backward`) with its window arguments; it serves the band masks (full, causal, sliding_window) by
cutting each tile to the rows and keys the band reaches and expressing the band in the kernel's
bottom-right-aligned window. `triton`: attnzoo's block-sparse Triton kernels on the same `GlobalView`, so
every exact mask variant runs sharded on CUDA; their partial gradients come out in float32 and are summed
over tiles and ranks before one rounding (flash's come out in the inputs' dtype, so a key used by several
tiles is rounded once per tile). All return float32 (float64 for float64 inputs) outputs and
log-sum-exps, -inf for rows that see no key of the tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...core.checks import Shapes
from ...core.variant import Call, SoftmaxVariant
from .. import torch_blockwise as tb
from .view import GlobalView

INF = math.inf


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def local_call(gcall: Call, heads: int, kv_heads: int, n: int, m: int) -> Call:
    """The non-causal call of one tile (n queries, m keys; causality is the global view's)."""
    s = gcall.shapes
    return Call(Shapes(s.batch, heads, kv_heads, n, m, s.d, s.dv), gcall.scale, False, {}, gcall.device)


# ---- cpu: the fused torch path on a global view ---------------------------------------------------


@dataclass
class CpuTile:
    view: GlobalView
    call: Call
    plan: tb.Plan


class CpuKernel:
    name = "cpu"

    def tile(self, base, gcall, intervals, q_start, n, k_start, m, heads, kv_heads, h_start=0) -> CpuTile:
        call = local_call(gcall, heads, kv_heads, n, m)
        view = GlobalView(base, gcall, intervals, q_start, k_start, h_start)
        return CpuTile(view, call, tb.plan(view, call, tb.Q_BLOCK, tb.KV_BLOCK))

    def forward(self, q, k, v, t: CpuTile):
        return tb._fused_forward(q, k, v, t.view, t.call, t.plan, acc_dtype(q.dtype), empty_lse=-INF)

    def backward(self, dout, q, k, v, out, lse, t: CpuTile):
        return tb._fused_backward(dout, q, k, v, out, lse, t.view, t.call, t.plan, acc_dtype(q.dtype))


# ---- flash: CUDA FlashAttention-2 with windows for band masks -------------------------------------


def band_of(base: SoftmaxVariant, causal: bool) -> tuple[float, float] | None:
    """(left, right): query q sees keys [q - left, q + right] (inf = unbounded), or None when the
    variant's mask is not such a band."""
    from ...variants.masks.local import Full, SlidingWindow

    if type(base) is Full:
        left, right = INF, INF
    elif type(base) is SlidingWindow:
        left = base.config["window"]
        right = base._right()
    else:
        return None
    return (left, 0 if causal else right)


@dataclass
class BandTile:
    rows: tuple[int, int]  # local query rows [i0, i1) that see a key of the tile
    keys: tuple[int, int]  # local keys [j0, j1) any of them sees
    left: int  # the kernel's window_size_left / right (-1 = unbounded), bottom-right aligned
    right: int


def band_tiles(left: float, right: float, q_start: int, n: int, k_start: int, m: int) -> list[BandTile]:
    """The kernel calls that compute the (queries [q_start, +n), keys [k_start, +m)) tile of a band.

    Local query i (global q_start + i) sees local keys j with i + d - left <= j <= i + d + right, d =
    q_start - k_start. Rows seeing no key are cut (the kernel's empty rows would not merge), then keys
    no kept row sees; the band is then FlashAttention's window with bottom-right alignment
    (j - i in [sk - sq - window_left, sk - sq + window_right]). The kernel treats a window >= sk as
    unbounded, which is exact for the left side but not for a right bound that still cuts the first
    rows when sq > sk + 1: such tiles are split by rows into calls of at most sk rows."""
    d = q_start - k_start
    i0 = 0 if right == INF else max(0, -d - int(right))
    i1 = n if left == INF else min(n, m - d + int(left))
    if i1 <= i0:
        return []
    j0 = 0 if left == INF else max(0, i0 + d - int(left))
    j1 = m if right == INF else min(m, i1 - 1 + d + int(right) + 1)
    if j1 <= j0:
        return []
    sq, sk, d2 = i1 - i0, j1 - j0, (q_start + i0) - (k_start + j0)
    if right != INF and sq > sk + 1:
        out = []
        for a in range(i0, i1, sk):
            out += [BandTile((a + r0, a + r1), keys, wl, wr)
                    for (r0, r1), keys, wl, wr in ((t.rows, t.keys, t.left, t.right) for t in
                                                  band_tiles(left, right, q_start + a, min(sk, i1 - a), k_start, m))]
        return out
    wl = -1 if left == INF else sk - sq - d2 + int(left)
    wr = -1 if right == INF else d2 + int(right) - (sk - sq)
    return [BandTile((i0, i1), (j0, j1), -1 if wl >= sk else wl, -1 if wr >= sk else wr)]


def _flash_fwd(q, k, v, scale, left, right):
    """aten's FlashAttention-2 on (B, S, H, D) tensors: (out, lse (B, H, S) float32)."""
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], 0.0, False, False, scale=scale,
        window_size_left=left, window_size_right=right)
    return out, lse


def _flash_bwd(dout, q, k, v, out, lse, scale, left, right):
    rng = torch.empty(0, dtype=torch.uint64, device=q.device)  # dropout is 0: the rng state is never read
    return torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[1], k.shape[1], 0.0, False, rng, rng,
        scale=scale, window_size_left=left, window_size_right=right)


@dataclass
class FlashTile:
    bands: list[BandTile]
    scale: float


class FlashKernel:
    """Band masks on CUDA. `fwd` / `bwd` are the kernel calls on (B, S, H, D) tensors; tests replace them
    with `band_reference`, the same band written densely, to check the cutting on CPU."""

    name = "flash"

    def __init__(self, left: float, right: float, fwd=_flash_fwd, bwd=_flash_bwd) -> None:
        self.left, self.right, self.fwd, self.bwd = left, right, fwd, bwd

    def tile(self, base, gcall, intervals, q_start, n, k_start, m, heads, kv_heads, h_start=0) -> FlashTile:
        return FlashTile(band_tiles(self.left, self.right, q_start, n, k_start, m), gcall.scale)

    def forward(self, q, k, v, t: FlashTile):
        b, h, n, _ = q.shape
        dt = acc_dtype(q.dtype)
        out = q.new_zeros(b, h, n, v.shape[-1], dtype=dt)
        lse = q.new_full((b, h, n), -INF, dtype=dt)
        for band in t.bands:  # their rows are disjoint
            (i0, i1), (j0, j1) = band.rows, band.keys
            o, l_ = self.fwd(*(x.transpose(1, 2) for x in (q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1])),
                             t.scale, band.left, band.right)
            out[:, :, i0:i1] = o.transpose(1, 2)
            lse[:, :, i0:i1] = l_
        return out, lse

    def backward(self, dout, q, k, v, out, lse, t: FlashTile):
        dt = acc_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(x.shape, dtype=dt, device=x.device) for x in (q, k, v))
        for band in t.bands:
            (i0, i1), (j0, j1) = band.rows, band.keys
            tr = [x.transpose(1, 2) for x in (q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1])]
            rows = [x[:, :, i0:i1].to(q.dtype).transpose(1, 2).contiguous() for x in (dout, out)]
            g = self.bwd(rows[0], *tr, rows[1], lse[:, :, i0:i1].to(dt), t.scale, band.left, band.right)
            dq[:, :, i0:i1] += g[0].transpose(1, 2)
            dk[:, :, j0:j1] += g[1].transpose(1, 2)
            dv[:, :, j0:j1] += g[2].transpose(1, 2)
        return dq, dk, dv


def _band_mask(sq: int, sk: int, left: int, right: int) -> torch.Tensor:
    """FlashAttention's window, bottom-right aligned: key j - query i in [sk - sq - left, sk - sq + right]
    (-1 = unbounded; like the kernel, a window >= sk counts as unbounded)."""
    left, right = (-1 if w >= sk else w for w in (left, right))
    rel = torch.arange(sk).view(1, -1) - torch.arange(sq).view(-1, 1) - (sk - sq)
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        allowed &= rel >= -left
    if right >= 0:
        allowed &= rel <= right
    return allowed


def band_reference(q, k, v, scale, left, right):
    """FlashAttention's bottom-right-aligned window written densely on (B, S, H, D) tensors (float64 ok):
    the stand-in for `_flash_fwd` in tests."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    g = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
    s = ((qh @ kh.transpose(-1, -2)) * scale).masked_fill(~_band_mask(qh.shape[2], kh.shape[2], left, right), -INF)
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vh
    return out.transpose(1, 2), lse


def band_reference_bwd(dout, q, k, v, out, lse, scale, left, right):
    """The backward of `band_reference` given the merged out / lse (FlashAttention's formulas)."""
    qh, kh, vh, doh, oh = (x.transpose(1, 2) for x in (q, k, v, dout, out))
    hkv, g = kh.shape[1], qh.shape[1] // kh.shape[1]
    kr, vr = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
    sk = kh.shape[2]
    s = ((qh @ kr.transpose(-1, -2)) * scale).masked_fill(~_band_mask(qh.shape[2], sk, left, right), -INF)
    p = torch.exp(s - lse.to(s.dtype).unsqueeze(-1))
    dv = p.transpose(-1, -2) @ doh
    dp = doh @ vr.transpose(-1, -2)
    ds = p * (dp - (doh * oh).sum(-1, keepdim=True))
    dq = ds @ kr * scale
    dk = ds.transpose(-1, -2) @ qh * scale
    b = qh.shape[0]
    dk = dk.view(b, hkv, g, sk, -1).sum(2)
    dv = dv.view(b, hkv, g, sk, -1).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---- triton: the block-sparse kernels on a global view, every mask on CUDA -------------------------


@dataclass
class TritonTile:
    view: GlobalView
    call: Call
    fwd: object = None   # blocksparse Layouts, built at first use (the tile object lives for one call)
    bwd: object = None


class TritonKernel:
    name = "triton"

    def tile(self, base, gcall, intervals, q_start, n, k_start, m, heads, kv_heads, h_start=0) -> TritonTile:
        return TritonTile(GlobalView(base, gcall, intervals, q_start, k_start, h_start),
                          local_call(gcall, heads, kv_heads, n, m))

    def _forward_layout(self, t: TritonTile):
        from ..triton import blocksparse as bs

        if t.fwd is None:  # built directly: the layout cache keys on local inputs, a view's are global
            t.fwd = bs.build_layout(t.view, t.call, bs.BLOCK_M, bs.BLOCK_N)
        return t.fwd

    def forward(self, q, k, v, t: TritonTile):
        from ..triton import blocksparse as bs

        o, lse2 = bs.forward(q, k, v, self._forward_layout(t), t.call.scale)
        lse = torch.where(torch.isposinf(lse2), -INF, lse2 / bs.LOG2E)   # empty rows: +inf there, -inf here
        return o.to(acc_dtype(q.dtype)), lse

    def backward(self, dout, q, k, v, out, lse, t: TritonTile):
        from ..triton import blocksparse as bs

        if t.bwd is None:
            t.bwd = bs.build_layout(t.view, t.call, bs.BWD_BLOCK_M, bs.BWD_BLOCK_N)
        lse2 = torch.where(torch.isneginf(lse), INF, lse * bs.LOG2E).float().contiguous()
        return bs.backward(q, k, v, out.contiguous(), lse2, dout.to(q.dtype).contiguous(), self._forward_layout(t),
                           t.bwd, t.call.scale, grad_dtype=acc_dtype(q.dtype))


TILE_KERNELS = ("auto", "flash", "triton")


def kernel_for(base: SoftmaxVariant, call: Call, q: torch.Tensor, choice: str = "auto"):
    """The tile kernel for this variant, q's device and dtype and the caller's `choice`, or a string saying why
    there is none. "auto" on CUDA: flash for sliding windows (faster there), triton for everything else (measured
    on two H200s at 128k causal: as fast as flash tiles, and only it keeps bf16 dk/dv within FlashAttention's rule,
    benchmarks/results/context_parallel_h200x2_*_tiles.json), flash for full/causal when triton is missing."""
    if q.device.type == "cpu":
        why = tb.fused_why_not(base, call, q)
        return CpuKernel() if why is None else f"the CPU tile kernel cannot serve it: {why}"
    if q.device.type == "cuda":
        from ..triton import blocksparse as bs

        band = band_of(base, call.causal)
        window = band is not None and band[0] != INF
        if band is not None and (choice == "flash" or (choice == "auto" and (window or bs.TRITON_ERROR is not None))):
            return FlashKernel(*band)
        if choice == "flash":
            return (f"tile_kernel='flash' runs band masks (full, causal, sliding_window) only; {base.name} needs "
                    "tile_kernel='triton' or 'auto'")
        if bs.TRITON_ERROR is not None:
            return f"{base.name} runs sharded on CUDA through the triton kernels: {bs.TRITON_ERROR}"
        s = call.shapes
        if base.has_score or base.normalization != "softmax" or base.carries:
            return f"the triton tile kernel runs masks without score modifiers; {base.name} has one"
        if q.dtype not in bs.DTYPES or max(s.d, s.dv) > 256:
            return f"the triton tile kernel takes float16/bfloat16/float32 and head dims <= 256, got {q.dtype}, D={s.d}"
        return TritonKernel()
    return f"no tile kernel for device {q.device.type}"
