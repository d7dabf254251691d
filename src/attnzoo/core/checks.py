"""Input checks shared by every variant: clear ValueError/TypeError naming the argument."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Shapes:
    """Sizes of one call, in SDPA layout: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)."""

    batch: int
    q_heads: int
    kv_heads: int
    sq: int
    sk: int
    d: int
    dv: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def offset(self) -> int:
        """Absolute position of query 0 in the key sequence (bottom-right alignment)."""
        return self.sk - self.sq

    def query_positions(self, start: int = 0, stop: int | None = None, device=None) -> torch.Tensor:
        """Positions in the key sequence of queries [start, stop): query i sits at i + Sk - Sq. The one
        place the bottom-right alignment of every pattern is written."""
        return torch.arange(start + self.offset, (self.sq if stop is None else stop) + self.offset, device=device)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Shapes:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = "(B, Hq, Sq, D)" if name == "q" else f"(B, Hkv, Sk, {'D' if name == 'k' else 'Dv'})"
            raise ValueError(f"{name} must have rank 4 {want}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    bv, hv, skv, dv = v.shape
    if bk != b or bv != b:
        raise ValueError(f"batch sizes differ: q has B={b}, k has B={bk}, v has B={bv}; expected equal")
    if dk != d:
        raise ValueError(f"k must have head dim D={d} like q (B, Hkv, Sk, {d}), got shape {tuple(k.shape)}")
    if hv != hkv or skv != sk:
        raise ValueError(
            f"v must be (B, Hkv={hkv}, Sk={sk}, Dv) to match k, got shape {tuple(v.shape)}"
        )
    if min(sq, sk, d, dv) == 0 or hq == 0 or hkv == 0:
        raise ValueError(f"empty dimension in q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hq % hkv != 0:
        raise ValueError(f"query heads Hq={hq} must be a multiple of key/value heads Hkv={hkv} (GQA/MQA)")
    return Shapes(b, hq, hkv, sq, sk, d, dv)


def check_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return d**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite float > 0 (default D**-0.5), got {scale!r}")
    return float(scale)


def check_causal(causal: bool, shapes: Shapes) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and shapes.sq > shapes.sk:
        raise ValueError(
            f"causal=True needs Sq <= Sk (queries are the last Sq of Sk positions), got Sq={shapes.sq} > Sk={shapes.sk}"
        )


def check_input_tensor(variant: str, name: str, t, shape: tuple[int, ...], shape_doc: str, kind: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{variant}: input {name!r} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{variant}: input {name!r} must have shape {shape_doc} = {tuple(shape)}, got {tuple(t.shape)}")
    if kind == "long" and (t.dtype.is_floating_point or t.dtype == torch.bool):
        raise TypeError(f"{variant}: input {name!r} must be an integer tensor, got {t.dtype}")
    if kind == "float" and not t.dtype.is_floating_point:
        raise TypeError(f"{variant}: input {name!r} must be a float tensor, got {t.dtype}")
    if kind == "bool" and t.dtype != torch.bool:
        raise TypeError(f"{variant}: input {name!r} must be a bool tensor, got {t.dtype}")
    return t
