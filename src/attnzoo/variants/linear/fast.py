"""FAST (Fastmax): attention whose exponential is replaced by its Taylor polynomial, factorised.

Definition (the paper's Fastmax, order p = 2; p = 1 keeps the constant and linear terms):

    s_ij = scale * q_i . k_j,    K(q_i, k_j) = 1 + s_ij + s_ij^2 / 2,
    o_i  = sum_j K(q_i, k_j) v_j / sum_j K(q_i, k_j)             (j <= i when causal)

K = phi(q) . phi(k) with phi(x) = [1, x', vec(x' ⊗ x') / sqrt 2], x' = x sqrt(scale) (1 + D + D^2
features; [1, x'] for p = 1), so the output is linear in S: the factorisation the paper takes from
the fast multipole method. `normalize=True` puts q and k on the unit sphere first (so |s| <= scale):
the paper normalises them to keep the Taylor polynomial near exp; its code divides by the largest norm
over the sequence, which would read future tokens in causal use, so here each token is divided by its
own norm. With p = 2, K >= 1/2 > 0; with p = 1 the normaliser can cross 0 (rows where it is exactly
0 give zeros).
"""
from __future__ import annotations

from ...core.info import Paper, Param, positive_int
from ...core.registry import register
from ._feature import FeatureMapVariant, repeat_kv
from .based.naive import taylor_features
from .cosine.naive import l2_normalise


@register
class Fast(FeatureMapVariant):
    name = "fast"
    affine_state = True
    summary = ("FAST / Fastmax: o_i = sum_j K(q_i,k_j) v_j / sum_j K(q_i,k_j) with K = 1 + s + s^2/2 (order 2) or "
               "1 + s (order 1), s = scale * q_i . k_j, the Taylor polynomial of exp, computed through the factorised "
               "features [1, x', x' ⊗ x' / sqrt 2] (x' = x sqrt(scale)). normalize=True puts q and k on the unit "
               "sphere first (per token; the paper's code divides by the sequence's largest norm) and `scale` then "
               "defaults to 1 (|s| <= 1). Causal and non-causal. State (B, Hkv, 1 + D + D^2, Dv + 1) (1 + D for "
               "order 1).")
    paper = Paper("FAST: Factorizable Attention for Speeding up Transformers", 2024, "2402.07901")
    params = (
        Param("order", 2, "order p of the Taylor polynomial of exp: 2 (1 + s + s^2/2, the paper's Fastmax) or 1",
              (int,), lambda v: v in (1, 2), "1 or 2"),
        Param("normalize", False, "divide q and k by their L2 norm per token before the kernel", (bool,), None,
              "a bool"),
        positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"),
    )
    cost = ("chunk: O(S C F + S F Dv) time with F = 1 + D + D^2 features (1 + D for order 1), O(C^2 + F Dv) memory "
            "per head; step: O(F Dv) per token")
    state_size = "Hkv x (1 + D + D^2) x (Dv + 1) per sequence (1 + D rows for order 1), constant in S"

    def feature_dim(self, d):
        return 1 + d + (d * d if self.config["order"] == 2 else 0)

    def default_scale(self, d):
        return 1.0 if self.config["normalize"] else d ** -0.5

    def features(self, x, role, ctx):
        # phi(q) . phi(k) must give s = scale * q . k: each side carries sqrt(scale).
        if self.config["normalize"]:
            x = l2_normalise(x) * ctx.scale ** 0.5      # the normalisation drops the scale q arrives with
        elif role == "q":
            x = x / ctx.scale ** 0.5                    # q arrives multiplied by scale
        else:
            x = x * ctx.scale ** 0.5
        feats = taylor_features(x, 1.0)
        return feats if self.config["order"] == 2 else feats[..., :1 + x.shape[-1]]

    def kernel(self, q, k, ctx):
        """The paper's polynomial of the score, written plainly."""
        if self.config["normalize"]:
            q, k = l2_normalise(q) * ctx.scale, l2_normalise(k)
        s = q @ repeat_kv(k, q.shape[1]).transpose(-1, -2)
        return 1 + s + (s ** 2 / 2 if self.config["order"] == 2 else 0)
