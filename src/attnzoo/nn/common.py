"""What the attention modules share: argument checks, rotary embeddings (rotate-half, as Llama), the
decoding caches, the attention core (any attnzoo variant) and the size accounting.

The core of every module is a configured variant, `az.get(variant, **params)`, called in SDPA layout
(B, H, S, D). Softmax-family variants (masks, scores, sparse) read a KV cache: the new keys are
appended and the new queries are the last positions (bottom-right alignment), so a cached step
equals recomputing the whole sequence. Recurrent variants (the linear family) carry their state:
`output_final_state=True` on a full call, `step` for a single decoded token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.info import Paper

ROPE_PAPER = Paper("RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021, "2104.09864")
# Call options the modules manage themselves through their cache (refused in forward's **inputs).
_MANAGED = ("initial_state", "output_final_state", "cu_seqlens")


# ---- argument checks -----------------------------------------------------------------------------


def check_int(owner: str, name: str, value, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`, or TypeError/ValueError naming `owner` and `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value}")
    return value


def check_float(owner: str, name: str, value, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{owner}: {name} must be a finite float{' > 0' if positive else ''}, got {value!r}")
    return float(value)


def check_bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_input(owner: str, x, dim: int) -> torch.Tensor:
    """x (B, S, dim), a floating tensor; ValueError/TypeError naming `x` and the expected shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: x must be a torch.Tensor (B, S, {dim}), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{owner}: x must have shape (B, S, dim={dim}) with B, S >= 1, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{owner}: x must be a floating tensor, got {x.dtype}")
    return x


def head_layout(owner: str, dim, heads, kv_heads, head_dim) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim), validated: heads % kv_heads == 0, head_dim from dim // heads."""
    dim = check_int(owner, "dim", dim)
    heads = check_int(owner, "heads", heads)
    kv_heads = heads if kv_heads is None else check_int(owner, "kv_heads", kv_heads)
    if kv_heads > heads or heads % kv_heads:
        raise ValueError(f"{owner}: heads % kv_heads must be 0 with kv_heads <= heads (each KV head serves a "
                         f"group of query heads); got heads={heads}, kv_heads={kv_heads}")
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"{owner}: dim must be divisible by heads when head_dim is not given; got dim={dim}, "
                             f"heads={heads} (pass head_dim= to choose it)")
        head_dim = dim // heads
    head_dim = check_int(owner, "head_dim", head_dim)
    return heads, kv_heads, head_dim


def element_bytes(dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return torch.empty((), dtype=dtype).element_size()


# ---- rotary position embedding (rotate-half, as Llama / Hugging Face) ----------------------------------


def rope_cos_sin(positions: torch.Tensor, rot_dim: int, base: float, dtype: torch.dtype):
    """cos, sin (S, rot_dim) for integer positions (S,): frequencies base^(-2i/rot_dim), each repeated
    over both halves (Llama's `cat(freqs, freqs)`). Computed in float32 (float64 for float64)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=positions.device, dtype=torch.int64).to(work)
                               / rot_dim))
    freqs = positions.to(work)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., S, rot_dim) rotated by position: x cos + rotate_half(x) sin."""
    return x * cos + rotate_half(x) * sin


def positions(offset: int, length: int, device) -> torch.Tensor:
    return torch.arange(offset, offset + length, device=device)


# ---- caches ------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """The keys and values of every token seen so far, after RoPE: k (B, Hk, S, Dk), v (B, Hv, S, Dv)."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


@dataclass
class StateCache:
    """A recurrent variant's state (B, Hkv, ...) after `length` tokens (the next token's position)."""

    state: torch.Tensor
    length: int

    @property
    def nbytes(self) -> int:
        return self.state.numel() * self.state.element_size()


@dataclass
class LatentCache:
    """MLA's cache: the joint KV latent c_kv (B, S, kv_rank) and the shared RoPE key k_rope (B, S, rope_dim)."""

    c_kv: torch.Tensor
    k_rope: torch.Tensor

    @property
    def length(self) -> int:
        return self.c_kv.shape[1]

    @property
    def nbytes(self) -> int:
        return self.c_kv.numel() * self.c_kv.element_size() + self.k_rope.numel() * self.k_rope.element_size()


def check_cache(owner: str, cache, kind: type, batch: int, device) -> None:
    if not isinstance(cache, kind):
        raise TypeError(f"{owner}: cache must be a {kind.__name__} returned by this module's forward (or None), "
                        f"got {type(cache).__name__}")
    first = next(iter(vars(cache).values()))
    if first.shape[0] != batch:
        raise ValueError(f"{owner}: cache holds batch size {first.shape[0]}, x has B={batch}")
    if first.device != device:
        raise ValueError(f"{owner}: cache is on {first.device}, x is on {device}")


# ---- the attention core ----------------------------------------------------------------------------------


def resolve_variant(owner: str, variant, params: dict):
    """The configured variant `az.get(variant, **params)`; its ValueError/TypeError prefixed with `owner`."""
    from ..core.api import get

    if not isinstance(variant, str):
        raise TypeError(f"{owner}: variant must be a variant name (str), got {type(variant).__name__}")
    try:
        return get(variant, **params)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{owner}(variant={variant!r}): {e}") from None


def is_recurrent(attn) -> bool:
    from ..core.recurrent import RecurrentVariant

    return isinstance(attn, RecurrentVariant)


def require_softmax(owner: str, attn) -> None:
    if is_recurrent(attn):
        raise ValueError(f"{owner}: variant {attn.name!r} is recurrent (family {attn.family!r}); this structure "
                         "needs attention weights over keys (a masks, scores or sparse variant)")


def check_inputs(owner: str, inputs: dict) -> None:
    managed = sorted(set(inputs) & set(_MANAGED))
    if managed:
        raise TypeError(f"{owner}: {managed} are managed by the module through its cache; pass cache= instead")


class LowRankLogGate(nn.Module):
    """GLA's data-dependent forget gate: log a_t = logsigmoid(W2 W1 x_t + b) / normalizer, per key
    dimension of each KV head (fla's GatedLinearAttention: rank 16, normalizer 16)."""

    def __init__(self, dim: int, kv_heads: int, head_dim: int, rank: int = 16, normalizer: float = 16.0):
        super().__init__()
        self.kv_heads, self.head_dim, self.normalizer = kv_heads, head_dim, normalizer
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, kv_heads * head_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, dim) -> g (B, Hkv, S, D), <= 0."""
        b, s, _ = x.shape
        g = torch.nn.functional.logsigmoid(self.up(self.down(x))) / self.normalizer
        return g.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)


def _dynamic_mask(dim: int, kv_heads: int, head_dim: int) -> nn.Module:
    from .dma import DynamicMask

    return DynamicMask(kv_heads, head_dim)


# Learned per-token inputs: variant name -> (input name, module factory (dim, kv_heads, head_dim)). A recurrent
# variant's module reads the layer input x; a softmax variant's reads the values v, the cache included.
LEARNED_INPUTS = {
    "gla": ("g", lambda dim, kv_heads, head_dim: LowRankLogGate(dim, kv_heads, head_dim)),
    "dma": ("dt", _dynamic_mask),
}


class SizeMixin:
    """`num_parameters()`, and the cache size methods from `kv_elements_per_token()`."""

    def num_parameters(self) -> int:
        """Trainable parameters of the module."""
        return sum(p.numel() for p in self.parameters())

    def kv_elements_per_token(self) -> int:
        raise NotImplementedError

    def _default_dtype(self, dtype):
        if dtype is None:
            p = next(self.parameters(), None)
            return torch.float32 if p is None else p.dtype
        return dtype

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the decoding cache grows by per token (one sequence, this layer) at `dtype` (default:
        the parameters' dtype). 0 for recurrent variants, whose state is constant in S (`state_bytes`)."""
        return self.kv_elements_per_token() * element_bytes(self._default_dtype(dtype))

    def state_bytes(self, batch: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes of a constant-size recurrent state (0 for KV caches)."""
        return 0

    def cache_bytes(self, tokens: int, batch: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes of the decoding cache after `tokens` tokens for `batch` sequences."""
        return batch * tokens * self.kv_bytes_per_token(dtype) + self.state_bytes(batch, dtype)
