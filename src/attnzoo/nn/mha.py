"""Multi-head attention as a trainable module over any attnzoo variant, with GQA/MQA, RoPE and a
decoding cache."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..core.info import Paper
from .common import (LEARNED_INPUTS, ROPE_PAPER, KVCache, SizeMixin, StateCache, apply_rope, check_bool,
                     check_cache, check_float, check_input, check_inputs, element_bytes, head_layout, is_recurrent,
                     positions, resolve_variant, rope_cos_sin)


class MultiheadAttention(SizeMixin, nn.Module):
    """q/k/v/o projections around an attnzoo variant, in SDPA layout.

    - `kv_heads` < `heads` shares each KV head among `heads // kv_heads` query heads (GQA; 1 = MQA);
      query head h reads KV head h // (heads // kv_heads).
    - `rope=True` rotates q and k by position (rotate-half, as Llama; base `rope_base`), positions
      counted from the start of the sequence, the cache included.
    - `variant` and `**params` configure the core: `az.get(variant, **params)`. Softmax-family variants
      (masks, scores, sparse) keep a `KVCache` of post-RoPE keys and values; recurrent variants (the
      linear family) keep a `StateCache`: a full-sequence call with `output_final_state=True`, and
      `step` for one decoded token. GLA's log forget gates `g` are learned here (fla's low-rank gate)
      unless given in forward, and so is dma's dynamic mask `dt` (from the values, cache included).

    `forward(x, cache=None, causal=True, **inputs) -> (y, cache)`: x (B, S, dim); `inputs` are the
    variant's per-call tensors (document ids, ...; sized for the whole sequence so far where they
    span keys) and call options (`backend`, `mode`). Feeding a sequence in pieces, each with the
    cache returned by the previous, equals one pass over the whole (causal).
    """

    paper: ClassVar[Paper] = Paper("Attention Is All You Need", 2017, "1706.03762")
    rope_paper: ClassVar[Paper] = ROPE_PAPER

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, head_dim: int | None = None,
                 variant: str = "full", rope: bool = True, rope_base: float = 10000.0, bias: bool = False,
                 **params):
        super().__init__()
        owner = type(self).__name__
        self.heads, self.kv_heads, self.head_dim = head_layout(owner, dim, heads, kv_heads, head_dim)
        self.dim = dim
        self.rope = check_bool(owner, "rope", rope)
        self.rope_base = check_float(owner, "rope_base", rope_base)
        self.bias = check_bool(owner, "bias", bias)
        if rope and self.head_dim % 2:
            raise ValueError(f"{owner}: RoPE rotates pairs of channels, head_dim must be even; got head_dim="
                             f"{self.head_dim} (or pass rope=False)")
        self.variant, self.params = variant, dict(params)
        self.attn = resolve_variant(owner, variant, params)
        self.recurrent = is_recurrent(self.attn)
        hd, h, hkv = self.head_dim, self.heads, self.kv_heads
        self.q_proj = nn.Linear(dim, h * hd, bias=bias)
        self.k_proj = nn.Linear(dim, hkv * hd, bias=bias)
        self.v_proj = nn.Linear(dim, hkv * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, dim, bias=bias)
        self.learned = nn.ModuleDict()
        if variant in LEARNED_INPUTS:
            name, factory = LEARNED_INPUTS[variant]
            self.learned[name] = factory(dim, hkv, hd)

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def config(self) -> dict:
        """The constructor's arguments (rebuilds an equal module: `type(m)(**m.config)`)."""
        return dict(dim=self.dim, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                    variant=self.variant, rope=self.rope, rope_base=self.rope_base, bias=self.bias, **self.params)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"variant={self.variant!r}, rope={self.rope}{extra}")

    # ---- sizes ------------------------------------------------------------------------------------
    def kv_elements_per_token(self) -> int:
        """K and V of every KV head; 0 for recurrent variants (constant state)."""
        return 0 if self.recurrent else 2 * self.kv_heads * self.head_dim

    def state_bytes(self, batch: int = 1, dtype: torch.dtype | None = None) -> int:
        if not self.recurrent:
            return 0
        dtype = self._default_dtype(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # states accumulate in float32
        return math.prod(self.attn.state_shape(batch, self.kv_heads, self.head_dim, self.head_dim)) * element_bytes(acc)

    # ---- forward ----------------------------------------------------------------------------------
    def attention_inputs(self, q, k, v) -> dict:
        """Inputs the module makes for its softmax-family variant from this call's q and the whole k, v (cache
        included); inputs given to forward win. The learned ones (dma's dynamic mask) read v."""
        return {name: module(v).to(v.dtype) for name, module in self.learned.items()}

    def head_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token weights of each head's output (B, H, S), or None (all ones). MoH routes here."""
        return None

    def forward(self, x: torch.Tensor, cache=None, causal: bool = True, **inputs):
        owner = type(self).__name__
        x = check_input(owner, x, self.dim)
        check_inputs(owner, inputs)
        b, s, _ = x.shape
        kind = StateCache if self.recurrent else KVCache
        if cache is not None:
            check_cache(owner, cache, kind, b, x.device)
        offset = 0 if cache is None else cache.length
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            cos, sin = rope_cos_sin(positions(offset, s, x.device), self.head_dim, self.rope_base, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.recurrent:
            o, cache = self._recurrent(x, q, k, v, cache, causal, inputs, offset)
        else:
            if cache is not None:
                if cache.k.shape[1:2] + cache.k.shape[3:] != k.shape[1:2] + k.shape[3:]:
                    raise ValueError(f"{owner}: cache holds keys {tuple(cache.k.shape)}, this module makes "
                                     f"(B, {self.kv_heads}, S, {self.head_dim})")
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            o = self.attn(q, k, v, causal=causal, **{**self.attention_inputs(q, k, v), **inputs})
            cache = KVCache(k, v)
        w = self.head_weights(x)
        if w is not None:
            o = o * w.unsqueeze(-1).to(o.dtype)
        y = self.o_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
        return y, cache

    def _recurrent(self, x, q, k, v, cache, causal, inputs, offset):
        for name, gate in self.learned.items():
            if name not in inputs:
                inputs[name] = gate(x)
        state = None if cache is None else cache.state
        if state is not None and x.shape[1] == 1:
            # one decoded token: the variant's O(1) step
            step_inputs = self.attn.per_token_inputs()  # sliced at the token; per-call ones (Mega's EMA) whole
            per_token = {n: t[:, :, 0] if n in step_inputs else t for n, t in inputs.items()
                         if isinstance(t, torch.Tensor)}
            o_t, state = self.attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, **per_token)
            o = o_t.unsqueeze(2).to(q.dtype)
        else:
            o, state = self.attn(q, k, v, causal=causal, initial_state=state, output_final_state=True, **inputs)
        return o, StateCache(state, offset + x.shape[1])
