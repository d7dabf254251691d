"""The `torch` backend: exact blockwise attention, no Sq x Sk tensor, forward and backward.

Two paths, chosen per call (`path_for`; `PATH` or `use_path` force one):

`fused` (CPU, softmax under a mask, no score modifier): per query block, one call of PyTorch's
CPU flash-attention kernel (`aten._scaled_dot_product_flash_attention_for_cpu`, the kernel behind
`F.scaled_dot_product_attention` on CPU) per run of key tiles the block needs: runs of tiles the
mask leaves full go without a mask, the causal diagonal of a mask-free variant uses the kernel's
own causal flag, and only runs of partial tiles get an additive (rows x run) mask evaluated from
the variant's mask function on that run alone (at most MASK_SPAN keys). The runs' outputs are
merged with their log-sum-exps; backward calls the kernel's backward per run with the merged
output and log-sum-exp (FlashAttention's backward), recomputing the masks, so nothing of size
Sq x Sk is ever stored. GQA is the kernel's own (no repeated keys).

`tiles` (everything else: score modifiers, Cog's signed weights, CoPE's right-to-left carry; and any
device): queries a block at a time, keys a tile at a time, a running max / sum / output rescaled
as tiles arrive ("Self-attention Does Not Need O(n^2) Memory", FlashAttention). Tiles the mask
leaves empty are never computed; tiles it leaves full skip the mask. GQA reads each kv head once
for its query group (a broadcast matmul, no repeat). Backward recomputes each query block
(activation checkpointing), so training memory is linear in S as well.

Both accumulate in float32 (float64 for float64 inputs).

One engine serves every `SoftmaxVariant`: its `normalization` says how scores become weights
("softmax", or "signed" for Cog attention, whose running max is taken over |s|), and a variant
that `carries` state across key tiles (CoPE's gate counts) has its tiles visited right to left.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..core.variant import Call, SoftmaxVariant

Q_BLOCK = 256
KV_BLOCK = 256
# Longest key run one masked fused call covers: its additive mask is rows x MASK_SPAN.
MASK_SPAN = 2048
PATHS = ("auto", "fused", "tiles")
PATH = "auto"

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_FLASH_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- which path -----------------------------------------------------------------------------------


def fused_why_not(variant, call: Call, q: torch.Tensor) -> str | None:
    """None if the fused path serves this call exactly, else why not."""
    if q.device.type != "cpu":
        return f"the fused path calls PyTorch's CPU flash-attention kernel; q is on {q.device.type}"
    if q.dtype not in _FLASH_DTYPES:
        return f"no CPU flash-attention kernel for {q.dtype}"
    if getattr(variant, "normalization", "softmax") != "softmax":
        return f"{variant.name} normalises its weights as {variant.normalization!r}, not softmax"
    if getattr(variant, "carries", False):
        return f"{variant.name} carries state across key tiles"
    if getattr(variant, "has_score", False):
        return f"{variant.name} modifies scores, which the flash kernel cannot take"
    return None


def path_for(variant, call: Call, q: torch.Tensor) -> tuple[str, str]:
    """(path, why): "fused" wherever it can serve (it is faster on CPU: see `attnzoo bench`'s speed
    rows), else "tiles"; `PATH` / `use_path` force one."""
    if PATH not in PATHS:
        raise ValueError(f"torch_blockwise.PATH must be one of {list(PATHS)}, got {PATH!r}")
    if PATH == "tiles":
        return "tiles", "forced (PATH='tiles')"
    why = fused_why_not(variant, call, q)
    if why is None:
        return "fused", "forced (PATH='fused')" if PATH == "fused" else "CPU flash kernel over the tiles each query block needs"
    if PATH == "fused":
        raise ValueError(f"the fused torch path cannot serve this call: {why}")
    return "tiles", why


@contextlib.contextmanager
def use_path(path: str):
    """Force the `torch` backend's path ("fused" or "tiles"; "auto" restores the choice) inside the block."""
    global PATH
    if path not in PATHS:
        raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")
    old, PATH = PATH, path
    try:
        yield
    finally:
        PATH = old


def softmax_blockwise(variant: SoftmaxVariant, q, k, v, call: Call, q_block: int | None = None,
                      kv_block: int | None = None):
    if path_for(variant, call, q)[0] == "fused":
        return softmax_fused(variant, q, k, v, call, q_block, kv_block)
    return softmax_tiles(variant, q, k, v, call, q_block, kv_block)


# ---- fused: the CPU flash kernel over runs of key tiles -------------------------------------------

FULL, CAUSAL, MASKED = 0, 1, 2  # a run without mask, with the kernel's top-left causal flag, with a mask


@dataclass
class Plan:
    """Per query block (q0, q1, runs), each run (k0, k1, kind)."""

    blocks: list[tuple[int, int, list[tuple[int, int, int]]]]

    def calls(self) -> int:
        return sum(len(r) for _, _, r in self.blocks)


def plan(variant, call: Call, q_block: int, kv_block: int) -> Plan:
    """The kernel calls of one fused pass. Mask-free variants need no structure: a causal query
    block at positions [p0, p1) reads keys [0, p0) unmasked and [p0, p1) with the causal flag
    (bottom-right alignment comes from p0 = q0 + Sk - Sq); masked variants take their tile
    structure (`block_structure`, union over batch and heads) and group needed tiles into runs."""
    s = call.shapes
    blocks = []
    if not getattr(variant, "has_mask", True):
        for q0 in range(0, s.sq, q_block):
            q1 = min(q0 + q_block, s.sq)
            if call.causal:
                p0 = q0 + s.offset
                runs = ([(0, p0, FULL)] if p0 > 0 else []) + [(p0, p0 + q1 - q0, CAUSAL)]
            else:
                runs = [(0, s.sk, FULL)]
            blocks.append((q0, q1, runs))
        return Plan(blocks)
    struct = variant.block_structure(call, q_block, kv_block)
    tiles_any = struct.any.reshape(-1, struct.nq, struct.nk).any(0).tolist()
    tiles_full = struct.full.reshape(-1, struct.nq, struct.nk).all(0).tolist()
    for i in range(struct.nq):
        q0, q1 = i * q_block, min((i + 1) * q_block, s.sq)
        runs: list[list[int]] = []
        for j, needed in enumerate(tiles_any[i]):
            if not needed:
                continue
            k0, k1 = j * kv_block, min((j + 1) * kv_block, s.sk)
            kind = FULL if tiles_full[i][j] else MASKED
            last = runs[-1] if runs else None
            if last and last[1] == k0 and last[2] == kind and (kind == FULL or k1 - last[0] <= MASK_SPAN):
                last[1] = k1
            else:
                runs.append([k0, k1, kind])
        blocks.append((q0, q1, [tuple(r) for r in runs]))
    return Plan(blocks)


def softmax_fused(variant: SoftmaxVariant, q, k, v, call: Call, q_block: int | None = None,
                  kv_block: int | None = None, plan_: Plan | None = None):
    """Exact attention of a softmax mask variant through the CPU flash kernel (see the module doc)."""
    s = call.shapes
    p = plan_ or plan(variant, call, q_block or Q_BLOCK, kv_block or KV_BLOCK)
    dv = s.dv
    if s.d != dv:  # the kernel wants one head size: zero columns change neither scores nor outputs
        width = max(s.d, dv)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in (q, k, v))
    args = (variant, call, p, _acc_dtype(q.dtype))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = _Fused.apply(q, k, v, *args)
    else:
        out = _fused_forward(q, k, v, *args)[0]
    return out[..., :dv].to(q.dtype)


def _grids(call: Call, device):
    s = call.shapes
    return (torch.arange(s.batch, device=device).view(-1, 1, 1, 1),
            torch.arange(s.q_heads, device=device).view(1, -1, 1, 1))


def _run_mask(variant, call: Call, grids, q0: int, q1: int, k0: int, k1: int, dt):
    """(additive mask (B'|1, H'|1, rows, run) in dt, rows with no allowed key (B'|1, H'|1, rows) or None),
    or (None, None) when the run turns out unmasked."""
    dev = call.device
    q_pos = (torch.arange(q0, q1, device=dev) + call.shapes.offset).view(1, 1, -1, 1)
    kv_pos = torch.arange(k0, k1, device=dev).view(1, 1, 1, -1)
    m = variant.full_mask(call, grids[0], grids[1], q_pos, kv_pos)
    if m is None:
        return None, None
    m = m.expand(*m.shape[:-2], q1 - q0, k1 - k0)
    add = torch.zeros(m.shape, dtype=dt, device=dev).masked_fill_(~m, float("-inf"))
    empty = ~m.any(dim=-1)
    return add, (empty if bool(empty.any()) else None)


def _fused_forward(q, k, v, variant, call: Call, p: Plan, dt, empty_lse: float = 0.0):
    """(out (B, Hq, Sq, D) in dt, lse (B, Hq, Sq)) for the plan's calls; rows with no allowed key get
    `empty_lse` (0 for this backend's own backward; -inf for callers that merge partial results)."""
    b_, hq, sq, d = q.shape
    out = torch.zeros(b_, hq, sq, v.shape[-1], dtype=dt, device=q.device)
    lse = torch.full((b_, hq, sq), empty_lse, dtype=dt, device=q.device)
    grids = _grids(call, q.device)
    for q0, q1, runs in p.blocks:
        if not runs:
            continue
        qb = q[:, :, q0:q1].to(dt)
        outs, lses = [], []
        for k0, k1, kind in runs:
            mask = empty = None
            if kind == MASKED:
                mask, empty = _run_mask(variant, call, grids, q0, q1, k0, k1, dt)
            o, l_ = _FLASH_CPU(qb, k[:, :, k0:k1].to(dt), v[:, :, k0:k1].to(dt), 0.0, kind == CAUSAL,
                               attn_mask=mask, scale=call.scale)
            if empty is not None:  # the kernel gives these rows 0 output and lse 0: they hold no mass
                l_ = l_.masked_fill(empty, float("-inf"))
            outs.append(o)
            lses.append(l_.to(dt))
        if len(outs) == 1:
            o, l_ = outs[0], lses[0]
        else:
            l_ = torch.logsumexp(torch.stack(lses), dim=0)
            l_ = torch.where(torch.isfinite(l_), l_, torch.zeros_like(l_))  # rows with no key at all
            o = outs[0].mul_(torch.exp(lses[0] - l_).unsqueeze(-1))  # the runs' outputs are ours to reuse
            for oi, li in zip(outs[1:], lses[1:]):
                o = o.add_(oi.mul_(torch.exp(li - l_).unsqueeze(-1)))
        out[:, :, q0:q1] = o
        lse[:, :, q0:q1] = torch.where(torch.isfinite(l_), l_, torch.full_like(l_, empty_lse))
    return out, lse


class _Fused(torch.autograd.Function):
    """The fused pass with FlashAttention's backward: per run, the kernel's backward with the merged
    output and log-sum-exp gives that run's exact share of dq and its dk, dv; masks are recomputed."""

    @staticmethod
    def forward(ctx, q, k, v, variant, call, p, dt):
        out, lse = _fused_forward(q, k, v, variant, call, p, dt)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (variant, call, p, dt)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _fused_backward(grad, q, k, v, out, lse, *ctx.args)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _fused_backward(grad, q, k, v, out, lse, variant, call: Call, p: Plan, dt):
    """(dq, dk, dv) in dt of the plan's calls, given the merged output and log-sum-exp of every query
    (0 for rows with no allowed key); each run adds its exact share (FlashAttention's backward)."""
    grad = grad.to(dt)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    dv = torch.zeros(v.shape, dtype=dt, device=q.device)
    grids = _grids(call, q.device)
    for q0, q1, runs in p.blocks:
        if not runs:
            continue
        qb, gb, ob, lb = q[:, :, q0:q1].to(dt), grad[:, :, q0:q1], out[:, :, q0:q1], lse[:, :, q0:q1]
        for k0, k1, kind in runs:
            mask = _run_mask(variant, call, grids, q0, q1, k0, k1, dt)[0] if kind == MASKED else None
            gq, gk, gv = _FLASH_CPU_BWD(gb, qb, k[:, :, k0:k1].to(dt), v[:, :, k0:k1].to(dt), ob, lb, 0.0,
                                        kind == CAUSAL, attn_mask=mask, scale=call.scale)
            dq[:, :, q0:q1] += gq
            dk[:, :, k0:k1] += gk
            dv[:, :, k0:k1] += gv
    return dq, dk, dv


# ---- tiles: online softmax in eager torch ---------------------------------------------------------


def softmax_tiles(variant: SoftmaxVariant, q, k, v, call: Call, q_block: int | None = None,
                  kv_block: int | None = None):
    q_block = q_block or Q_BLOCK
    kv_block = kv_block or KV_BLOCK
    s = call.shapes
    b_, hkv, g = s.batch, s.kv_heads, s.group
    struct = variant.block_structure(call, q_block, kv_block)
    # One kv-tile list per query block, shared by all batch rows and heads: a tile is computed if
    # any (b, h) needs it and skips the mask only if every (b, h) sees it full.
    tiles_any = struct.any.reshape(-1, struct.nq, struct.nk).any(0).tolist()
    tiles_full = struct.full.reshape(-1, struct.nq, struct.nk).all(0).tolist()
    dt = _acc_dtype(q.dtype)
    qg = q.view(b_, hkv, g, s.sq, s.d)
    kg = k.unsqueeze(2)
    vg = v.unsqueeze(2)
    b_idx = torch.arange(b_, device=q.device).view(b_, 1, 1, 1, 1)
    h_idx = torch.arange(s.q_heads, device=q.device).view(1, hkv, g, 1, 1)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *call.inputs.values()))
    outs = []
    for i in range(struct.nq):
        q0, q1 = i * q_block, min((i + 1) * q_block, s.sq)
        cols = [j for j, needed in enumerate(tiles_any[i]) if needed]
        if not cols:
            outs.append(q.new_zeros(b_, hkv, g, q1 - q0, s.dv, dtype=dt))
            continue
        tiles = [(j * kv_block, min((j + 1) * kv_block, s.sk), tiles_full[i][j]) for j in cols]
        q_pos = (torch.arange(q0, q1, device=q.device) + s.offset).view(1, 1, 1, -1, 1)
        args = (variant, call, tiles, q_pos, b_idx, h_idx, dt)
        if needs_grad:
            outs.append(checkpoint(_query_block, qg[..., q0:q1, :], kg, vg, *args, use_reentrant=False))
        else:
            outs.append(_query_block(qg[..., q0:q1, :], kg, vg, *args))
    out = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]
    return out.reshape(b_, s.q_heads, s.sq, s.dv).to(q.dtype)


def _query_block(qb, kg, vg, variant: SoftmaxVariant, call: Call, tiles, q_pos, b_idx, h_idx, dt):
    qb = qb.to(dt)
    shape = (*qb.shape[:-1], 1)
    m = qb.new_full(shape, float("-inf"))
    l = qb.new_zeros(shape)
    acc = qb.new_zeros((*qb.shape[:-1], vg.shape[-1]))
    signed = variant.normalization == "signed"
    inplace = not torch.is_grad_enabled()  # in place only where autograd keeps nothing (no-grad, or its recompute's forward)
    carry = variant.init_carry(call, qb, b_idx, h_idx, q_pos) if variant.carries else None
    for k0, k1, full in reversed(tiles) if variant.carries else tiles:
        kb = kg[..., k0:k1, :].to(dt)
        vb = vg[..., k0:k1, :].to(dt)
        # scaled after the product, as every score variant's own passes (lssar's row sums) compute it
        sc = torch.matmul(qb, kb.transpose(-1, -2)) * call.scale
        kv_pos = torch.arange(k0, k1, device=qb.device).view(1, 1, 1, 1, -1)
        mk = None if full else variant.full_mask(call, b_idx, h_idx, q_pos, kv_pos)
        if variant.carries:
            sc, carry = variant.carry_score(call, sc, carry, b_idx, h_idx, q_pos, kv_pos, mk)
        elif variant.has_score:
            sc = variant.score(call, sc, b_idx, h_idx, q_pos, kv_pos)
        sign = None
        if signed:  # weight sign(s) exp(|s|), normalised by sum exp(|s|): the online softmax runs on |s|
            sign, sc = torch.sign(sc), sc.abs()
        if mk is not None:
            sc = sc.masked_fill_(~mk, float("-inf")) if inplace else sc.masked_fill(~mk, float("-inf"))
        # The running max only stabilises exp(); the weights do not depend on it, so no gradient.
        m_new = torch.maximum(m, sc.detach().amax(dim=-1, keepdim=True))
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = sc.sub_(m_safe).exp_() if inplace else torch.exp(sc - m_safe)
        corr = torch.exp(m - m_safe)
        l = l * corr + p.sum(dim=-1, keepdim=True)
        if sign is not None:
            p = p.mul_(sign) if inplace else p * sign
        acc = acc * corr + torch.matmul(p, vb)
        m = m_new
    return acc / torch.where(l > 0, l, torch.ones_like(l))
