"""Ragged per-head KV storage: each (row, KV head) holds only its own kept entries.

A rectangular cache pads every KV head of a layer to its fullest head, so per-head budgets save fewer
bytes than entries. Here a layer holds two parts:
- `packed`: the entries kept by compression, flattened head after head as varlen attention lays out
  sequences (segment i = row i // Hkv, KV head i % Hkv, at `offsets[i]:offsets[i + 1]`), optionally
  quantized (KIVI's layout: keys per channel over groups of `group` entries of a segment, values per
  entry), with an optional additive logit per entry (razor's compensation tokens);
- the tail: entries written since the last compression, dense `(B, Hkv, T, D)` and full precision
  (every head holds them all, so no padding), with their padding mask.

`ragged_attention` attends over both, in plain torch on any device and with nothing padded to the
fullest head: when every head holds as many entries (uniform budgets: snapkv, tova,
expected_attention...) by batched products over views of the packed entries as one (segments, n, D)
tensor; else over few segments by one product per segment's slice, over many by per-entry gathers and
segment reductions (index_add / scatter_reduce). Decoding with a press must not be slower than
without, so no path does arithmetic on entries a segment does not hold; on CUDA a decoding step (one
query per row) is one Triton kernel launch per layer (`backends/triton/kv_decode.py`).
`padded_attention` is its definition written plainly: the packed entries scattered into a
rectangular, masked cache, then one softmax.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from .base import require_cache_api
from .quant import dequantize_into, pack_codes, quantize, unpack_codes

SCALE_DTYPE = torch.float16  # scales and minimums of quantized entries are stored as KIVI stores them
# Up to this many (row, KV head) segments of unequal lengths, ragged attention loops over the segments
# (one small product each: fewer and faster kernels than per-entry gathers); beyond it, per-entry gathers.
LOOP_SEGMENTS = 16


def segment_ids(lengths: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """(N,) segment of each packed entry, from the (segments,) entry counts (`total`: their sum, when
    known, spares a device sync)."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths,
                                   output_size=int(lengths.sum()) if total is None else total)


def first_key_groups(lengths: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segments,) the first key-quantization group of each segment and (segments,) its number of groups:
    runs of `group` consecutive entries of a segment, never spanning two segments."""
    per_segment = (lengths + group - 1) // group
    return torch.cumsum(per_segment, 0) - per_segment, per_segment


def key_groups(lengths: torch.Tensor, group: int, total: int | None = None, seg: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) quantization group of each packed key (see `first_key_groups`), and the number of groups (a
    0-d tensor). `seg`: the entries' segments, when already computed."""
    first, per_segment = first_key_groups(lengths, group)
    seg = segment_ids(lengths, total) if seg is None else seg
    start = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(len(seg), device=lengths.device) - start[seg]
    return first[seg] + position // group, per_segment.sum()


class Packed:
    """The kept entries of every (row, KV head) of one layer, flattened (see the module docstring)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                 bias: torch.Tensor | None = None, bits: int | None = None, group: int = 32):
        if keys.dim() != 2 or values.dim() != 2 or keys.shape[0] != values.shape[0]:
            raise ValueError(f"keys (N, D) and values (N, Dv) with the same N expected; got {tuple(keys.shape)} "
                             f"and {tuple(values.shape)}")
        if int(lengths.sum()) != keys.shape[0]:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {keys.shape[0]} entries were given")
        self.n_segments, self.n_entries = len(lengths), keys.shape[0]
        self.dtype, self.bits, self.group = keys.dtype, bits, group
        self.offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)
        self.bounds: list[int] = self.offsets.tolist()  # the offsets as slice bounds, read once
        # entries per segment when every segment holds as many (then the entries are a (segments, n, D) tensor)
        self.uniform: int | None = None
        if len(lengths) and bool((lengths == lengths[0]).all()):
            self.uniform = int(lengths[0])
        self.bias = bias
        self.derived: dict = {}  # values derived once from the (immutable) entries, e.g. a kernel's launch arguments
        if bits is None:
            self._keys, self._values = keys, values
        else:
            groups, n_groups = key_groups(lengths.long(), group)
            self._keys = quantize_grouped(keys, groups, int(n_groups), bits)
            self._values = quantize(values, bits, dim=-1, scale_dtype=SCALE_DTYPE)

    @property
    def lengths(self) -> torch.Tensor:
        return (self.offsets[1:] - self.offsets[:-1]).long()

    def segments(self) -> torch.Tensor:
        return segment_ids(self.lengths, self.n_entries)

    def keys(self, seg: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) keys (dequantized); `seg`: the entries' segments, when already computed."""
        if self.bits is None:
            return self._keys
        codes, scale, lo = self._keys
        # scales widened before they multiply: float16 arithmetic is slow on CPUs
        scale, lo = scale.to(self.dtype), lo.to(self.dtype)
        if self.uniform is not None:  # the groups are the same runs in every segment: broadcast, no gather
            return _dequantize_uniform_keys(codes, scale, lo, self.n_segments, self.uniform, self.group, self.bits)
        groups, _ = key_groups(self.lengths, self.group, self.n_entries, seg)
        return unpack_codes(codes, self.bits).to(self.dtype) * scale[groups] + lo[groups]

    def values(self) -> torch.Tensor:
        if self.bits is None:
            return self._values
        codes, scale, lo = self._values  # dequantized in the entries' dtype (float16 arithmetic is slow on CPUs)
        out = torch.empty(self.n_entries, codes.shape[-1] * (8 // self.bits), dtype=self.dtype, device=codes.device)
        return dequantize_into(out, codes, scale.to(self.dtype), lo.to(self.dtype), self.bits)

    def bytes_held(self) -> int:
        parts = [self.offsets, self.bias]
        parts += list(self._keys) if self.bits is not None else [self._keys]
        parts += list(self._values) if self.bits is not None else [self._values]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _dequantize_uniform_keys(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, segments: int, n: int,
                             group: int, bits: int) -> torch.Tensor:
    """(segments * n, D) keys from their (N, D') packed codes when every segment holds `n` entries: its
    `ceil(n / group)` groups are whole runs of `group` entries but the last, so the (groups, D) scales
    and minimums broadcast over views of the entries."""
    d = scale.shape[-1]
    per_segment, whole = -(-n // group), n // group
    out = torch.empty(segments, n, d, dtype=scale.dtype, device=codes.device)
    codes = codes.view(segments, n, codes.shape[-1])
    scale, lo = scale.view(segments, per_segment, 1, d), lo.view(segments, per_segment, 1, d)
    if whole:
        dequantize_into(out[:, :whole * group].view(segments, whole, group, d),
                        codes[:, :whole * group].view(segments, whole, group, -1), scale[:, :whole], lo[:, :whole],
                        bits)
    if whole < per_segment:  # the last, partial group
        dequantize_into(out[:, whole * group:], codes[:, whole * group:], scale[:, -1], lo[:, -1], bits)
    return out.view(segments * n, d)


def quantize_grouped(x: torch.Tensor, groups: torch.Tensor, n_groups: int, bits: int):
    """Per-channel asymmetric quantization of the (N, D) rows of `x` over the groups `groups` (N,):
    (codes packed along D, scale (n_groups, D), minimum (n_groups, D))."""
    index = groups.view(-1, 1).expand_as(x)
    lo = x.new_full((n_groups, x.shape[1]), math.inf).scatter_reduce(0, index, x, "amin")
    hi = x.new_full((n_groups, x.shape[1]), -math.inf).scatter_reduce(0, index, x, "amax")
    levels = 2 ** bits - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8).to(SCALE_DTYPE)
    lo = lo.to(SCALE_DTYPE)
    codes = torch.round((x - lo[groups].to(x.dtype)) / scale[groups].to(x.dtype)).clamp(0, levels).to(torch.uint8)
    return pack_codes(codes, bits), scale, lo


def pack(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None,
         bits: int | None = None, group: int = 32) -> Packed:
    """Packed entries from rectangular (B, Hkv, S, D) keys / values and a (B, Hkv, S) keep mask (slot
    order is kept within each head); `bias` (B, Hkv, S): additive logits, stored only where nonzero."""
    if keep.shape != keys.shape[:3] or keep.shape != values.shape[:3]:
        raise ValueError(f"keep must be (B, Hkv, S) = {tuple(keys.shape[:3])}; got {tuple(keep.shape)}")
    lengths = keep.flatten(0, 1).sum(-1)
    flat_bias = None
    if bias is not None:
        flat_bias = bias[keep].float()
        if not bool((flat_bias != 0).any()):
            flat_bias = None
    return Packed(keys[keep], values[keep], lengths, flat_bias, bits, group)


def unpack(packed: Packed, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectangular (B, Hkv, n, D) keys and values with the entries packed to the front of each head, and
    the (B, Hkv, n) additive bias (-inf on empty slots): the padded layout a rectangular cache holds."""
    lengths = packed.lengths
    n = int(lengths.max()) if len(lengths) else 0
    heads = packed.n_segments // batch
    slot = torch.arange(n, device=lengths.device).view(1, n) < lengths.view(-1, 1)  # (segments, n)
    keys, values = packed.keys(), packed.values()
    k = keys.new_zeros(packed.n_segments, n, keys.shape[1])
    v = values.new_zeros(packed.n_segments, n, values.shape[1])
    k[slot], v[slot] = keys, values
    bias = torch.full((packed.n_segments, n), -math.inf, device=keys.device,
                      dtype=torch.float32 if packed.bias is None else packed.bias.dtype)
    bias[slot] = 0.0 if packed.bias is None else packed.bias
    return (k.view(batch, heads, n, keys.shape[1]), v.view(batch, heads, n, values.shape[1]),
            bias.view(batch, heads, n))


def tail_bias(tail_valid: torch.Tensor | None, n_queries: int, heads: int, batch: int = 1,
              length: int = 0) -> torch.Tensor:
    """(B, Hkv, Sq, T) additive mask over the tail: padding excluded (`tail_valid` (B, T), None: no
    padding in a batch of `batch` rows and `length` entries), and the last `n_queries` tail entries
    (this forward's) causal to this forward's queries."""
    if tail_valid is None:
        tail_valid = torch.ones(batch, length, dtype=torch.bool)
    length = tail_valid.shape[1]
    query_at = torch.arange(length - n_queries, length, device=tail_valid.device)
    visible = torch.arange(length, device=tail_valid.device).view(1, -1) <= query_at.view(-1, 1)  # (Sq, T)
    allowed = visible.unsqueeze(0) & tail_valid.unsqueeze(1)  # (B, Sq, T)
    bias = torch.zeros(allowed.shape, device=tail_valid.device).masked_fill(~allowed, -math.inf)
    return bias.unsqueeze(1).expand(-1, heads, -1, -1)


def ragged_attention(query: torch.Tensor, packed: Packed, tail_keys: torch.Tensor, tail_values: torch.Tensor,
                     tail_valid: torch.Tensor | None, scaling: float, loop_segments: int = LOOP_SEGMENTS
                     ) -> torch.Tensor:
    """(B, Hq, Sq, Dv) softmax attention of `query` (B, Hq, Sq, D) over the packed entries of each KV
    head and the tail (B, Hkv, T, D), the tail's last Sq entries causal to the queries (`tail_valid`
    (B, T): padding; None: none). Rows with nothing to attend to give zeros."""
    b, hq, sq, d = query.shape
    if sq == 1 and (query.is_cuda or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        out = _decoding_kernel().try_decode(query, packed, tail_keys, tail_values, tail_valid, scaling)
        if out is not None:
            return out
    return _torch_ragged_attention(query, packed, tail_keys, tail_values, tail_valid, scaling, loop_segments)


@functools.lru_cache(maxsize=1)
def _decoding_kernel():
    """The Triton decoding kernel's module (one launch per layer: a decoding step is bound by host work),
    imported on first use."""
    from ..backends.triton import kv_decode

    return kv_decode


def _torch_ragged_attention(query, packed: Packed, tail_keys, tail_values, tail_valid, scaling: float,
                            loop_segments: int = LOOP_SEGMENTS) -> torch.Tensor:
    """`ragged_attention` in plain torch, on any device."""
    b, hq, sq, d = query.shape
    hkv = tail_keys.shape[1]
    groups = hq // hkv
    rows, segments = groups * sq, b * hkv
    q = query.reshape(segments, rows, d)  # (segments, G * Sq, D): the query heads that share each KV head
    logit_t = torch.bmm(q, tail_keys.reshape(segments, -1, d).transpose(1, 2)) * scaling
    if tail_valid is not None or sq > 1:  # one query and no padding: every tail entry is visible
        mask_t = tail_bias(tail_valid, sq, hkv, b, tail_keys.shape[2]).to(query.device, query.dtype)
        logit_t = logit_t + mask_t.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(segments, rows, -1)
    tail_values = tail_values.reshape(segments, -1, tail_values.shape[-1])
    if packed.uniform is not None:
        out, total = _uniform_packed_attention(q, packed, logit_t, tail_values, scaling)
    elif segments <= loop_segments:
        out, total = _per_segment_packed_attention(q, packed, logit_t, tail_values, scaling)
    else:
        out, total = _gathered_packed_attention(q, packed, logit_t, tail_values, scaling)
    out = out / total.unsqueeze(-1).masked_fill(total.unsqueeze(-1) == 0, 1.0)
    return out.view(b, hq, sq, -1)


def _shifted_exp(logits: torch.Tensor) -> torch.Tensor:
    """exp(logits - each row's maximum): unnormalised softmax weights, zeros in rows that see nothing (-inf)."""
    if not logits.shape[-1]:
        return logits
    top = logits.amax(-1, keepdim=True)
    return torch.exp(logits - top.masked_fill(top == -math.inf, 0.0))


def _uniform_packed_attention(q, packed: Packed, logit_t, tail_values, scaling):
    """Unnormalised output and softmax denominators when every segment holds `packed.uniform` entries:
    batched products over the (segments, n, D) views of the packed entries, then the tail's."""
    segments, _, d = q.shape
    n = packed.uniform
    keys, values = packed.keys().to(q.dtype), packed.values().to(q.dtype)
    keys, values = keys.view(segments, n, d), values.view(segments, n, values.shape[-1])
    logit_p = torch.bmm(q, keys.transpose(1, 2)) * scaling  # (segments, G * Sq, n)
    if packed.bias is not None:
        logit_p = logit_p + packed.bias.to(logit_p.dtype).view(segments, 1, n)
    weight = _shifted_exp(torch.cat([logit_p, logit_t], dim=-1))  # (segments, G * Sq, n + T)
    out = torch.baddbmm(torch.bmm(weight[..., n:], tail_values), weight[..., :n], values)
    return out, weight.sum(-1)


def _per_segment_packed_attention(q, packed: Packed, logit_t, tail_values, scaling):
    """Unnormalised output and softmax denominators over few segments of any lengths: each segment's
    entries are a contiguous slice, so one small product per segment, no arithmetic on other segments'."""
    keys, values = packed.keys().to(q.dtype), packed.values().to(q.dtype)
    outs, totals = [], []
    for s, (start, end) in enumerate(zip(packed.bounds[:-1], packed.bounds[1:])):
        logit_p = (q[s] @ keys[start:end].T) * scaling  # (G * Sq, n)
        if packed.bias is not None:
            logit_p = logit_p + packed.bias[start:end].to(logit_p.dtype)
        weight = _shifted_exp(torch.cat([logit_p, logit_t[s]], dim=-1))
        n = end - start
        outs.append(torch.addmm(weight[:, n:] @ tail_values[s], weight[:, :n], values[start:end]))
        totals.append(weight.sum(-1))
    return torch.stack(outs), torch.stack(totals)


def _gathered_packed_attention(q, packed: Packed, logit_t, tail_values, scaling):
    """Unnormalised output and softmax denominators over many segments of any lengths, by per-entry
    gathers and segment reductions."""
    segments, rows, d = q.shape
    seg = packed.segments()
    keys, values = packed.keys(seg).to(q.dtype), packed.values().to(q.dtype)
    logit_p = torch.bmm(q.index_select(0, seg), keys.unsqueeze(-1)).squeeze(-1) * scaling  # (N, G * Sq)
    if packed.bias is not None:
        logit_p = logit_p + packed.bias.to(logit_p.dtype).unsqueeze(1)
    top = logit_t.amax(-1) if logit_t.shape[-1] else q.new_full((segments, rows), -math.inf)
    top = top.scatter_reduce(0, seg.view(-1, 1).expand_as(logit_p), logit_p, "amax")
    top = top.masked_fill(top == -math.inf, 0.0)
    weight_p = torch.exp(logit_p - top.index_select(0, seg))
    weight_t = torch.exp(logit_t - top.unsqueeze(-1))
    total = weight_t.sum(-1).index_add(0, seg, weight_p)
    out = torch.bmm(weight_t, tail_values).index_add(0, seg, weight_p.unsqueeze(-1) * values.unsqueeze(1))
    return out, total


def padded_attention(query: torch.Tensor, packed: Packed, tail_keys: torch.Tensor, tail_values: torch.Tensor,
                     tail_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """The definition of `ragged_attention`: a rectangular cache padded to the fullest head, masked."""
    b, hq, sq, _ = query.shape
    hkv = tail_keys.shape[1]
    k, v, bias = unpack(packed, b)
    keys = torch.cat([k.to(query.dtype), tail_keys], dim=2).repeat_interleave(hq // hkv, dim=1)
    values = torch.cat([v.to(query.dtype), tail_values], dim=2).repeat_interleave(hq // hkv, dim=1)
    mask = torch.cat([bias.unsqueeze(2).expand(-1, -1, sq, -1), tail_bias(tail_valid, sq, hkv, b, tail_keys.shape[2]).to(query.device)], dim=-1)
    logits = query @ keys.transpose(-1, -2) * scaling + mask.repeat_interleave(hq // hkv, dim=1).to(query.dtype)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0) @ values


@functools.lru_cache(maxsize=1)
def ragged_layer_class():
    _, DynamicLayer = require_cache_api()

    class RaggedLayer(DynamicLayer):
        """A DynamicLayer whose `keys` / `values` hold only the tail; compressed entries live in `packed`.
        `update` returns the tail, which only attnzoo's attention hook (a press session) knows how to
        complete: used outside an active session with packed entries, it raises rather than let the
        model attend to the tail alone."""

        def __init__(self):
            super().__init__()
            self.packed: Packed | None = None
            self.tail_valid: torch.Tensor | None = None  # (B, T) bool; None: no padding in the tail
            self.seen = 0
            self.reader = None  # the session whose attention hook reads this layer

        def update(self, key_states, value_states, *args, **kwargs):
            if self.packed is not None and (self.reader is None or not self.reader.active):
                raise RuntimeError("this cache holds ragged (per-head) entries that only an active attnzoo.kv press "
                                   "session can attend to: run the model inside `with press(model):`")
            self.seen += key_states.shape[-2]
            return super().update(key_states, value_states, *args, **kwargs)

        def get_seq_length(self) -> int:
            return self.seen

        def bytes_held(self) -> int:
            parts = [self.keys, self.values, self.tail_valid]
            held = sum(t.numel() * t.element_size() for t in parts if t is not None)
            return held + (self.packed.bytes_held() if self.packed is not None else 0)

        def entries(self) -> int:
            if self.keys is None:
                tail = 0
            elif self.tail_valid is None:
                tail = self.keys.shape[0] * self.keys.shape[1] * self.keys.shape[2]
            else:
                tail = int(self.tail_valid.sum()) * self.keys.shape[1]
            return tail + (self.packed.n_entries if self.packed is not None else 0)

        def store(self, packed: Packed) -> None:
            """Hold `packed` and an empty tail (the entries were compressed into it)."""
            self.packed = packed
            self.keys, self.values = self.keys[..., :0, :], self.values[..., :0, :]
            self.tail_valid = None if self.tail_valid is None else self.tail_valid[:, :0]

        def reset(self) -> None:
            super().reset()
            self.packed, self.tail_valid, self.seen = None, None, 0

    return RaggedLayer


def ragged_cache(config) -> "object":
    """A transformers DynamicCache whose layers are ragged (pass it to `generate` or a forward inside
    `with press(model, layout="ragged"):`; a session also converts a plain DynamicCache)."""
    DynamicCache, _ = require_cache_api()
    cache = DynamicCache(config=config)
    layer = ragged_layer_class()
    cache.layers = [layer() for _ in cache.layers]
    return cache
