"""The score family: exact attention whose scores are modified (a bias, a cap, a temperature, a
contextual position) or whose weights are normalised otherwise than by softmax.

Each variant is one small class. Its modifier is a tiny pure function of the scaled scores
s = scale * q.k and of absolute positions (FlexAttention's convention), so one definition serves
the blockwise `torch` engine, compiled `flex` and the dense reference. Where the weights are not
a softmax of modified scores (Cog's signed weights, Softplus's l1 normalisation, CoPE's counts),
`_reference` writes the paper's formula out plainly and the fast path is proven against it.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ..core.info import CAUSAL_PATTERNS, Input, Paper, Param, positive_float
from ..core.reference import masked_softmax_attention, repeat_kv
from ..core.registry import register
from ..core.variant import Call, SoftmaxVariant


def _dense_grids(variant: SoftmaxVariant, call: Call, device):
    """Batch, head and absolute query / key positions as broadcastable (B, H, Sq, Sk) index grids."""
    s = call.shapes
    b, h = variant._index_grids(call)
    q_pos = (s.query_positions(device=device)).view(1, 1, -1, 1)
    kv_pos = torch.arange(s.sk, device=device).view(1, 1, 1, -1)
    return b, h, q_pos, kv_pos


def _dense_scores(q, k, call: Call) -> torch.Tensor:
    """scale * q k^T for every query and key, (B, H, Sq, Sk), in float32 at least."""
    dt = torch.promote_types(q.dtype, torch.float32)
    return torch.matmul(q.to(dt), repeat_kv(k, q.shape[1]).to(dt).transpose(-1, -2)) * call.scale


def _flag(name: str, default: bool, doc: str) -> Param:
    return Param(name, default, doc, (bool,), lambda v: isinstance(v, bool), "True or False")


def _visible_keys(call: Call, q_pos):
    """How many keys a query sees: its 1-based position under causality, all Sk otherwise."""
    return q_pos + 1 if call.causal else torch.full_like(q_pos, call.shapes.sk)


# ---- ALiBi --------------------------------------------------------------------------------------


def alibi_slope(h, heads: int, dtype=torch.float64):
    """ALiBi's slope of query head `h` (an integer tensor) among `heads`.

    For a power of two n the slopes are 2^(-8 (h+1) / n). Otherwise the paper takes the slopes of
    the power of two n0 below n, then every other slope of the schedule for 2 n0 (its reference
    code's `get_slopes`): head n0 + j gets 2^(-8 (2j + 1) / (2 n0)).
    """
    n0 = 1 << (heads.bit_length() - 1)
    exponent = torch.where(h < n0, h + 1.0, h - n0 + 0.5)
    return torch.exp2(exponent.to(dtype) * (-8.0 / n0))


@register
class ALiBi(SoftmaxVariant):
    name = "alibi"
    family = "scores"
    summary = "ALiBi: a per-head linear penalty on the query-key distance, -slope * |q - k|, added to the scores."
    paper = Paper("Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation", 2021,
                  "2108.12409")
    has_score = True
    params = (
        _flag("symmetric", True, "non-causal calls: penalise |q - k| (keys on both sides); False keeps the "
                                 "paper's -slope * (q - k), which rewards keys after the query"),
        Param("heads", None, "number of query heads the slope schedule is laid over: needed only by the standalone "
                             "score_mod (FlexAttention's score_mod=), which sees head indices but not their count; "
                             "calls check it equals Hq. None: taken from each call",
              (int, type(None)), lambda v: v is None or v >= 1, "None or a positive int"),
    )
    inputs = (Input("slopes", "(H,)", "one slope per query head; default: the paper's geometric schedule "
                                      "2^(-8i/H), also for H not a power of two", required=False),)
    cost = "O(Sq Sk D) time as full attention, one multiply-add per score; O(S) memory on the torch path"

    def validate_call(self, call: Call) -> None:
        heads = self.config["heads"]
        if heads is not None and heads != call.shapes.q_heads:
            raise ValueError(f"alibi: parameter 'heads'={heads} must equal the call's query heads Hq="
                             f"{call.shapes.q_heads} (the slopes are laid over the heads)")

    def score_depends_on(self) -> frozenset:
        return frozenset() if self.config["heads"] is not None else frozenset({"heads"})

    def default_heads(self):
        return self.config["heads"]

    def score(self, call, s, b, h, q_pos, kv_pos):
        given = call.inputs.get("slopes")
        heads = self.config["heads"] or call.shapes.q_heads
        slope = alibi_slope(h, heads, s.dtype) if given is None else given[h].to(s.dtype)
        distance = q_pos - kv_pos
        return s - slope * (distance.abs() if self.config["symmetric"] else distance)


# ---- logit soft-capping -------------------------------------------------------------------------


@register
class SoftCap(SoftmaxVariant):
    name = "softcap"
    family = "scores"
    summary = "Logit soft-capping (Gemma 2, Grok): scores pass through cap * tanh(s / cap) before the softmax."
    paper = Paper("Gemma 2: Improving Open Language Models at a Practical Size", 2024, "2408.00118")
    has_score = True
    params = (positive_float("cap", 50.0, "the bound on |score| (Gemma 2 uses 50 in attention, Grok-1 30)"),)
    cost = "O(Sq Sk D) time as full attention, one tanh per score; O(S) memory on the torch path"

    def score(self, call, s, b, h, q_pos, kv_pos):
        cap = self.config["cap"]
        return cap * torch.tanh(s / cap)


# ---- Selective Self-Attention (SSA) -------------------------------------------------------------


@register
class Selective(SoftmaxVariant):
    """SSA: o_i = sum_j softmax_j(tau_i s_ij) (t_j v_j).

    tau_i, the query's inverse temperature, is the given `q_temperature` (1 if absent) plus the
    position-aware part pos_scale * log(n_i), n_i the number of keys query i sees: its 1-based
    position under causality, Sk otherwise (the released code multiplies the causal scores by
    1 + c log n_i, c in (0, 1) learned). t_j, the value temperature, is the given `v_temperature`
    (1 if absent). The paper's token-aware temperatures are learned functions of the token; attnzoo
    has no module for them (attnzoo.nn holds none yet): compute them in your model and pass them
    as `q_temperature` / `v_temperature`.
    """

    name = "selective"
    family = "scores"
    summary = ("Selective Self-Attention (SSA): per-query inverse temperature (token- and position-aware) "
               "on the scores, and a per-token temperature on the values. By default the position-aware part "
               "1 + 0.5 log n_i sharpens a query's scores as it sees more keys; the token-aware parts are given "
               "as inputs (learned by your model; attnzoo ships no module for them).")
    paper = Paper("Selective Attention: Enhancing Transformer through Principled Context Control", 2024,
                  "2411.12892")
    has_score = True
    params = (
        Param("pos_scale", 0.5, "c of the position-aware inverse temperature c * log(n_i), n_i the keys query i "
                                "sees, added to the query temperature (the paper's learned c lies in (0, 1); "
                                "0 turns it off, which with no temperature inputs is plain softmax attention)",
              (int, float), lambda v: v is not None and math.isfinite(v) and v >= 0, "a finite float >= 0"),
    )
    inputs = (
        Input("q_temperature", "(B, H, Sq)", "per-query inverse temperature multiplying its scores (default 1): "
                                             "the paper's token-aware tau(x_i), computed by your model", required=False),
        Input("v_temperature", "(B, Hkv, Sk)", "per-token temperature multiplying its value vector (default 1), "
                                               "computed by your model", required=False),
    )
    cost = "O(Sq Sk D) time as full attention, one multiply per score; O(S) memory on the torch path"

    def score_depends_on(self) -> frozenset:
        return frozenset({"lengths"}) if self.config["pos_scale"] else frozenset()

    def q_inverse_temperature(self, call, b, h, q_pos, dtype):
        given = call.inputs.get("q_temperature")
        tau = 1.0 if given is None else given[b, h, q_pos - call.shapes.offset].to(dtype)
        c = self.config["pos_scale"]
        return tau + c * torch.log(_visible_keys(call, q_pos).to(dtype)) if c else tau

    def score(self, call, s, b, h, q_pos, kv_pos):
        return s * self.q_inverse_temperature(call, b, h, q_pos, s.dtype)

    def scaled_values(self, v, call: Call):
        t = call.inputs.get("v_temperature")
        if t is None:
            return v
        dt = torch.promote_types(v.dtype, torch.float32)  # keep t_j v_j exact; the engine accumulates in dt
        return v.to(dt) * t.to(dt).unsqueeze(-1)

    def forward_torch(self, q, k, v, call: Call):
        from ..backends.torch_blockwise import softmax_blockwise

        return softmax_blockwise(self, q, k, self.scaled_values(v, call), call)

    def _reference(self, q, k, v, call: Call):
        return super()._reference(q, k, self.scaled_values(v, call), call)

    @classmethod
    def _class_backends(cls) -> tuple[str, ...]:
        return ("torch",)  # the value temperature is outside what FlexAttention's score_mod can do


# ---- Contextual Position Encoding (CoPE) --------------------------------------------------------


def _reverse_cumsum(x):
    """sum over t >= j of x[..., t], for every j."""
    return x.flip(-1).cumsum(-1).flip(-1)


def _position_logits(q, pos_emb):
    """z[..., p] = q . e[p] for every query and integer position p: (..., rows, npos).

    q is (B, H, rows, D) or, in the torch engine, (B, Hkv, G, rows, D); per-head embeddings
    (H, npos, D) are laid out the same way.
    """
    if pos_emb.dim() == 3:
        pos_emb = pos_emb.reshape(*q.shape[1:-2], *pos_emb.shape[-2:])
    return torch.matmul(q, pos_emb.transpose(-1, -2))


def _interpolate(z, p):
    """z at fractional positions p: z[ceil p] w + z[floor p] (1 - w), w = p - floor(p).

    floor and ceil are constant pieces, so the gradient reaches the gates through w only.
    """
    floor = p.detach().floor()
    w = p - floor
    return z.gather(-1, p.detach().ceil().long()) * w + z.gather(-1, floor.long()) * (1 - w)


@register
class CoPE(SoftmaxVariant):
    """CoPE: a_ij = softmax_j(scale * (q_i.k_j + z_i[p_ij])).

    Gates g_ij = sigmoid(scale * q_i.k_j) say which keys count; the position of key j seen from
    query i is p_ij = sum_{t=j..i} g_it, clamped to npos - 1; z_i[p] = q_i.e[p] interpolated
    between integer positions. As in the paper's reference code (its default), the gates use the same
    scaled logits, and the scale multiplies the position logits too.
    """

    name = "cope"
    family = "scores"
    summary = ("Contextual Position Encoding: a key's position counts the sigmoid gates from it up to the "
               "query; an interpolated position embedding e_p adds q.e_p to its score.")
    paper = Paper("Contextual Position Encoding: Learning to Count What's Important", 2024, "2405.18719")
    patterns = CAUSAL_PATTERNS  # positions count keys between key and query: defined for causal attention
    carries = True
    inputs = (Input("pos_emb", "(npos, D) | (H, npos, D)",
                    "position embeddings e[0..npos-1], shared by all heads or one set per query head; "
                    "counts beyond npos - 1 are clamped to it"),)
    cost = ("O(Sq Sk D + Sq npos D) time; key tiles run right to left carrying each query's gate count; "
            "O(S) memory on the torch path (per query block: one tile of scores and npos position logits)")

    def input_shape(self, spec, sizes, value=None):
        npos = value.shape[-2] if isinstance(value, torch.Tensor) and value.dim() >= 2 else 1
        if isinstance(value, torch.Tensor) and value.dim() == 3:
            return (sizes["H"], npos, sizes["D"])
        return (npos, sizes["D"])

    def validate_call(self, call: Call) -> None:
        if call.inputs["pos_emb"].shape[-2] < 1:
            raise ValueError("cope: input 'pos_emb' (npos, D) | (H, npos, D) needs npos >= 1 positions")

    def gates(self, s, mask):
        """g_ij = sigmoid(s_ij), zero where key j is not attended (after the query)."""
        g = torch.sigmoid(s)
        return g if mask is None else g * mask

    def position_score(self, call, s, z, p):
        """The score with CoPE's position term, p the (unclamped) gate counts."""
        return s + call.scale * _interpolate(z, p.clamp(max=z.shape[-1] - 1))

    def init_carry(self, call, qb, b, h, q_pos):
        z = _position_logits(qb, call.inputs["pos_emb"].to(qb.dtype))
        return z, qb.new_zeros((*qb.shape[:-1], 1))  # gates counted in the tiles right of this one

    def carry_score(self, call, s, carry, b, h, q_pos, kv_pos, mask):
        z, counted = carry
        g = self.gates(s, mask)
        return self.position_score(call, s, z, counted + _reverse_cumsum(g)), (z, counted + g.sum(-1, keepdim=True))

    def _reference(self, q, k, v, call: Call):
        b, h, q_pos, kv_pos = _dense_grids(self, call, q.device)
        mask = self.full_mask(call, b, h, q_pos, kv_pos)
        dt = torch.promote_types(q.dtype, torch.float32)
        z = _position_logits(q.to(dt), call.inputs["pos_emb"].to(dt))

        def score(s):
            return self.position_score(call, s, z, _reverse_cumsum(self.gates(s, mask)))

        return masked_softmax_attention(q, k, v, call.scale, mask, score)


# ---- Cog attention (signed weights) -------------------------------------------------------------


@register
class Cog(SoftmaxVariant):
    """Cog attention: a_ij = sign(s_ij) exp(|s_ij|) / sum_t exp(|s_it|) over the attended keys.

    Masked keys leave both sums (the paper's code masks |s| with -inf before its softmax).
    """

    name = "cog"
    family = "scores"
    summary = "Cog attention: signed weights sign(s) exp(|s|) / sum exp(|s|), so a head can subtract values."
    paper = Paper("More Expressive Attention with Negative Weights", 2024, "2411.07176")
    normalization = "signed"
    cost = "O(Sq Sk D) time as full attention (online normalisation over |s|); O(S) memory on the torch path"

    def _reference(self, q, k, v, call: Call):
        b, h, q_pos, kv_pos = _dense_grids(self, call, q.device)
        s = _dense_scores(q, k, call)
        mask = self.full_mask(call, b, h, q_pos, kv_pos)
        magnitude = s.abs() if mask is None else s.abs().masked_fill(~mask, float("-inf"))
        weights = torch.sign(s) * torch.softmax(magnitude, dim=-1)
        return torch.matmul(weights, repeat_kv(v, q.shape[1]).to(s.dtype)).to(q.dtype)


# ---- Softplus attention with length scaling and re-weighting (LSSA / LSSAR) -------------------


def _softplus(x):
    """log(1 + e^x), exact to rounding for every x (no linear cut-over as in torch's threshold)."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def _log_softplus(x):
    """log(softplus(x)); below -30 softplus(x) = e^x to 5e-14 relative, so it is x there."""
    return torch.where(x < -30, x, torch.log(_softplus(x.clamp(min=-30))))


SOFTPLUS_FORMS = ("lssar", "lssa", "simplified")
LSSAR_POWER = 3.0  # p of ReLU(N A - 1)^p; our choice (the text at hand gives no single value)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


def _positive_power(x, p, tol=0.0):
    """x^p where x > tol, else 0, with finite gradients everywhere (also for p < 1 at x <= 0)."""
    pos = x > tol
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)) ** p, torch.zeros_like(x))


def _mean_tolerance(n, dtype):
    """How far above a row's mean weight rounding can put a weight that equals it (n_i terms summed):
    the re-weighting counts weights within it as at the mean, so ties give zero in every path."""
    return 4 * n * torch.finfo(dtype).eps


@register
class Softplus(SoftmaxVariant):
    """Softplus attention (Gao & Spratling): Softmax split into a positive map and l1 normalisation.

    form="lssar" (default, the paper's LSSAR), with q_i, k_j scaled to unit L2 norm and n_i the
    number of keys query i sees (its 1-based position under causality, Sk otherwise):
      1. LSSA: A_ij = w_ij / sum_j w_ij, w_ij = softplus(log d * log n_i * q_i.k_j) (`scale`
         defaults to log d for these forms; `length_scale=False` drops log n_i);
      2. re-weighting: R_ij = ReLU(n_i A_ij - 1)^p, o_i = sum_j R_ij v_j / sum_j R_ij: weights
         below the row's mean 1/n_i become exactly zero, the rest are sharpened by the power p. A row
         with nothing above its mean (all weights equal, e.g. a query that sees one key) gives zeros.
    form="lssa": step 1 alone. form="simplified": attnzoo's earlier simplification, kept as an
    option: no q/k normalisation, scale 1/sqrt(d), weights softplus(log n_i s_ij)^p l1-normalised
    (a power instead of the shifted ReLU, so no weight becomes zero).
    Fast paths: "lssa" and "simplified" are softmax over log-weights (p log softplus), so the online
    softmax engine and FlexAttention serve them. "lssar" needs each row's sum of softplus weights
    before its weights are known: the torch path makes two passes over the key tiles (row sums, then
    softmax over p log(n_i w_ij - W_i), which normalises to R_ij / sum R_ij), never an Sq x Sk
    tensor; it has no Flex path.
    """

    name = "softplus"
    family = "scores"
    summary = ("Softplus attention with re-weighting (LSSAR): cosine scores times log d log n_i through Softplus, "
               "l1-normalised, then ReLU(n_i A - 1)^p re-normalised, which zeroes below-average weights. "
               "form='lssa' (no re-weighting) and form='simplified' (no q/k normalisation, no shift: "
               "softplus(log n s)^p l1-normalised) are options.")
    paper = Paper("Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models",
                  2025, "2501.13428")
    has_score = True
    params = (
        Param("form", "lssar", "'lssar': the paper's definition (L2-normalised q, k; scale log d; Softplus; l1; "
                               "ReLU(n A - 1)^p re-weighting); 'lssa': without the re-weighting; 'simplified': "
                               "softplus(log n_i * s)^p l1-normalised on raw q, k with scale 1/sqrt(d)",
              (str,), lambda v: v in SOFTPLUS_FORMS, "'lssar', 'lssa' or 'simplified'"),
        _flag("length_scale", True, "scale query i's scores by log n_i, n_i the keys it sees (LSSA's entropy-"
                                    "invariant factor)"),
        Param("power", None, f"p: the re-weighting exponent of ReLU(n A - 1)^p for 'lssar' (None: "
                             f"{LSSAR_POWER:g}), the power on the weights for 'simplified' (None: 1, none); "
                             "unused by 'lssa'", (int, float, type(None)),
              lambda v: v is None or (math.isfinite(v) and v > 0), "None or a finite float > 0"),
    )
    cost = ("O(Sq Sk D) time as full attention, a softplus and a log per score ('lssar': two passes over the key "
            "tiles); O(S) memory on the torch path")

    @property
    def form(self) -> str:
        return self.config["form"]

    @property
    def p(self) -> float:
        given = self.config["power"]
        return float(given) if given is not None else (LSSAR_POWER if self.form == "lssar" else 1.0)

    @classmethod
    def _class_backends(cls) -> tuple[str, ...]:
        return ("torch",)  # the default form, lssar: see `info` for a configured form

    @functools.cached_property
    def info(self):
        backends = ("torch",) if self.form == "lssar" else ("torch", "flex")
        return dataclasses.replace(self.class_info(), backends=backends)

    def score_depends_on(self) -> frozenset:
        return frozenset({"lengths"}) if self.config["length_scale"] else frozenset()

    def _check_score_mod(self) -> None:
        if self.form != "simplified":
            raise TypeError(f"softplus form={self.form!r} has no score_mod: it attends with L2-normalised q and k "
                            + ("and re-weights each row by ReLU(n A - 1)^p, which needs the row's sum first"
                               if self.form == "lssar" else "(a score_mod sees only their dot product)")
                            + "; form='lssa' is form='simplified' with power=1 on q, k you normalise, scale=log(D)")
        super()._check_score_mod()

    def prepare(self, q, k, v, causal, scale, inputs):
        call = super().prepare(q, k, v, causal, scale, inputs)
        if scale is None and self.form != "simplified":
            call.scale = math.log(call.shapes.d)  # the paper's temperature for cosine scores
        return call

    def __call__(self, q, k, v, *, causal: bool = False, scale: float | None = None, backend: str = "auto",
                 **inputs):
        if self.form != "simplified" and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
            q, k = _unit(q), _unit(k)  # every backend then sees cosine scores
        return super().__call__(q, k, v, causal=causal, scale=scale, backend=backend, **inputs)

    def length_factor(self, call, q_pos, dtype):
        return torch.log(_visible_keys(call, q_pos).to(dtype)) if self.config["length_scale"] else 1.0

    def score(self, call, s, b, h, q_pos, kv_pos):
        z = self.length_factor(call, q_pos, s.dtype) * s
        if self.form == "lssa":
            return _log_softplus(z)
        if self.form == "simplified":
            return self.p * _log_softplus(z)
        # lssar: ReLU(n A - 1)^p / sum = (n w - W)^p / sum over the row's positive terms, W the row sum of w
        row_sum = call.inputs[_ROW_SUM][b, h, q_pos - call.shapes.offset].to(s.dtype)
        n = _visible_keys(call, q_pos).to(s.dtype)
        x = n * _softplus(z) - row_sum
        pos = x > _mean_tolerance(n, s.dtype) * row_sum
        return torch.where(pos, self.p * torch.log(torch.where(pos, x, torch.ones_like(x))),
                           torch.full_like(x, float("-inf")))

    def forward_torch(self, q, k, v, call: Call):
        from ..backends.torch_blockwise import softmax_blockwise

        if self.form != "lssar":
            return softmax_blockwise(self, q, k, v, call)

        inner = Call(call.shapes, call.scale, call.causal, {**call.inputs, _ROW_SUM: self.row_sums(q, k, call)},
                     call.device)
        return softmax_blockwise(self, q, k, v, inner)

    def row_sums(self, q, k, call: Call) -> torch.Tensor:
        """W_i = sum_j softplus(lambda_i s_ij) over the keys query i sees, (B, Hq, Sq), one query block and
        key tile at a time (the first of lssar's two passes; recomputed in backward, as the engine's)."""
        from torch.utils.checkpoint import checkpoint

        from ..backends import torch_blockwise as tb

        sh = call.shapes
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qg = q.view(sh.batch, sh.kv_heads, sh.group, sh.sq, sh.d)
        kg = k.unsqueeze(2)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        outs = []
        for q0 in range(0, sh.sq, tb.Q_BLOCK):
            q1 = min(q0 + tb.Q_BLOCK, sh.sq)
            args = (qg[..., q0:q1, :], kg, call, q0, q1, dt, tb.KV_BLOCK)
            outs.append(checkpoint(self._block_row_sums, *args, use_reentrant=False) if needs_grad
                        else self._block_row_sums(*args))
        return torch.cat(outs, dim=-1).reshape(sh.batch, sh.q_heads, sh.sq)

    def _block_row_sums(self, qb, kg, call: Call, q0: int, q1: int, dt, kv_block: int) -> torch.Tensor:
        sh = call.shapes
        qb = qb.to(dt)
        q_pos = (torch.arange(q0, q1, device=qb.device) + sh.offset).view(1, 1, 1, -1, 1)
        lam = self.length_factor(call, q_pos, dt)
        b = torch.arange(sh.batch, device=qb.device).view(-1, 1, 1, 1, 1)
        h = torch.arange(sh.q_heads, device=qb.device).view(1, sh.kv_heads, sh.group, 1, 1)
        end = min(sh.sk, q1 + sh.offset) if call.causal else sh.sk  # tiles past the last query are empty
        total = qb.new_zeros(qb.shape[:-1])
        for k0 in range(0, end, kv_block):
            # the engine's tiles and order of operations, so both passes round each weight alike
            k1 = min(k0 + kv_block, sh.sk)
            sc = torch.matmul(qb, kg[..., k0:k1, :].to(dt).transpose(-1, -2)) * call.scale
            w = _softplus(lam * sc)
            kv_pos = torch.arange(k0, k1, device=qb.device).view(1, 1, 1, 1, -1)
            m = self.full_mask(call, b, h, q_pos, kv_pos)
            total = total + (w if m is None else torch.where(m, w, torch.zeros_like(w))).sum(dim=-1)
        return total

    def _reference(self, q, k, v, call: Call):
        b, h, q_pos, kv_pos = _dense_grids(self, call, q.device)
        if self.form != "simplified":
            q, k = _unit(q), _unit(k)
        s = _dense_scores(q, k, call)
        w = _softplus(self.length_factor(call, q_pos, s.dtype) * s)
        mask = self.full_mask(call, b, h, q_pos, kv_pos)
        if mask is not None:
            w = w.masked_fill(~mask, 0.0)
        if self.form == "simplified":
            w = w ** self.p
        elif self.form == "lssar":
            a = w / w.sum(dim=-1, keepdim=True)
            n = _visible_keys(call, q_pos).to(s.dtype)
            w = _positive_power(n * a - 1, self.p, _mean_tolerance(n, s.dtype))
        total = w.sum(dim=-1, keepdim=True)
        o = torch.matmul(w, repeat_kv(v, q.shape[1]).to(s.dtype)) / torch.where(total > 0, total, torch.ones_like(total))
        return o.to(q.dtype)


_ROW_SUM = "_softplus_row_sum"  # lssar's per-row sums of the first pass, handed to `score` inside the call
