"""Hedgehog: linear attention with learned feature maps trained to mimic softmax attention.

Definition (the paper's Hedgehog attention, per head h):

    z = x W_h + b_h                                   (W_h: D x F, b_h: F; one map for queries, one for keys)
    phi(x) = softmax([z, -z])                         (over the 2F features: the paper's exp map, each token's
                                                       features normalised as in the reference implementations)
    o_i = sum_j phi_q(q_i) . phi_k(k_j) v_j / sum_j phi_q(q_i) . phi_k(k_j)       (j <= i when causal)

phi > 0, so every weight is positive and rows never have a zero normaliser. The maps are trained by
attention distillation (`attnzoo.nn.hedgehog.distill`: the cross-entropy between these weights and softmax's on
real activations); here they are parameters of the variant (`weight_q` (Hq, D, F), `bias_q` (Hq, F),
`weight_k` (Hkv, D, F), `bias_k` (Hkv, F)), None = the identity map, W = I, b = 0 (F = D), the
untrained start. `scale` (default 1) multiplies q before its map.
"""
from __future__ import annotations

import torch

from ...core.info import Paper, Param, positive_int
from ...core.registry import register
from ._feature import FeatureMapVariant


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, S, D), weight (H, D, F) or None (identity), bias (H, F) or None -> phi(x) (B, H, S, 2F)."""
    z = x if weight is None else torch.einsum("bhsd,hdf->bhsf", x, weight.to(x.dtype))
    if bias is not None:
        z = z + bias.to(x.dtype)[None, :, None]
    return torch.cat([z, -z], dim=-1).softmax(-1)


def _tensor(name: str, doc: str, rank: int) -> Param:
    return Param(name, None, doc, (type(None), torch.Tensor),
                 lambda v: v is None or (v.dtype.is_floating_point and v.dim() == rank and v.numel() > 0),
                 f"None or a non-empty floating tensor of rank {rank}")


@register
class Hedgehog(FeatureMapVariant):
    name = "hedgehog"
    affine_state = True
    summary = ("Hedgehog: normalised linear attention with learned feature maps phi(x) = softmax([xW + b, -(xW + b)]) "
               "(2F positive features per head; one map for queries, one for keys) trained by distillation to "
               "mimic softmax attention weights (az.nn.HedgehogFeatureMap, fitted by attnzoo.nn.hedgehog.distill). "
               "The maps' weights "
               "are parameters: weight_q (Hq, D, F), bias_q (Hq, F), weight_k (Hkv, D, F), bias_k (Hkv, F); None "
               "= the identity map (F = D, untrained). `scale` (default 1) multiplies q first. Causal and "
               "non-causal. State (B, Hkv, 2F, Dv + 1).")
    paper = Paper("The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry", 2024,
                  "2402.04347")
    params = (
        _tensor("weight_q", "the queries' feature-map weights W (Hq, D, F); None = identity (F = D)", 3),
        _tensor("bias_q", "the queries' feature-map bias b (Hq, F); None = 0", 2),
        _tensor("weight_k", "the keys' feature-map weights W (Hkv, D, F); None = identity (F = D)", 3),
        _tensor("bias_k", "the keys' feature-map bias b (Hkv, F); None = 0", 2),
        positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"),
    )
    cost = "chunk: O(S C F + S F Dv + S D F) time, O(C^2 + F Dv) memory per head; step: O(F Dv + D F) per token"
    state_size = "Hkv x 2F x (Dv + 1) per sequence, constant in S"

    def validate_config(self):
        c = self.config
        if (c["weight_q"] is None) != (c["weight_k"] is None):
            raise ValueError(f"{self.name}: parameters 'weight_q' and 'weight_k' are given together (None, None = "
                             "identity maps)")
        if c["weight_q"] is not None and c["weight_q"].shape[-1] != c["weight_k"].shape[-1]:
            raise ValueError(f"{self.name}: weight_q (Hq, D, F) and weight_k (Hkv, D, F) need one feature dimension F; "
                             f"got weight_q {tuple(c['weight_q'].shape)}, weight_k {tuple(c['weight_k'].shape)}")

    def check_maps(self, q_heads: int, kv_heads: int, d: int, device) -> None:
        """The maps' shapes against this call (ValueError naming the parameter and the shape expected)."""
        c = self.config
        f = d if c["weight_q"] is None else c["weight_q"].shape[-1]
        want = {"weight_q": (q_heads, d, f), "bias_q": (q_heads, f), "weight_k": (kv_heads, d, f),
                "bias_k": (kv_heads, f)}
        doc = {"weight_q": "(Hq, D, F)", "bias_q": "(Hq, F)", "weight_k": "(Hkv, D, F)", "bias_k": "(Hkv, F)"}
        for name, shape in want.items():
            t = c[name]
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise ValueError(f"{self.name}: parameter {name!r} must have shape {doc[name]} = {shape} for this "
                                 f"call (Hq={q_heads}, Hkv={kv_heads}, D={d}, F={f}), got {tuple(t.shape)}")
            if t.device != device:
                raise ValueError(f"{self.name}: parameter {name!r} is on {t.device}, q is on {device}")

    def validate_call(self, call):
        s = call.shapes
        self.check_maps(s.q_heads, s.kv_heads, s.d, call.device)

    def default_scale(self, d):
        return 1.0

    def feature_dim(self, d):
        w = self.config["weight_k"]
        return 2 * (d if w is None else w.shape[-1])

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        if isinstance(q_t, torch.Tensor) and isinstance(k_t, torch.Tensor) and q_t.dim() == k_t.dim() == 3:
            self.check_maps(q_t.shape[1], k_t.shape[1], k_t.shape[2], k_t.device)
        return super().step(q_t, k_t, v_t, state, scale=scale, **inputs)

    def features(self, x, role, ctx):
        c = self.config
        return hedgehog_features(x, c[f"weight_{role}"], c[f"bias_{role}"])
