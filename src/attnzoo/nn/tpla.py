"""Tensor-Parallel Latent Attention (TPLA): MLA's latent and each head's latent-space query split
across tensor-parallel shards, attention run per shard, the outputs summed (the all-reduce);
simulated on one device."""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..core.info import Paper
from .common import LatentCache, check_cache, check_input, check_inputs, check_int, positions, rope_cos_sin
from .mla import MLA

TPLA_PAPER = Paper("TPLA: Tensor Parallel Latent Attention for Efficient Disaggregated Prefill & Decode Inference",
                   2025, "2508.15881")
TRANSFORMS = ("none", "hadamard")


def hadamard(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of 2)."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


class TPLA(MLA):
    """MLA decoded tensor-parallel as TPLA: the latent c_kv (kv_rank) is cut into `shards` equal
    slices, one per device, and so is every head's absorbed query q_lat,i = W_uk,i^T q_C,i (its
    input dimension); each device attends with every head over its slice only, the RoPE part
    (q_R . k_R) replicated on each, its own softmax,

        o_i^(p) = softmax(scale (q_lat,i^(p) . c^(p) + q_R,i . k_R)) c^(p),   y = sum_p W_ov^(p) o^(p)

    (the sum over p being the all-reduce), so each device caches kv_rank / shards + rope_dim numbers
    per token (`kv_elements_per_token_per_shard`). With shards=1 this is MLA's absorbed path; for
    shards > 1 it approximates MLA (each shard's softmax sees a part of the content score).
    `transform="hadamard"` rotates the latent by an orthonormal Hadamard matrix before slicing (the
    paper's remedy for cross-shard interference; kv_rank a power of 2): exact for MLA, spreading each
    latent direction over the shards. `forward(..., absorb=False)` or `merged=True` runs MLA itself
    (the prefill side: the same weights). Parameters are MLA's; `from_mla` takes a trained MLA's."""

    paper: ClassVar[Paper] = TPLA_PAPER

    def __init__(self, dim: int, heads: int, kv_rank: int, rope_dim: int, shards: int = 2,
                 transform: str = "none", **mla_args):
        super().__init__(dim, heads, kv_rank, rope_dim, **mla_args)
        owner = type(self).__name__
        self.shards = check_int(owner, "shards", shards)
        if kv_rank % shards:
            raise ValueError(f"{owner}: kv_rank must be divisible by shards (each device holds kv_rank / shards latent "
                             f"channels); got kv_rank={kv_rank}, shards={shards}")
        if transform not in TRANSFORMS:
            raise ValueError(f"{owner}: transform must be one of {list(TRANSFORMS)}, got {transform!r}")
        if transform == "hadamard" and kv_rank & (kv_rank - 1):
            raise ValueError(f"{owner}: transform='hadamard' needs kv_rank a power of 2, got {kv_rank}")
        self.transform = transform

    @classmethod
    def from_mla(cls, mla: MLA, shards: int, transform: str = "none") -> TPLA:
        """A TPLA module with `mla`'s weights (same dtype and device)."""
        if not isinstance(mla, MLA):
            raise TypeError(f"{cls.__name__}.from_mla: mla must be an attnzoo.nn.MLA, got {type(mla).__name__}")
        config = {k: v for k, v in mla.config.items() if k not in ("shards", "transform")}
        ref = next(mla.parameters())
        new = cls(shards=shards, transform=transform, **config).to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(mla.state_dict())
        return new

    @property
    def config(self) -> dict:
        return {**super().config, "shards": self.shards, "transform": self.transform}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shards={self.shards}, transform={self.transform!r}"

    def kv_elements_per_token_per_shard(self) -> int:
        """What one device caches per token: its latent slice and the (replicated) RoPE key."""
        return self.kv_rank // self.shards + self.rope_dim

    def forward(self, x: torch.Tensor, cache: LatentCache | None = None, causal: bool = True,
                absorb: bool | None = None, merged: bool = False, **inputs):
        if merged or absorb is False:
            return super().forward(x, cache, causal, absorb=absorb, **inputs)
        owner = type(self).__name__
        x = check_input(owner, x, self.dim)
        check_inputs(owner, inputs)
        b, s, _ = x.shape
        if cache is not None:
            check_cache(owner, cache, LatentCache, b, x.device)
        offset = 0 if cache is None else cache.length
        hd, rd, r = self.head_dim, self.rope_dim, self.kv_rank
        cos, sin = rope_cos_sin(positions(offset, s, x.device), self.rope_head_dim, self.rope_base, x.dtype)
        c_kv, k_rope = self.wkv_a(x).split([r, rd], dim=-1)
        c_kv, k_rope = self.kv_norm(c_kv), self._rope(k_rope, cos, sin)
        if cache is not None:
            c_kv, k_rope = torch.cat([cache.c_kv, c_kv], dim=1), torch.cat([cache.k_rope, k_rope], dim=1)
        cache = LatentCache(c_kv, k_rope)
        q_in = self._query_input(x)
        q_rope = self._rope(torch.einsum("bsi,hdi->bhsd", q_in, self._query_up()[:, hd:]), cos, sin)
        w_qk, w_ov = self.absorbed_weights()
        q_lat = torch.einsum("bsi,hri->bhsr", q_in, w_qk)
        latent = c_kv
        if self.transform == "hadamard":
            rot = hadamard(r, x.dtype, x.device)
            q_lat, latent, w_ov = q_lat @ rot.T, latent @ rot.T, w_ov @ rot.T
        y = 0
        for part in range(self.shards):
            sl = slice(part * r // self.shards, (part + 1) * r // self.shards)
            q = torch.cat([q_lat[..., sl], q_rope], dim=-1)
            k = torch.cat([latent[..., sl], k_rope], dim=-1).unsqueeze(1)
            o = self.attn(q, k, latent[..., sl].unsqueeze(1), causal=causal, scale=self.scale, **inputs)
            y = y + torch.einsum("bhsr,mhr->bsm", o, w_ov[..., sl])  # the all-reduce
        return y, cache
