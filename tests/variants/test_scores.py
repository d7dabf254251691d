"""The score family: every variant exact against its dense definition on every pattern it claims."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch._dynamo.utils import counters

import attnzoo as az
from attnzoo.backends import flex, torch_blockwise
from attnzoo.variants.scores import alibi_slope
from harness import PATTERN_SHAPES, assert_exact, assert_reference_rule, max_err, qkv

F64 = torch.float64


def _rand(*shape, seed=0, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(*shape, generator=g, dtype=F64)


# Extra inputs of one call, from its sizes (b, hq, hkv, sq, sk, d).
def slopes(b, hq, hkv, sq, sk, d):
    return {"slopes": _rand(hq, seed=1, high=0.5)}


def temperatures(b, hq, hkv, sq, sk, d):
    return {"q_temperature": _rand(b, hq, sq, seed=2, low=0.3, high=2.0),
            "v_temperature": _rand(b, hkv, sk, seed=3, low=0.3, high=2.0)}


def pos_emb(npos, per_head=False):
    def make(b, hq, hkv, sq, sk, d):
        n = min(npos, sk + 1)  # a count never exceeds Sk; more embeddings would only slow gradcheck
        shape = (hq, n, d) if per_head else (n, d)
        return {"pos_emb": torch.randn(*shape, generator=torch.Generator().manual_seed(npos), dtype=F64)}

    return make


# name -> list of (params, inputs(b, hq, hkv, sq, sk, d) -> dict or None)
CASES = {
    "alibi": [({}, None), ({"symmetric": False}, None), ({}, slopes)],
    "softcap": [({"cap": 5.0}, None), ({"cap": 0.5}, None)],
    "selective": [({}, temperatures), ({"pos_scale": 0.7}, None), ({"pos_scale": 0.3}, temperatures)],
    # npos 96 > every count here (interpolation only); 7 clamps most counts
    "cope": [({}, pos_emb(96)), ({}, pos_emb(7, per_head=True))],
    "cog": [({}, None)],
    "softplus": [({}, None), ({"power": 1.5, "length_scale": False}, None), ({"form": "lssa"}, None),
                 ({"form": "simplified", "power": 4.0}, None),
                 ({"form": "simplified", "length_scale": False, "power": 2.5}, None)],
}


def _inputs(fn, *sizes):
    return {} if fn is None else fn(*sizes)


def _cases():
    for name, configs in CASES.items():
        for i, (params, inputs) in enumerate(configs):
            yield pytest.param(name, params, inputs, id=f"{name}-{i}")


def _low(inputs, dtype):
    return {n: t.to(dtype) for n, t in inputs.items()}


@pytest.fixture
def mid_blocks(monkeypatch):
    """32 x 64 tiles: 150 tokens still span 5 query blocks and 3 key tiles, at a fraction of the cost."""
    monkeypatch.setattr(torch_blockwise, "Q_BLOCK", 32)
    monkeypatch.setattr(torch_blockwise, "KV_BLOCK", 64)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """4 x 4 tiles: gradcheck shapes of a few tokens still span several query blocks and key tiles."""
    monkeypatch.setattr(torch_blockwise, "Q_BLOCK", 4)
    monkeypatch.setattr(torch_blockwise, "KV_BLOCK", 4)


def test_every_score_variant_has_cases_and_a_paper():
    infos = az.variants(family="scores")
    assert {i.name for i in infos} == set(CASES)
    for info in infos:
        assert info.paper.arxiv and info.summary and info.cost


def test_backends_follow_the_normalisation():
    backends = {i.name: set(i.backends) for i in az.variants(family="scores")}
    assert backends["alibi"] == backends["softcap"] == {"torch", "flex"}
    for name in ("cog", "cope", "selective", "softplus"):  # signed weights, a carry, a value temperature, a row sum
        assert backends[name] == {"torch"}
    # softplus's re-weighting needs each row's sum first; without it, it is softmax over log-weights
    assert set(az.get("softplus", form="lssa").info.backends) == {"torch", "flex"}
    assert set(az.get("softplus", form="simplified").info.backends) == {"torch", "flex"}


# ---- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
@pytest.mark.parametrize("pattern", list(PATTERN_SHAPES))
def test_torch_path_equals_reference_float64(small_blocks, name, params, inputs, pattern):
    attn = az.get(name, **params)
    causal, sq, sk = PATTERN_SHAPES[pattern]
    extra = _inputs(inputs, 2, 6, 2, sq, sk, 16)
    q, k, v = qkv(2, 6, 2, sq, sk, 16, dv=24)  # GQA 3:1 and Dv != D
    if pattern not in attn.info.patterns:
        with pytest.raises(ValueError, match=pattern):
            attn(q, k, v, causal=causal, **extra)
        return
    assert_exact(attn, q, k, v, causal, **extra)


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_flashattention_rule(mid_blocks, name, params, inputs, dtype):
    attn = az.get(name, **params)
    q, k, v = qkv(2, 4, 2, 150, 150, 32, seed=3)
    assert_reference_rule(attn, q, k, v, True, dtype, **_inputs(inputs, 2, 4, 2, 150, 150, 32))


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
def test_gradcheck_including_extra_inputs(tiny_blocks, name, params, inputs):
    attn = az.get(name, **params)
    q, k, v = qkv(1, 2, 1, 9, 9, 4, requires_grad=True, seed=5)
    extra = {n: t.requires_grad_(True) for n, t in _inputs(inputs, 1, 2, 1, 9, 9, 4).items()}
    names = list(extra)

    def f(q, k, v, *tensors):
        return attn(q, k, v, causal=True, backend="torch", **dict(zip(names, tensors)))

    # fast mode checks a random projection of the Jacobian; full gradients are compared below
    torch.autograd.gradcheck(f, (q, k, v, *extra.values()), atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
def test_gradients_match_reference(small_blocks, name, params, inputs):
    attn = az.get(name, **params)
    q, k, v = qkv(1, 4, 2, 70, 70, 8, requires_grad=True, seed=6)
    extra = {n: t.requires_grad_(True) for n, t in _inputs(inputs, 1, 4, 2, 70, 70, 8).items()}
    leaves = (q, k, v, *extra.values())
    grads = torch.autograd.grad(attn(q, k, v, causal=True, **extra).square().sum(), leaves)
    ref_grads = torch.autograd.grad(attn.reference(q, k, v, causal=True, **extra).square().sum(), leaves)
    for g1, g2 in zip(grads, ref_grads):
        assert max_err(g1, g2) < 1e-10


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
def test_decode_single_query_smollm2_heads(name, params, inputs):
    """Sq = 1 against a 700-token cache (two key tiles), 9 query / 3 kv heads as in SmolLM2."""
    attn = az.get(name, **params)
    assert "causal_cross" in attn.info.patterns
    q, k, v = qkv(2, 9, 3, 1, 700, 64, seed=7)
    assert_exact(attn, q, k, v, True, **_inputs(inputs, 2, 9, 3, 1, 700, 64))


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
def test_no_sq_by_sk_tensor_is_built(monkeypatch, name, params, inputs):
    """Every matmul of the torch path is at most one query block by one key tile (or npos) wide."""
    seen = []
    orig = torch.matmul

    def spy(a, b):
        seen.append((a.shape[-2], b.shape[-1]))
        return orig(a, b)

    q, k, v = qkv(1, 2, 1, 700, 700, 8, dtype=torch.float32)
    extra = _low(_inputs(inputs, 1, 2, 1, 700, 700, 8), torch.float32)
    monkeypatch.setattr(torch, "matmul", spy)
    az.get(name, **params)(q, k, v, causal=True, backend="torch", **extra)
    assert seen and all(m <= torch_blockwise.Q_BLOCK and n <= torch_blockwise.KV_BLOCK for m, n in seen)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(CASES)), b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.integers(1, 3),
    sq=st.integers(1, 60), sk=st.integers(1, 60), d=st.sampled_from([4, 8, 12]), causal=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]), cap=st.floats(0.1, 30.0),
    power=st.floats(0.5, 6.0), flag=st.booleans(), pos_scale=st.floats(0.0, 2.0), npos=st.integers(1, 80),
    with_inputs=st.booleans(), form=st.sampled_from(["lssar", "lssa", "simplified"]),
)
def test_fuzz_shapes_dtypes_patterns_params(name, b, hkv, group, sq, sk, d, causal, dtype, cap, power, flag,
                                            pos_scale, npos, with_inputs, form):
    hq = hkv * group
    if name == "cope":
        causal = True
    if causal and sq > sk:
        sq, sk = sk, sq
    params = {"alibi": {"symmetric": flag}, "softcap": {"cap": cap}, "selective": {"pos_scale": pos_scale},
              # lssar's ReLU threshold: p >= 1 keeps float32 rounding near it far below the tolerance
              "softplus": {"power": max(power, 1.0) if form == "lssar" else power, "length_scale": flag,
                           "form": form}}.get(name, {})
    sizes = (b, hq, hkv, sq, sk, d)
    inputs = {"alibi": slopes, "selective": temperatures}.get(name) if with_inputs else None
    extra = pos_emb(npos, per_head=flag)(*sizes) if name == "cope" else _inputs(inputs, *sizes)
    attn = az.get(name, **params)
    q, k, v = qkv(b, hq, hkv, sq, sk, d, seed=sq * 100 + sk)
    old = torch_blockwise.Q_BLOCK, torch_blockwise.KV_BLOCK
    torch_blockwise.Q_BLOCK, torch_blockwise.KV_BLOCK = 8, 16
    try:
        out = attn(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, backend="torch", **_low(extra, dtype))
        ref = attn.reference(q, k, v, causal=causal, **extra)
    finally:
        torch_blockwise.Q_BLOCK, torch_blockwise.KV_BLOCK = old
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-10 if dtype == torch.float64 else 2e-5 * max(1.0, ref.abs().max().item())
    assert max_err(out, ref) <= tol, (name, params, causal, sq, sk)


# ---- known answers --------------------------------------------------------------------------------


def _weights(attn, q, k, causal, **inputs):
    """The attention weights a fast path uses, read out through v = identity (Dv = Sk)."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    eye = torch.eye(sk, dtype=q.dtype).expand(b, hkv, sk, sk)
    return attn(q, k, eye, causal=causal, backend="torch", **inputs)


def _positions(sq, sk):
    """Absolute query and key positions, (Sq, 1) and (1, Sk), as float64."""
    return (torch.arange(sq, dtype=F64) + sk - sq).view(-1, 1), torch.arange(sk, dtype=F64).view(1, -1)


def test_alibi_slopes_follow_the_paper():
    assert alibi_slope(torch.arange(8), 8).tolist() == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slope(torch.arange(6), 6).tolist() == [2.0 ** -e for e in (2, 4, 6, 8, 1, 3)]
    twelve = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -e for e in (0.5, 1.5, 2.5, 3.5)]
    assert max_err(alibi_slope(torch.arange(12), 12), torch.tensor(twelve, dtype=F64)) < 1e-15


def test_alibi_bias_is_linear_in_distance(small_blocks):
    """With q = 0 every score is 0, so the weights are softmax(-slope |i - j|) over the visible keys."""
    q, k, _ = qkv(1, 3, 3, 40, 40, 8)
    w = _weights(az.get("alibi"), torch.zeros_like(q), k, True)
    i, j = _positions(40, 40)
    for h, slope in enumerate(alibi_slope(torch.arange(3), 3).tolist()):
        bias = (-slope * (i - j)).masked_fill(j > i, float("-inf"))
        assert max_err(w[0, h], torch.softmax(bias, -1)) < 1e-12


def test_alibi_zero_slopes_is_full_attention(small_blocks):
    q, k, v = qkv(2, 6, 2, 45, 70, 16)
    for causal in (True, False):
        out = az.attention(q, k, v, "alibi", causal=causal, slopes=torch.zeros(6, dtype=F64), backend="torch")
        assert max_err(out, az.get("full").reference(q, k, v, causal=causal)) < 1e-12


def test_softcap_huge_cap_is_full_and_small_cap_bounds_scores(small_blocks):
    q, k, v = qkv(1, 4, 2, 61, 61, 16)
    huge = az.attention(q, k, v, "softcap", cap=1e8, causal=True, backend="torch")
    assert max_err(huge, az.get("full").reference(q, k, v, causal=True)) < 1e-12
    # scores of size ~100 capped at 2: each weight is within e^4 of the row's mean weight
    w = _weights(az.get("softcap", cap=2.0), q * 30, k, False)
    assert (w.amax(-1) / w.amin(-1)).max() <= math.exp(4) + 1e-9


def test_cope_with_zero_or_one_position_embedding_is_full_causal(small_blocks):
    """e = 0 adds nothing; a single embedding adds q_i.e[0] to every key of row i, which softmax ignores."""
    q, k, v = qkv(2, 6, 2, 19, 83, 16)
    full = az.get("full").reference(q, k, v, causal=True)
    cope = az.get("cope")
    assert max_err(cope(q, k, v, causal=True, pos_emb=torch.zeros(30, 16, dtype=F64)), full) < 1e-12
    assert max_err(cope(q, k, v, causal=True, pos_emb=torch.randn(6, 1, 16, dtype=F64)), full) < 1e-12


def test_cope_counts_gates_from_key_to_query():
    """p_ij = sum_{t=j..i} sigmoid(s_it), written out as loops for a tiny case."""
    q, k, v = qkv(1, 1, 1, 5, 5, 4, seed=9)
    e = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    scale = 4 ** -0.5
    s = (q[0, 0] @ k[0, 0].T) * scale
    z = q[0, 0] @ e.T
    logits = torch.full((5, 5), float("-inf"), dtype=F64)
    for i in range(5):
        for j in range(i + 1):
            p = sum(torch.sigmoid(s[i, t]) for t in range(j, i + 1))
            lo, w = math.floor(p), p - math.floor(p)
            logits[i, j] = s[i, j] + scale * (z[i, lo] * (1 - w) + z[i, min(lo + 1, 7)] * w)
    want = torch.softmax(logits, -1) @ v[0, 0]
    assert max_err(az.attention(q, k, v, "cope", causal=True, pos_emb=e)[0, 0], want) < 1e-12


def test_cog_weights_are_signed_exp_of_magnitudes(small_blocks):
    q, k, _ = qkv(2, 4, 2, 45, 70, 8)
    w = _weights(az.get("cog"), q, k, False)
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5
    assert max_err(w, torch.sign(s) * torch.softmax(s.abs(), -1)) < 1e-12
    assert max_err(w.abs().sum(-1), torch.ones(2, 4, 45, dtype=F64)) < 1e-12
    assert (w < 0).any() and (w > 0).any()


def test_cog_on_positive_scores_is_softmax(small_blocks):
    q, k, v = qkv(2, 6, 2, 77, 77, 16)
    q, k = q.abs(), k.abs()  # every score > 0: sign = 1 and |s| = s
    for causal in (True, False):
        out = az.attention(q, k, v, "cog", causal=causal, backend="torch")
        assert max_err(out, az.get("full").reference(q, k, v, causal=causal)) < 1e-12


def test_softplus_simplified_weights_are_l1_normalised_and_reweighting_sharpens(small_blocks):
    q, k, v = qkv(2, 4, 2, 61, 61, 8)
    for power in (1.0, 4.0):
        out = az.attention(q, k, torch.ones_like(v), "softplus", form="simplified", power=power, causal=True)
        assert max_err(out, torch.ones_like(out)) < 1e-12
    w1 = _weights(az.get("softplus", form="simplified"), q, k, True)
    w4 = _weights(az.get("softplus", form="simplified", power=4.0), q, k, True)
    i, j = _positions(61, 61)
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5
    plain = torch.nn.functional.softplus(torch.log(i + 1.0) * s).masked_fill(j > i, 0.0)
    assert max_err(w1, plain / plain.sum(-1, keepdim=True)) < 1e-12
    assert max_err(w4, plain ** 4 / (plain ** 4).sum(-1, keepdim=True)) < 1e-12
    assert (w4.amax(-1) >= w1.amax(-1) - 1e-15).all()  # the largest weight only grows


def test_selective_temperatures_scale_scores_and_values(small_blocks):
    q, k, v = qkv(2, 6, 2, 45, 70, 16)
    full = az.get("full")
    sel = az.get("selective", pos_scale=0)
    assert max_err(sel(q, k, v), full.reference(q, k, v)) < 1e-12
    tq = _rand(2, 6, 45, seed=4, low=0.5, high=2.0)
    tv = _rand(2, 2, 70, seed=5, low=0.5, high=2.0)
    out = sel(q, k, v, q_temperature=tq, v_temperature=tv)
    assert max_err(out, full.reference(q * tq.unsqueeze(-1), k, v * tv.unsqueeze(-1))) < 1e-12
    # position-aware: scores of the query at position n times 1 + c log n (the released code)
    n = torch.arange(70 - 45, 70, dtype=F64) + 1
    out = az.attention(q, k, v, "selective", pos_scale=0.4, causal=True, backend="torch")
    want = full.reference(q * (1 + 0.4 * torch.log(n)).view(1, 1, -1, 1), k, v, causal=True)
    assert max_err(out, want) < 1e-12


def _lssar_by_the_paper(q, k, v, causal, p):
    """The paper's LSSAR written out: q, k L2-normalised; LSSA = l1(Softplus(log d log N_i q.k) masked);
    re-weighting l1(ReLU(N_i LSSA - 1)^p); N_i the keys query i sees."""
    g = q.shape[1] // k.shape[1]
    qn = torch.nn.functional.normalize(q, dim=-1)
    kn = torch.nn.functional.normalize(k, dim=-1).repeat_interleave(g, 1)
    sq, sk, d = q.shape[2], k.shape[2], q.shape[3]
    i, j = _positions(sq, sk)
    n = (i + 1) if causal else torch.full_like(i, sk)
    w = torch.nn.functional.softplus(math.log(d) * torch.log(n) * (qn @ kn.transpose(-1, -2)), threshold=1000)
    if causal:
        w = w.masked_fill(j > i, 0.0)
    a = w / w.sum(-1, keepdim=True)
    r = torch.relu(n * a - 1) ** p
    return (r @ v.repeat_interleave(g, 1)) / r.sum(-1, keepdim=True).clamp_min(1e-300), r


@pytest.mark.parametrize("causal,sq,sk", [(True, 77, 77), (True, 19, 83), (False, 45, 70)])
def test_softplus_default_is_the_papers_lssar(small_blocks, causal, sq, sk):
    q, k, v = qkv(2, 6, 2, sq, sk, 16, seed=8)
    attn = az.get("softplus")
    want, r = _lssar_by_the_paper(q, k, v, causal, 3.0)
    for out in (attn(q, k, v, causal=causal), attn.reference(q, k, v, causal=causal)):
        assert max_err(out, want) < 1e-12
    assert (r == 0).double().mean() > 0.5  # below-average weights are exactly zero
    w = _weights(attn, q, k, causal)
    assert ((w == 0) == (r == 0)).all()
    assert max_err(az.get("softplus", power=1.0)(q, k, v, causal=causal),
                   _lssar_by_the_paper(q, k, v, causal, 1.0)[0]) < 1e-12


def test_softplus_lssar_first_query_has_nothing_above_average(small_blocks):
    """N_1 = 1: the query's one weight is the mean, ReLU(1 * 1 - 1) = 0, so its row gives zeros, never NaN."""
    q, k, v = qkv(1, 2, 1, 20, 20, 8)
    out = az.get("softplus")(q, k, v, causal=True)
    assert torch.isfinite(out).all() and (out[:, :, 0] == 0).all() and (out[:, :, 1:].abs().sum(-1) > 0).all()


def test_selective_default_sharpens_with_position(small_blocks):
    """The default (pos_scale 0.5) is not plain attention: query i's scores are multiplied by 1 + 0.5 log n_i."""
    q, k, v = qkv(2, 6, 2, 45, 70, 16)
    full = az.get("full")
    for causal in (True, False):
        n = torch.arange(70 - 45, 70, dtype=F64) + 1 if causal else torch.full((45,), 70.0, dtype=F64)
        want = full.reference(q * (1 + 0.5 * torch.log(n)).view(1, 1, -1, 1), k, v, causal=causal)
        out = az.get("selective")(q, k, v, causal=causal)
        assert max_err(out, want) < 1e-12 and max_err(out, full.reference(q, k, v, causal=causal)) > 1e-3
    assert "attnzoo.nn" not in az.get("selective").info.as_dict()["inputs"]["q_temperature"]["doc"]


# ---- standalone score_mod, and FlexAttention users --------------------------------------------------


def _alibi_by_attention_gym(h, heads):
    """attention-gym's ALiBi slope for head h of `heads` (a power of two): 2^(-8 (h + 1) / heads)."""
    return 2.0 ** (-8.0 * (h + 1) / heads)


def test_standalone_alibi_score_mod_uses_the_heads_it_is_given():
    score = torch.zeros(())
    q_idx, kv_idx = torch.tensor(10), torch.tensor(0)
    with pytest.raises(TypeError, match=r"score_mod_for.*heads=Hq.*az.get\('alibi', heads=Hq\)"):
        az.get("alibi").score_mod
    mod = az.get("alibi", heads=4).score_mod
    got = [mod(score, torch.tensor(0), torch.tensor(h), q_idx, kv_idx).item() for h in range(4)]
    assert got == pytest.approx([-10 * _alibi_by_attention_gym(h, 4) for h in range(4)], rel=1e-6)
    assert [-g / 10 for g in got] == pytest.approx([1 / 4, 1 / 16, 1 / 64, 1 / 256])
    mod_for = az.get("alibi").score_mod_for(16, 16, heads=4)
    assert mod_for(score, torch.tensor(0), torch.tensor(3), q_idx, kv_idx).item() == pytest.approx(-10 / 256)
    q, k, v = qkv(1, 2, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="'heads'=4.*Hq=2"):
        az.get("alibi", heads=4)(q, k, v)


@pytest.mark.parametrize("name,params", [("softplus", {}), ("softplus", {"form": "simplified"}),
                                         ("softplus", {"form": "lssa", "length_scale": False}),
                                         ("selective", {})])
def test_standalone_score_mod_refuses_what_it_cannot_know(name, params):
    with pytest.raises(TypeError, match="score_mod"):
        az.get(name, **params).score_mod


def test_flex_users_score_mod():
    """score_mod / score_mod_for handed to flex_attention, as Flex users do, against the formulas written here."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    q, k, v = qkv(1, 4, 4, 256, 256, 16, dtype=torch.float32, seed=9)
    qd, kd, vd = q.double(), k.double(), v.double()
    i, j = _positions(256, 256)
    s = qd @ kd.transpose(-1, -2) * 16 ** -0.5
    bm = create_block_mask(causal, 1, 1, 256, 256, device="cpu")
    slopes = torch.tensor([_alibi_by_attention_gym(h, 4) for h in range(4)], dtype=F64).view(4, 1, 1)
    want = torch.softmax((s - slopes * (i - j)).masked_fill(j > i, float("-inf")), -1) @ vd
    for mod in (az.get("alibi", heads=4).score_mod, az.get("alibi").score_mod_for(256, 256, causal=True, heads=4)):
        assert max_err(flex_attention(q, k, v, score_mod=mod, block_mask=bm), want) < 2e-5
    out = flex_attention(q, k, v, score_mod=az.get("softcap", cap=2.0).score_mod)
    assert max_err(out, torch.softmax(2.0 * torch.tanh(s / 2.0), -1) @ vd) < 2e-5
    sel = az.get("selective").score_mod_for(256, 256, causal=True, heads=4)
    want = torch.softmax((s * (1 + 0.5 * torch.log(i + 1))).masked_fill(j > i, float("-inf")), -1) @ vd
    assert max_err(flex_attention(q, k, v, score_mod=sel, block_mask=bm), want) < 2e-5
    sp = az.get("softplus", form="simplified", power=2.0).score_mod_for(256, 256, causal=True, heads=4)
    w = (torch.nn.functional.softplus(torch.log(i + 1) * s) ** 2).masked_fill(j > i, 0.0)
    assert max_err(flex_attention(q, k, v, score_mod=sp, block_mask=bm), (w / w.sum(-1, keepdim=True)) @ vd) < 2e-5


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params,match", [
    ("softcap", {"cap": -1.0}, "cap"), ("softcap", {"cap": 0}, "cap"), ("softcap", {"cap": math.nan}, "cap"),
    ("softcap", {"cap": True}, "cap"), ("softplus", {"power": 0.0}, "power"),
    ("softplus", {"length_scale": "yes"}, "length_scale"), ("selective", {"pos_scale": -0.1}, "pos_scale"),
    ("alibi", {"symmetric": 1}, "symmetric"), ("alibi", {"symmetric": None}, "symmetric"),
    ("selective", {"pos_scale": None}, "pos_scale"), ("cog", {"cap": 1.0}, "unknown parameter"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        az.get(name, **params)


def test_bad_inputs():
    q, k, v = qkv(2, 6, 2, 10, 12, 8)
    cope = az.get("cope")
    with pytest.raises(TypeError, match="missing required input 'pos_emb'"):
        cope(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"pos_emb.*\(npos, D\) \| \(H, npos, D\).*\(5, 8\)"):
        cope(q, k, v, causal=True, pos_emb=torch.zeros(5, 7, dtype=F64))
    with pytest.raises(ValueError, match=r"pos_emb.*\(6, 5, 8\)"):
        cope(q, k, v, causal=True, pos_emb=torch.zeros(2, 5, 8, dtype=F64))
    with pytest.raises(ValueError, match="pos_emb"):
        cope(q, k, v, causal=True, pos_emb=torch.zeros(8, dtype=F64))
    with pytest.raises(ValueError, match="npos >= 1"):
        cope(q, k, v, causal=True, pos_emb=torch.zeros(0, 8, dtype=F64))
    with pytest.raises(TypeError, match="pos_emb.*float"):
        cope(q, k, v, causal=True, pos_emb=torch.zeros(5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="noncausal_cross"):
        cope(q, k, v, causal=False, pos_emb=torch.zeros(5, 8, dtype=F64))
    with pytest.raises(ValueError, match=r"slopes.*\(H,\) = \(6,\)"):
        az.attention(q, k, v, "alibi", slopes=torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match=r"q_temperature.*\(2, 6, 10\)"):
        az.attention(q, k, v, "selective", q_temperature=torch.ones(2, 6, 12, dtype=F64))
    with pytest.raises(ValueError, match=r"v_temperature.*\(2, 2, 12\)"):
        az.attention(q, k, v, "selective", v_temperature=torch.ones(2, 6, 12, dtype=F64))
    with pytest.raises(TypeError, match="unknown parameter or input 'slopes'"):
        az.attention(q, k, v, "softcap", slopes=torch.zeros(6, dtype=F64))


def test_paths_that_do_not_exist_are_refused():
    q, k, v = qkv(1, 2, 2, 8, 8, 8, dtype=torch.float32)
    for name in ("cog", "selective"):
        with pytest.raises(ValueError, match="has no 'flex' path"):
            az.attention(q, k, v, name, backend="flex")
        with pytest.raises(ValueError, match="sdpa"):
            az.attention(q, k, v, name, backend="sdpa")
    for name in ("cog", "cope"):
        with pytest.raises(TypeError, match="no score_mod"):
            az.get(name).score_mod(torch.zeros(()), 0, 0, torch.tensor(1), torch.tensor(0))
    assert az.get("softcap", cap=1.0).score_mod(torch.tensor(100.0), 0, 0, 0, 0).item() == pytest.approx(1.0)


# ---- flex (CPU, float32) --------------------------------------------------------------------------


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.flex
@pytest.mark.parametrize("name,params,causal,sq,sk", [
    ("alibi", {}, True, 150, 150),
    ("softcap", {"cap": 2.0}, False, 45, 190),
])
def test_flex_equals_reference_and_does_not_recompile(name, params, causal, sq, sk):
    attn = az.get(name, **params)
    for seed in (0, 1):
        if seed == 1:
            before, built = _graphs(), flex.stats["block_masks_built"]
        q, k, v = qkv(2, 6, 2, sq, sk, 16, dtype=torch.float32, seed=seed)
        out = attn(q, k, v, causal=causal, backend="flex")
        assert max_err(out, attn.reference(q.double(), k.double(), v.double(), causal=causal)) < 2e-5
    assert _graphs() == before, "a repeated call with the same configuration recompiled"
    assert flex.stats["block_masks_built"] == built, "the block mask was rebuilt"


@pytest.mark.flex
def test_flex_softplus_and_alibi_slopes_input():
    q, k, v = qkv(1, 4, 2, 70, 130, 16, dtype=torch.float32, seed=2)
    for attn in (az.get("softplus", form="simplified", power=3.0), az.get("softplus", form="lssa")):
        out = attn(q, k, v, causal=True, backend="flex")
        assert max_err(out, attn.reference(q.double(), k.double(), v.double(), causal=True)) < 2e-5
    with pytest.raises(ValueError, match="has no 'flex' path"):
        az.get("softplus")(q, k, v, causal=True, backend="flex")  # lssar: its row sums come first
    alibi = az.get("alibi")
    for seed in (3, 4):  # new slope values of the same shape reuse the kernel
        if seed == 4:
            before = _graphs()
        s = _rand(4, seed=seed, high=0.5)
        out = alibi(q, k, v, causal=True, backend="flex", slopes=s.float())
        assert max_err(out, alibi.reference(q.double(), k.double(), v.double(), causal=True, slopes=s)) < 2e-5
    assert _graphs() == before
