"""What the linear family's kernel variants share (hedgehog, lln, fast; flowformer's non-causal half).

`BothDirections`: a recurrent variant that also serves non-causal calls. A causal call runs the
recurrent contract (parallel / chunk / recurrent forms, states, packing). A non-causal call has no
order and so no state to carry: every query reads every key of its sequence (of its own document
when packed with `cu_seqlens`); mode "parallel" runs the definition (dense Sq x Sk), "chunk" the
linear form; "recurrent", `initial_state` and `output_final_state` are refused with a ValueError.

`FeatureMapVariant`: normalised linear attention with a positive kernel K(q, k) = phi_q(q) . phi_k(k),

    o_i = (phi_q(q_i) S_0 + sum_{j <= i} K(q_i, k_j) v_j) / (phi_q(q_i) z_0 + sum_{j <= i} K(q_i, k_j))

(no mask when non-causal), i.e. the RNN S_t = S_{t-1} + phi_k(k_t)^T v_t, z_t = z_{t-1} + phi_k(k_t).
Subclasses give the feature maps and, where the paper writes the kernel another way (a polynomial of
the score), the kernel as the paper writes it: the definition uses that, the chunk and recurrent
forms the features. `scale` multiplies q before its feature map. State (B, Hkv, F, Dv + 1): S, then
z as the last column. Rows whose normaliser is 0 give zeros.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ...core.info import ALL_PATTERNS
from ...core.recurrent import group_queries, ungroup
from ._base import LinearVariant
from ._decay import decay_chunk, decay_step, normalise, safe_divide, with_ones


def causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """(S, S) lower triangle, True = key j <= query i (forms get Sq == Sk, cross patterns already aligned)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()


def repeat_kv(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...): each KV head repeated for the query heads of its group."""
    return x.repeat_interleave(q_heads // x.shape[1], dim=1)


class BothDirections(LinearVariant):
    """A recurrent variant that serves the non-causal patterns too (see the module docstring)."""

    patterns = ALL_PATTERNS

    def noncausal(self, q, k, v, call, dense: bool) -> torch.Tensor:
        """q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> o (B, Hq, Sq, Dv) in the accumulation
        dtype; `dense`: the definition written plainly, else the linear form."""
        raise NotImplementedError

    def run_forms(self, q, k, v, call):
        if call.causal:
            return super().run_forms(q, k, v, call)
        opts = getattr(call, "options", None) or {"mode": self.default_mode}
        if opts["mode"] == "recurrent":
            raise ValueError(f"{self.name}: mode='recurrent' decodes causally token by token; a non-causal call "
                             "runs mode='parallel' (the definition) or mode='chunk'")
        if opts.get("initial_state") is not None or opts.get("output_final_state"):
            raise ValueError(f"{self.name}: initial_state and output_final_state carry a causal state; a non-causal "
                             "call reads its whole sequence and has no state to carry (use causal=True)")
        dense = opts["mode"] == "parallel"
        cu = opts.get("cu_seqlens")
        if cu is None:
            return self.noncausal(q, k, v, call, dense).to(q.dtype)
        outs = [self.noncausal(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], call, dense)
                for a, b in self._segments(cu, call.shapes)]
        return torch.cat(outs, dim=2).to(q.dtype)


class FeatureMapVariant(BothDirections):
    """Normalised linear attention with feature maps phi_q, phi_k (see the module docstring)."""

    @property
    def state_doc(self) -> str:
        return "(B, Hkv, F, Dv + 1) (S, then z as the last column; F features)"

    # ---- what subclasses give ----------------------------------------------------------------------
    def feature_dim(self, d: int) -> int:
        raise NotImplementedError

    def context(self, q, k, call) -> SimpleNamespace:
        """What the feature maps need for this call (its scale; per-call coefficients). q are the real
        queries (a causal cross call's padding removed)."""
        return SimpleNamespace(scale=call.scale)

    def step_context(self, d: int, scale) -> SimpleNamespace:
        return SimpleNamespace(scale=self.step_scale(scale, d, self.default_scale(d)))

    def default_scale(self, d: int) -> float:
        return d ** -0.5

    def features(self, x: torch.Tensor, role: str, ctx) -> torch.Tensor:
        """x (B, H, S, D) queries (role 'q', already multiplied by the scale) or keys ('k') -> (B, H, S, F)."""
        raise NotImplementedError

    def kernel(self, q: torch.Tensor, k: torch.Tensor, ctx) -> torch.Tensor:
        """K(q_i, k_j) (B, Hq, Sq, Sk) for q (B, Hq, Sq, D) (scaled) and k (B, Hkv, Sk, D): by default the
        feature maps' inner products, as the paper defines it."""
        return self.features(q, "q", ctx) @ repeat_kv(self.features(k, "k", ctx), q.shape[1]).transpose(-1, -2)

    # ---- the contract ----------------------------------------------------------------------------------
    def prepare(self, q, k, v, causal, scale, inputs):
        d = q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() == 4 else 1
        return super().prepare(q, k, v, causal, self.default_scale(d) if scale is None else scale, inputs)

    def state_shape(self, batch, heads, dk, dv):
        return (batch, heads, self.feature_dim(dk), dv + 1)

    def _context(self, q, k, call):
        pad = call.shapes.sk - call.shapes.sq if call.causal else 0   # a causal cross call's zero queries
        return self.context(q[:, :, pad:], k, call)

    def parallel(self, q, k, v, call, state, inputs):
        acc = state.dtype
        ctx = self._context(q, k, call)
        q, k, v = q.to(acc) * ctx.scale, k.to(acc), v.to(acc)
        hq, dv = q.shape[1], v.shape[-1]
        kern = self.kernel(q, k, ctx) * causal_mask(q.shape[2], k.shape[2], q.device)
        fq, fk = self.features(q, "q", ctx), self.features(k, "k", ctx)   # the initial and final states only
        s0, z0 = repeat_kv(state[..., :dv], hq), repeat_kv(state[..., dv:], hq)
        num = kern @ repeat_kv(v, hq) + fq @ s0
        den = kern.sum(-1, keepdim=True) + fq @ z0
        final = state + fk.transpose(-1, -2) @ with_ones(v)
        return safe_divide(num, den), final

    def chunk(self, q, k, v, call, state, inputs):
        acc = state.dtype
        ctx = self._context(q, k, call)
        fq, fk = self.features(q.to(acc) * ctx.scale, "q", ctx), self.features(k.to(acc), "k", ctx)
        o, state = decay_chunk(fq, fk, with_ones(v.to(acc)), None, 1.0, state, self.config["chunk_size"])
        return normalise(o), state

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        d = self.check_step(q_t, k_t, v_t, state, inputs)[2]
        return self._token(q_t, k_t, v_t, state, self.step_context(d, scale))

    def _recurrent(self, q, k, v, call, state, inputs):
        # token by token like `step`, with this call's context (per-call coefficients included)
        ctx, outs = self._context(q, k, call), []
        for t in range(k.shape[2]):
            o_t, state = self._token(q[:, :, t], k[:, :, t], v[:, :, t], state, ctx)
            outs.append(o_t)
        return torch.stack(outs, dim=2), state

    def _token(self, q_t, k_t, v_t, state, ctx):
        acc = state.dtype
        fq = self.features(q_t.to(acc).unsqueeze(2) * ctx.scale, "q", ctx).squeeze(2)
        fk = self.features(k_t.to(acc).unsqueeze(2), "k", ctx).squeeze(2)
        o, state = decay_step(fq, fk, with_ones(v_t.to(acc)), None, state, 1.0)
        return normalise(o), state

    def noncausal(self, q, k, v, call, dense):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        ctx = self.context(q, k, call)
        q, k, v = q.to(acc) * ctx.scale, k.to(acc), v.to(acc)
        if dense:
            kern = self.kernel(q, k, ctx)
            return safe_divide(kern @ repeat_kv(v, q.shape[1]), kern.sum(-1, keepdim=True))
        fq, fk = self.features(q, "q", ctx), self.features(k, "k", ctx)
        kv = fk.transpose(-1, -2) @ with_ones(v)                            # (B, Hkv, F, Dv + 1)
        return normalise(ungroup(group_queries(fq, k.shape[1]) @ kv.unsqueeze(2)))
