"""TransMLA: a grouped-query attention layer rewritten as multi-head latent attention (MLA), keys and
values from one low-rank latent, RoPE on a decoupled key shared by the heads.

Three steps, each an orthogonal change of basis until the last truncation:

1. GQA is MLA with an identity latent: every query head reads the keys of all KV heads, its query
   placed in its own group's slot and zero elsewhere (scores unchanged).
2. RoRoPE: RoPE turns channel pair (f, f + D/2) of every KV head by the same angle, so any
   orthogonal mix of the KV heads applied to frequency f alone (to both channels of the pair)
   commutes with it. Per frequency, the principal directions of the keys over the KV heads (on
   calibration text) put most of the key energy into the first `rope_heads` slots; those keep their
   RoPE and form the decoupled RoPE key. The other slots drop their RoPE (the approximation of the
   method; none when rope_heads == kv_heads).
3. BKV-PCA: the position-free key channels and the values, the keys scaled to the values' norm
   so neither dominates, are projected on their top `kv_rank` principal directions (on calibration
   text): the latent c_kv. At full rank this is a rotation (exact).

The result is an `MLA` module (no latent norm, `rope_head_dim` = the GQA head dim, the
1/sqrt(head_dim) scaling folded into the query weights), so its absorbed path and `LatentCache`
come with it: kv_rank + rope_heads * head_dim numbers cached per token.
"""
from __future__ import annotations

import math

import torch

from ..core.info import Paper
from .common import check_int
from .gqa import GroupedQueryAttention, MultiQueryAttention
from .mha import MultiheadAttention
from .mla import MLA

TRANSMLA_PAPER = Paper("TransMLA: Multi-head Latent Attention Is All You Need", 2025, "2502.07864")
OWNER = "transmla"


def rorope_rotation(keys: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """The orthogonal (kv_heads * head_dim)^2 change of basis of RoRoPE: for each frequency f, the
    principal directions over KV heads of the key pairs (f, f + head_dim/2) (strongest first),
    acting on channels f and f + head_dim/2 of every head. keys: (N, kv_heads * head_dim) before RoPE."""
    half = head_dim // 2
    k = keys.reshape(-1, kv_heads, 2, half)  # (N, heads, real/imag, frequency)
    cov = torch.einsum("ngcf,nhcf->fgh", k, k)  # (half, G, G): real and imaginary parts pooled
    _, vecs = torch.linalg.eigh(cov)
    u = vecs.flip(-1).transpose(1, 2)  # (half, G, G): row j = direction j, strongest first
    rot = torch.zeros(kv_heads, 2, half, kv_heads, 2, half, dtype=keys.dtype, device=keys.device)
    for c in range(2):
        rot[:, c, torch.arange(half), :, c, torch.arange(half)] = u
    return rot.reshape(kv_heads * head_dim, kv_heads * head_dim)


def _principal(acts: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` principal directions (uncentred) of the rows of acts: (channels, rank)."""
    _, vecs = torch.linalg.eigh(acts.T @ acts)
    return vecs.flip(-1)[:, :rank]


@torch.no_grad()
def transmla(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, wo: torch.Tensor, heads: int, kv_heads: int,
             calibration: torch.Tensor, kv_rank: int | None = None, rope_heads: int = 1,
             rope_base: float = 10000.0, balance: bool = True, variant: str = "full", **params) -> MLA:
    """The MLA form of a GQA layer given by its projection weights (nn.Linear layout, no biases):
    wq (heads * D, dim), wk and wv (kv_heads * D, dim), wo (dim, heads * D), RoPE rotate-half on
    head dim D with `rope_base`, scores scaled by 1/sqrt(D). `calibration` (N, dim): inputs of the
    layer on real text, for the PCAs. `rope_heads` (1 .. kv_heads): RoRoPE slots that keep RoPE
    (rope_dim = rope_heads * D). `kv_rank`: latent rank, at most (kv_heads - rope_heads) * D
    (position-free key channels) + kv_heads * D (values); default that maximum. `balance=False`
    skips the key/value norm balancing. The weights are computed in float64, the module returned in
    wq's dtype and device. rope_heads == kv_heads with the maximum rank is the same function."""
    for name, w in (("wq", wq), ("wk", wk), ("wv", wv), ("wo", wo), ("calibration", calibration)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.dtype.is_floating_point:
            raise TypeError(f"{OWNER}: {name} must be a 2-D floating tensor, got "
                            f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    heads, kv_heads = check_int(OWNER, "heads", heads), check_int(OWNER, "kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"{OWNER}: heads % kv_heads must be 0, got heads={heads}, kv_heads={kv_heads}")
    dim = wq.shape[1]
    d = wk.shape[0] // kv_heads
    if (wq.shape != (heads * d, dim) or wk.shape != (kv_heads * d, dim) or wv.shape != wk.shape
            or wo.shape != (dim, heads * d) or d % 2 or d * kv_heads != wk.shape[0]):
        raise ValueError(f"{OWNER}: expected wq (heads*D, dim), wk/wv (kv_heads*D, dim), wo (dim, heads*D), D even; "
                         f"got wq {tuple(wq.shape)}, wk {tuple(wk.shape)}, wv {tuple(wv.shape)}, wo {tuple(wo.shape)} "
                         f"for heads={heads}, kv_heads={kv_heads}")
    if calibration.shape[1] != dim or calibration.shape[0] == 0:
        raise ValueError(f"{OWNER}: calibration must be (N >= 1, dim={dim}), got {tuple(calibration.shape)}")
    rope_heads = check_int(OWNER, "rope_heads", rope_heads)
    if rope_heads > kv_heads:
        raise ValueError(f"{OWNER}: rope_heads must be <= kv_heads={kv_heads}, got {rope_heads}")
    nope = (kv_heads - rope_heads) * d
    full = nope + kv_heads * d
    kv_rank = full if kv_rank is None else check_int(OWNER, "kv_rank", kv_rank)
    if kv_rank > full:
        raise ValueError(f"{OWNER}: kv_rank must be <= {full} (the {nope} position-free key channels and "
                         f"{kv_heads * d} value channels it compresses; model dim {dim}), got {kv_rank}")
    wq_in_dtype = wq.dtype
    f64 = dict(dtype=torch.float64, device=wq.device)
    wq, wk, wv, wo, x = (t.to(**f64) for t in (wq, wk, wv, wo, calibration))
    rd = rope_heads * d
    group = heads // kv_heads

    rot = rorope_rotation(x @ wk.T, kv_heads, d)
    wk_rot = rot @ wk  # rows: slot-major, the strongest slots first
    # query head h in slot h // group of the all-KV-heads key, zeros elsewhere, then rotated alike;
    # sqrt(kv_heads) undoes MLA's 1/sqrt(kv_heads * D) scaling into the model's 1/sqrt(D)
    wq_heads = wq.view(heads, d, dim)
    placed = torch.zeros(heads, kv_heads * d, dim, **f64)
    for h in range(heads):
        placed[h, (h // group) * d:(h // group + 1) * d] = wq_heads[h]
    wq_rot = torch.einsum("ij,hjm->him", rot, placed) * math.sqrt(kv_heads)

    k_nope = wk_rot[rd:]
    alpha = 1.0
    if nope and balance:
        alpha = ((x @ k_nope.T).norm(dim=1).mean() / (x @ wv.T).norm(dim=1).mean().clamp_min(1e-30)).item()
    joint = torch.cat([k_nope / alpha, wv])  # (full, dim)
    basis = _principal(x @ joint.T, kv_rank)  # (full, kv_rank)
    w_dkv = basis.T @ joint
    w_uk = alpha * basis[:nope]  # (nope, kv_rank): one map for every head
    w_uv = basis[nope:].view(kv_heads, d, kv_rank)

    m = MLA(dim, heads, kv_rank, rd, head_dim=nope, v_head_dim=d, rope_base=rope_base, latent_norm=False,
            rope_head_dim=d, variant=variant, **params).to(**f64)
    m.wq.weight.copy_(torch.cat([wq_rot[:, rd:], wq_rot[:, :rd]], dim=1).reshape(heads * (nope + rd), dim))
    m.wkv_a.weight.copy_(torch.cat([w_dkv, wk_rot[:rd]]))
    ukv = torch.cat([w_uk.expand(heads, nope, kv_rank), w_uv.repeat_interleave(group, dim=0)], dim=1)
    m.wkv_b.weight.copy_(ukv.reshape(heads * (nope + d), kv_rank))
    m.wo.weight.copy_(wo)
    return m.to(dtype=wq_in_dtype)


def mla_from_gqa(module: MultiheadAttention, calibration: torch.Tensor, kv_rank: int | None = None,
                 rope_heads: int = 1, balance: bool = True) -> MLA:
    """`transmla` of an attnzoo multi-head, grouped- or multi-query attention module (RoPE, no
    biases, a softmax-family variant); calibration (N, dim) or (B, S, dim) of its inputs. Returned in
    the module's dtype and device, with its variant."""
    if type(module) not in (MultiheadAttention, GroupedQueryAttention, MultiQueryAttention):
        raise TypeError(f"{OWNER}: module must be an attnzoo.nn MultiheadAttention, GroupedQueryAttention or "
                        f"MultiQueryAttention, got {type(module).__name__}")
    if module.bias or not module.rope or module.recurrent:
        raise ValueError(f"{OWNER}: module must use RoPE, no biases and a softmax-family variant "
                         f"(bias={module.bias}, rope={module.rope}, variant={module.variant!r})")
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 3:
        calibration = calibration.flatten(0, 1)
    ref = module.q_proj.weight
    m = transmla(ref, module.k_proj.weight, module.v_proj.weight, module.o_proj.weight, module.heads,
                 module.kv_heads, calibration, kv_rank, rope_heads, module.rope_base, balance, module.variant,
                 **module.params)
    return m.to(dtype=ref.dtype, device=ref.device)
