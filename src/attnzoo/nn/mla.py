"""Multi-head latent attention (DeepSeek-V2): keys and values from one low-rank joint latent, a
decoupled RoPE key shared by the heads; the cache holds only the latent and the RoPE key."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..core.info import Paper
from .common import (LatentCache, SizeMixin, apply_rope, check_bool, check_cache, check_float, check_input,
                     check_inputs, check_int, head_layout, positions, require_softmax, resolve_variant, rope_cos_sin)

DEEPSEEK_V2 = Paper("DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model", 2024,
                    "2405.04434")


class MLA(SizeMixin, nn.Module):
    """Multi-head latent attention, DeepSeek-V2's equations (Sec. 2.1), in its released layout:

        c_kv = W_dkv x (kv_rank), [k_C,i ; v_i] = W_ukv,i c_kv          (per head i: head_dim, v_head_dim)
        k_R = RoPE(W_kr x) (rope_dim, one per token, shared by every head)
        c_q = W_dq x (q_rank; or q = W_q x with q_rank=None), [q_C,i ; q_R,i] = W_uq,i c_q, q_R,i = RoPE(q_R,i)
        o_i = softmax((q_C,i . k_C,i + q_R,i . k_R) / sqrt(head_dim + rope_dim)) v_i,  y = W_o [o_1 ... o_H]

    W_dkv and W_kr are one projection (`wkv_a`, dim -> kv_rank + rope_dim), W_uk and W_uv one
    (`wkv_b`, kv_rank -> H (head_dim + v_head_dim)). `latent_norm=True` puts an RMSNorm on c_q and
    c_kv, as the released models do (the paper's equations leave it out: `latent_norm=False`). RoPE is
    rotate-half (the release interleaves pairs; the same up to a fixed permutation of W_qr, W_kr). No
    biases. `rope_head_dim` (default rope_dim) rotates the RoPE channels in chunks of that size, each
    with the frequencies of a rope_head_dim head: the layout of a GQA checkpoint's keys converted to
    MLA (TransMLA), where `head_dim=0` (every key channel positional) is the lossless conversion.

    The cache (`LatentCache`) is c_kv and k_R per token: kv_rank + rope_dim numbers, against
    2 H head_dim for multi-head attention. `forward(x, cache=None, causal=True, absorb=None, **inputs)`
    runs the naive path (keys and values decompressed per head, `absorb=False`) or the absorbed one
    (`absorb=True`, the default when a cache is given): W_uk folded into the query projection, so
    every head's query scores the latent itself (one shared KV head of dim kv_rank + rope_dim: MQA over
    the cache), and W_uv folded into the output projection. The two are the same function; the
    absorbed one never materialises per-head keys. Softmax-family variants (masks, scores) serve as
    the core in both; one whose result reads the keys beyond their scores (content selection from
    key statistics) or the KV head count may differ between the two paths.
    """

    paper: ClassVar[Paper] = DEEPSEEK_V2

    def __init__(self, dim: int, heads: int, kv_rank: int, rope_dim: int, head_dim: int | None = None,
                 v_head_dim: int | None = None, q_rank: int | None = None, variant: str = "full",
                 rope_base: float = 10000.0, latent_norm: bool = True, eps: float = 1e-6,
                 rope_head_dim: int | None = None, **params):
        super().__init__()
        owner = type(self).__name__
        positional_only = head_dim is not None and check_int(owner, "head_dim", head_dim, minimum=0) == 0
        self.heads, _, self.head_dim = head_layout(owner, dim, heads, None, 1 if positional_only else head_dim)
        self.head_dim = 0 if positional_only else self.head_dim
        self.dim = dim
        self.kv_rank = check_int(owner, "kv_rank", kv_rank)
        self.rope_dim = check_int(owner, "rope_dim", rope_dim, minimum=2)
        if rope_dim % 2:
            raise ValueError(f"{owner}: RoPE rotates pairs of channels, rope_dim must be even; got rope_dim={rope_dim}")
        self.rope_head_dim = rope_dim if rope_head_dim is None else check_int(owner, "rope_head_dim", rope_head_dim, 2)
        if rope_dim % self.rope_head_dim or self.rope_head_dim % 2:
            raise ValueError(f"{owner}: rope_head_dim must be even and divide rope_dim={rope_dim}, got {rope_head_dim}")
        self.v_head_dim = self.head_dim if v_head_dim is None else check_int(owner, "v_head_dim", v_head_dim)
        if self.v_head_dim == 0:
            raise ValueError(f"{owner}: v_head_dim must be given (an int >= 1) when head_dim=0")
        self.q_rank = None if q_rank is None else check_int(owner, "q_rank", q_rank)
        self.rope_base = check_float(owner, "rope_base", rope_base)
        self.latent_norm = check_bool(owner, "latent_norm", latent_norm)
        self.eps = check_float(owner, "eps", eps)
        self.variant, self.params = variant, dict(params)
        self.attn = resolve_variant(owner, variant, params)
        require_softmax(owner, self.attn)
        h, dq = self.heads, self.head_dim + self.rope_dim
        if self.q_rank is None:
            self.wq = nn.Linear(dim, h * dq, bias=False)
        else:
            self.wq_a = nn.Linear(dim, self.q_rank, bias=False)
            self.q_norm = nn.RMSNorm(self.q_rank, eps=eps) if latent_norm else nn.Identity()
            self.wq_b = nn.Linear(self.q_rank, h * dq, bias=False)
        self.wkv_a = nn.Linear(dim, self.kv_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_rank, eps=eps) if latent_norm else nn.Identity()
        self.wkv_b = nn.Linear(self.kv_rank, h * (self.head_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(h * self.v_head_dim, dim, bias=False)

    @property
    def scale(self) -> float:
        return (self.head_dim + self.rope_dim) ** -0.5

    @property
    def config(self) -> dict:
        return dict(dim=self.dim, heads=self.heads, kv_rank=self.kv_rank, rope_dim=self.rope_dim,
                    head_dim=self.head_dim, v_head_dim=self.v_head_dim, q_rank=self.q_rank, variant=self.variant,
                    rope_base=self.rope_base, latent_norm=self.latent_norm, eps=self.eps,
                    rope_head_dim=self.rope_head_dim, **self.params)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_rank={self.kv_rank}, rope_dim={self.rope_dim}, "
                f"head_dim={self.head_dim}, v_head_dim={self.v_head_dim}, q_rank={self.q_rank}, "
                f"variant={self.variant!r}")

    def kv_elements_per_token(self) -> int:
        """The latent c_kv and the shared RoPE key."""
        return self.kv_rank + self.rope_dim

    # ---- pieces -------------------------------------------------------------------------------------
    def _rope(self, t, cos, sin):
        """RoPE on the last dim (rope_dim) of t, chunk by chunk of rope_head_dim channels."""
        chunks = self.rope_dim // self.rope_head_dim
        if chunks == 1:
            return apply_rope(t, cos, sin)
        shaped = t.unflatten(-1, (chunks, self.rope_head_dim))
        return apply_rope(shaped, cos.unsqueeze(-2), sin.unsqueeze(-2)).flatten(-2)

    def _query_input(self, x):
        """What the query projection W_uq reads: c_q (normed) or x itself when q_rank is None."""
        return x if self.q_rank is None else self.q_norm(self.wq_a(x))

    def _query_up(self) -> torch.Tensor:
        """W_uq (H, head_dim + rope_dim, q_in)."""
        w = self.wq.weight if self.q_rank is None else self.wq_b.weight
        return w.view(self.heads, self.head_dim + self.rope_dim, -1)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_qk (H, kv_rank, q_in), W_ov (dim, H, kv_rank)): W_uk,i^T W_uq,i (the content query of head
        i, mapped into the latent space) and W_o,i W_uv,i (head i's latent output, mapped to the model
        dimension). q_in is q_rank, or dim when q_rank is None. Recomputed from the parameters."""
        ukv = self.wkv_b.weight.view(self.heads, self.head_dim + self.v_head_dim, self.kv_rank)
        w_uk, w_uv = ukv[:, :self.head_dim], ukv[:, self.head_dim:]
        w_qc = self._query_up()[:, :self.head_dim]
        w_qk = torch.einsum("hdr,hdi->hri", w_uk, w_qc)
        w_ov = torch.einsum("mhv,hvr->mhr", self.wo.weight.view(self.dim, self.heads, self.v_head_dim), w_uv)
        return w_qk, w_ov

    def forward(self, x: torch.Tensor, cache: LatentCache | None = None, causal: bool = True,
                absorb: bool | None = None, **inputs):
        owner = type(self).__name__
        x = check_input(owner, x, self.dim)
        check_inputs(owner, inputs)
        if absorb is not None:
            check_bool(owner, "absorb", absorb)
        b, s, _ = x.shape
        if cache is not None:
            check_cache(owner, cache, LatentCache, b, x.device)
            if cache.c_kv.shape[2] != self.kv_rank or cache.k_rope.shape[2] != self.rope_dim:
                raise ValueError(f"{owner}: cache holds latents of rank {cache.c_kv.shape[2]} and RoPE keys of dim "
                                 f"{cache.k_rope.shape[2]}, this module makes {self.kv_rank} and {self.rope_dim}")
        absorb = cache is not None if absorb is None else absorb
        offset = 0 if cache is None else cache.length
        h, hd, rd = self.heads, self.head_dim, self.rope_dim
        cos, sin = rope_cos_sin(positions(offset, s, x.device), self.rope_head_dim, self.rope_base, x.dtype)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_rank, rd], dim=-1)
        c_kv, k_rope = self.kv_norm(c_kv), self._rope(k_rope, cos, sin)
        if cache is not None:
            c_kv, k_rope = torch.cat([cache.c_kv, c_kv], dim=1), torch.cat([cache.k_rope, k_rope], dim=1)
        cache = LatentCache(c_kv, k_rope)
        q_in = self._query_input(x)
        w_uq = self._query_up()
        q_rope = self._rope(torch.einsum("bsi,hdi->bhsd", q_in, w_uq[:, hd:]), cos, sin)
        sk = c_kv.shape[1]
        if absorb:
            w_qk, w_ov = self.absorbed_weights()
            q_lat = torch.einsum("bsi,hri->bhsr", q_in, w_qk)
            q = torch.cat([q_lat, q_rope], dim=-1)  # (B, H, S, kv_rank + rope_dim)
            k = torch.cat([c_kv, k_rope], dim=-1).unsqueeze(1)  # one KV head: the cache itself
            o = self.attn(q, k, c_kv.unsqueeze(1), causal=causal, scale=self.scale, **inputs)  # (B, H, S, kv_rank)
            y = torch.einsum("bhsr,mhr->bsm", o, w_ov)
        else:
            q = torch.cat([torch.einsum("bsi,hdi->bhsd", q_in, w_uq[:, :hd]), q_rope], dim=-1)
            kv = self.wkv_b(c_kv).view(b, sk, h, hd + self.v_head_dim).transpose(1, 2)
            k_c, v = kv.split([hd, self.v_head_dim], dim=-1)
            k = torch.cat([k_c, k_rope.unsqueeze(1).expand(b, h, sk, rd)], dim=-1)
            o = self.attn(q, k, v, causal=causal, scale=self.scale, **inputs)  # (B, H, S, v_head_dim)
            y = self.wo(o.transpose(1, 2).reshape(b, s, h * self.v_head_dim))
        return y, cache
