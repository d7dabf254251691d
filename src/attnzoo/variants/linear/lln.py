"""Linear Log-Normal attention (LLN): exponential feature maps whose temperatures are moment-matched to softmax.

Definition (the paper's LLN attention):

    K(q_i, k_j) = exp(alpha q_i) . exp(beta k_j)        (exp elementwise, summed over the D features),
    o_i = sum_j K(q_i, k_j) v_j / sum_j K(q_i, k_j)       (j <= i when causal)

Both feature maps are positive, so K > 0. The paper chooses alpha and beta so that the attention
matrix is log-normal with the variance softmax attention's has (moment matching): with sigma_q,
sigma_k the standard deviations of q and k,

    sigma~^2 = (sigma_q^2 sigma_k^2 - b) / (2 a),   alpha = sigma~ / sigma_q,   beta = sigma~ / sigma_k,

a = 0.14855178144710912, b = -0.35487039130661086 (the fit in the authors' code, which computes the
standard deviations over the whole q and k tensors of the call, without gradient). `alpha` / `beta`
None does that per call (per packed document); a state carried between calls or `step` needs them
fixed (`lln_moments` gives them from calibration activations). The paper's LLN+Diag also averages the
output with block-diagonal softmax attention; that second half is not part of this variant.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from ...core.info import Paper, Param, positive_int
from ...core.registry import register
from ._feature import FeatureMapVariant

# The authors' fit of the log-normal variance of softmax attention (their code's constants a, b).
FIT_A, FIT_B = 0.14855178144710912, -0.35487039130661086


def lln_moments(q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    """(alpha, beta) moment-matched to softmax attention from q and k's standard deviations (all elements)."""
    with torch.no_grad():
        var_q, var_k = q.double().var().item(), k.double().var().item()
    if not (var_q > 0 and var_k > 0):
        raise ValueError(f"lln: moment matching needs q and k with a positive variance, got var(q)={var_q}, "
                         f"var(k)={var_k} (pass alpha= and beta= instead)")
    sigma = math.sqrt((var_q * var_k - FIT_B) / (2 * FIT_A))
    return sigma / math.sqrt(var_q), sigma / math.sqrt(var_k)


def _temperature(name: str) -> Param:
    return Param(name, None,
                 f"{name} of the feature map exp({name} x); None: moment-matched per call (see lln_moments)",
                 (type(None), int, float), lambda v: v is None or (math.isfinite(v) and v > 0),
                 "None or a finite float > 0")


@register
class LLN(FeatureMapVariant):
    name = "lln"
    affine_state = True
    summary = ("Linear Log-Normal attention: o_i = sum_j K(q_i,k_j) v_j / sum_j K(q_i,k_j) with K = exp(alpha q_i) . "
               "exp(beta k_j); alpha and beta moment-matched to softmax attention from the standard deviations of q "
               "and k (the authors' fit; per call when None, fixed when given: states carried between calls and "
               "step need them fixed). `scale` (default 1) multiplies q first. Causal and non-causal. "
               "State (B, Hkv, D, Dv + 1). The block-diagonal softmax half of LLN+Diag is not included.")
    paper = Paper("Linear Log-Normal Attention with Unbiased Concentration", 2023, "2311.13541")
    params = (_temperature("alpha"), _temperature("beta"),
              positive_int("chunk_size", 64, "tokens per chunk of the chunk form (C x C tiles inside a chunk)"))
    cost = "chunk: O(S C D + S D Dv) time, O(C^2 + D Dv) memory per head; step: O(D Dv) per token"
    state_size = "Hkv x D x (Dv + 1) per sequence, constant in S"

    def validate_config(self):
        if (self.config["alpha"] is None) != (self.config["beta"] is None):
            raise ValueError(f"{self.name}: parameters 'alpha' and 'beta' are given together (both moment-matched "
                             f"when None); got alpha={self.config['alpha']}, beta={self.config['beta']}")

    @property
    def fixed(self) -> bool:
        return self.config["alpha"] is not None

    def run_forms(self, q, k, v, call):
        opts = getattr(call, "options", None) or {}
        if not self.fixed and opts.get("initial_state") is not None:
            raise ValueError(f"{self.name}: an initial_state was built with some alpha and beta; pass them "
                             "(az.get('lln', alpha=..., beta=...)) to continue from it")
        return super().run_forms(q, k, v, call)

    def default_scale(self, d):
        return 1.0

    def feature_dim(self, d):
        return d

    def context(self, q, k, call):
        alpha, beta = (self.config["alpha"], self.config["beta"]) if self.fixed else lln_moments(q * call.scale, k)
        return SimpleNamespace(scale=call.scale, alpha=alpha, beta=beta)

    def step_context(self, d, scale):
        if not self.fixed:
            raise ValueError(f"{self.name}: step needs fixed alpha and beta (az.get('lln', alpha=..., beta=...)); "
                             "per-call moment matching reads the whole sequence")
        return SimpleNamespace(scale=self.step_scale(scale, d, 1.0), alpha=self.config["alpha"],
                               beta=self.config["beta"])

    def features(self, x, role, ctx):
        return torch.exp((ctx.alpha if role == "q" else ctx.beta) * x)
