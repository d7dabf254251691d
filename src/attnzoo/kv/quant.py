"""KV-cache quantization: entries are kept, stored in 8, 4 or 2 bits."""
from __future__ import annotations

import functools

import torch

from ..core.info import Paper, Param, positive_int
from .base import KVPress, register, require_cache_api


BITS = (8, 4, 2)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of `bits` bits packed 8 // bits per byte along the last axis (its length a multiple of
    that), in planes: byte j holds codes j, j + n, j + 2n... (n = length / per byte), so unpacking
    concatenates whole planes rather than interleaving single codes (an interleave is slow on CPUs)."""
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"{bits}-bit codes pack {per} per byte: the last axis ({codes.shape[-1]}) must be a multiple "
                         f"of {per}")
    planes = codes.view(*codes.shape[:-1], per, codes.shape[-1] // per)  # (not -1: zero rows are allowed)
    out = planes[..., 0, :].clone()
    for i in range(1, per):
        out |= planes[..., i, :] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`."""
    per, mask = 8 // bits, 2 ** bits - 1
    if per == 1:
        return packed
    return torch.cat([(packed >> (bits * i)) & mask for i in range(per)], dim=-1)


def quantize(x: torch.Tensor, bits: int, dim: int, scale_dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of `x` with one (scale, minimum) per slice along `dim`, stored in
    `scale_dtype` (default: x's). Returns (uint8 codes, 8 // bits packed per byte along the last axis;
    scale; minimum)."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    if scale_dtype is not None:  # codes are computed from the stored (rounded) scale and minimum
        scale, lo = scale.to(scale_dtype), lo.to(scale_dtype)
    codes = torch.round((x - lo.to(x.dtype)) / scale.to(x.dtype)).clamp(0, levels).to(torch.uint8)
    return pack_codes(codes, bits), scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    shape = (*codes.shape[:-1], codes.shape[-1] * (8 // bits))
    return dequantize_into(codes.new_empty(shape, dtype=scale.dtype), codes, scale, lo, bits)


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int
                    ) -> torch.Tensor:
    """`out` (any strides) = the codes times `scale` plus `lo`, in out's dtype: each plane of codes is
    written into its slice of `out` and scaled in place (no unpacked or float copy of the codes)."""
    per, mask = 8 // bits, 2 ** bits - 1
    n = codes.shape[-1]
    for i in range(per):
        plane = codes >> (bits * i) if i else codes
        out[..., i * n:(i + 1) * n].copy_(plane & mask if i < per - 1 else plane)
    return out.mul_(scale).add_(lo)


@functools.lru_cache(maxsize=1)
def _quantized_layer_class():
    _, DynamicLayer = require_cache_api()

    class QuantizedKVLayer(DynamicLayer):
        """A DynamicLayer that stores keys per channel over groups of `group` tokens (KIVI's layout; the
        newest < `group` keys stay in full precision until their group fills) and values per token.
        `keys` holds only the full-precision key residual, `values` nothing; `update` returns the
        dequantized stored entries followed by the step's own fresh ones. Stored entries sit in one packed
        tensor per kind (codes (B, H, S, D / per-byte), scales and minimums per group or token), so each step
        dequantizes them in one pass whatever their number."""

        def __init__(self, bits: int, group: int):
            super().__init__()
            self.bits, self.group = bits, group
            self.key_codes = self.key_scale = self.key_lo = None      # (B, H, n * group, D'), (B, H, n, 1, D) x 2
            self.value_codes = self.value_scale = self.value_lo = None  # (B, H, S, D'), (B, H, S, 1) x 2
            self.length = 0

        def _attended(self, kind: str, fresh: list[torch.Tensor]) -> torch.Tensor:
            """The stored `kind` entries dequantized, then `fresh` ((B, H, n, D) each), written straight into
            one tensor (no copy of the dequantized entries to concatenate them)."""
            codes, scale, lo = (getattr(self, f"{kind}_{n}") for n in ("codes", "scale", "lo"))
            if codes is None:
                return torch.cat(fresh, dim=-2)
            b, h, stored, _ = codes.shape
            x = fresh[-1]
            out = x.new_empty(b, h, stored + sum(t.shape[-2] for t in fresh), x.shape[-1])
            head = out[..., :stored, :]
            if kind == "key":  # per channel over groups of `group` tokens: (B, H, groups, group, D) views
                head = head.view(b, h, stored // self.group, self.group, -1)
                codes = codes.view(b, h, stored // self.group, self.group, -1)
            dequantize_into(head, codes, scale, lo, self.bits)
            for t in fresh:
                out[..., stored:stored + t.shape[-2], :].copy_(t)
                stored += t.shape[-2]
            return out

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
            # This step attends to the stored (dequantized) entries and its own fresh ones, as KIVI does.
            keys = self._attended("key", [self.keys, key_states])
            values = self._attended("value", [value_states])
            self.length += key_states.shape[-2]
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            full = self.keys.shape[-2] // self.group * self.group
            if full:  # whole groups: quantized per channel over each group's tokens
                b, h, _, d = self.keys.shape
                grouped = self.keys[..., :full, :].reshape(b, h, full // self.group, self.group, d)
                codes, scale, lo = quantize(grouped, self.bits, dim=-2)
                self._append("key", codes.flatten(2, 3), scale, lo)
                self.keys = self.keys[..., full:, :]
            self._append("value", *quantize(value_states, self.bits, dim=-1))
            return keys, values

        def _append(self, kind: str, codes, scale, lo):
            names = (f"{kind}_codes", f"{kind}_scale", f"{kind}_lo")
            old = [getattr(self, n) for n in names]
            for n, o, x in zip(names, old, (codes, scale, lo)):
                setattr(self, n, x if o is None else torch.cat([o, x], dim=2))

        def get_seq_length(self) -> int:
            return self.length

        def bytes_held(self) -> int:
            parts = (self.key_codes, self.key_scale, self.key_lo, self.value_codes, self.value_scale, self.value_lo,
                     self.keys)
            return sum(t.numel() * t.element_size() for t in parts if t is not None)

    return QuantizedKVLayer


@register
class KVQuantPress(KVPress):
    name = "kv_quant"
    paper = Paper("KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", 2024, "2402.02750")
    stages = ("prefill", "decode")
    kind = "quantize"
    summary = ("Keeps every entry, stored quantized: keys per channel over groups of `group` tokens (the "
               "newest partial group in full precision), values per token; int8, int4 or int2 (two or four codes per byte). "
               "`ratio` must be 0: nothing is removed; the saving shows in the measured bytes.")
    params = KVPress.params + (
        Param("bits", 8, "bits per stored number: 8, 4 or 2", (int,), lambda v: v in BITS, "8, 4 or 2"),
        positive_int("group", 32, "tokens per key-quantization group"),
    )

    def validate_config(self):
        if self.ratio != 0:
            raise ValueError("kv_quant removes no entries: ratio must be 0 (choose bits=8, 4 or 2 instead)")

    @property
    def label(self) -> str:
        return f"kv_quant(int{self.bits})"

    @property
    def active(self) -> bool:
        return True

    def on_new_cache(self, cache, n_layers):
        layer_class = _quantized_layer_class()
        if len(cache.layers) < n_layers:
            cache.layers.extend(layer_class(self.bits, self.group) for _ in range(n_layers - len(cache.layers)))
        for i, layer in enumerate(cache.layers):
            if layer.get_seq_length():
                raise ValueError("kv_quant must see the sequence from its first token (got a non-empty cache)")
            cache.layers[i] = layer_class(self.bits, self.group)
