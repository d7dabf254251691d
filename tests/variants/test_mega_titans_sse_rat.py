"""mega, titans, sse and rat under the recurrent contract: parallel == chunk == recurrent == step == an independent
per-token loop (linear_memory_defs.py) at lengths that are not multiples of the chunk / mini-batch; GQA; the
causal cross pattern (mega refuses it); state carried over pieces == one pass; packed sequences never share
state; gradients of the chunk form == those of the definition; bf16; bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from linear_memory_defs import mega_loop, rat_loop, sse_loop, titans_loop

import attnzoo as az

F64 = torch.float64
MODES = ("parallel", "chunk", "recurrent")


def _titans_inputs(gen, b, hkv, s, d, dv):
    theta = 0.5 * torch.rand(b, hkv, s, generator=gen, dtype=F64)
    eta = torch.rand(b, hkv, s, generator=gen, dtype=F64)
    alpha = 0.2 * torch.rand(b, hkv, s, generator=gen, dtype=F64)
    eta[..., s // 3] = 0.0      # no momentum at one token, full forgetting at another: the extreme gates
    alpha[..., s // 2] = 1.0
    return {"theta": theta, "eta": eta, "alpha": alpha}


def _sse_inputs(gen, b, hkv, s, d, dv, gated=True, states=3):
    out = {"router": torch.randn(b, hkv, s, states, generator=gen, dtype=F64)}
    if gated:
        out["g"] = F.logsigmoid(torch.randn(b, hkv, s, d, generator=gen, dtype=F64))
    return out


def _rat_inputs(gen, b, hkv, s, d, dv):
    fk, fv = torch.rand(b, hkv, s, d, generator=gen, dtype=F64), torch.rand(b, hkv, s, dv, generator=gen, dtype=F64)
    fk[..., s // 3, 0], fv[..., s // 2, 0] = 0.0, 1.0
    return {"fk": fk, "fv": fv}


def _mega_inputs(gen, b, hkv, s, d, dv, e=3):
    alpha, delta = torch.rand(hkv, d, e, generator=gen, dtype=F64), torch.rand(hkv, d, e, generator=gen, dtype=F64)
    alpha[0, 0, 0] = delta[0, 0, 0] = 1.0      # phi = 0: the EMA forgets everything
    return {"ema_alpha": alpha, "ema_delta": delta, "ema_beta": torch.randn(hkv, d, e, generator=gen, dtype=F64),
            "ema_eta": torch.randn(hkv, d, e, generator=gen, dtype=F64)}


def _default_titans(q, k, v, x, p):
    full = lambda c: torch.full(k.shape[:3], c, dtype=F64)
    return titans_loop(q, k, v, full(0.1), full(0.9), full(0.01), p.get("mini_batch", 16))


def _default_rat(q, k, v, x, p):
    return rat_loop(q, k, v, torch.full_like(k, 0.5), torch.full_like(v, 0.5), p["chunk"])


# id -> (variant, parameters, inputs(gen, b, hkv, s, d, dv), independent loop(q, k, v, inputs, params),
# serves the causal cross pattern)
CASES = {
    "titans": ("titans", {"mini_batch": 5}, _titans_inputs,
               lambda q, k, v, x, p: titans_loop(q, k, v, x["theta"], x["eta"], x["alpha"], p["mini_batch"]), True),
    "titans-online-defaults": ("titans", {"mini_batch": 1}, lambda *a: {}, _default_titans, True),
    "sse-gated-top2": ("sse", {"states": 3, "active": 2}, _sse_inputs,
                       lambda q, k, v, x, p: sse_loop(q, k, v, x["router"], 2, x["g"]), True),
    "sse-top1-raw-keys": ("sse", {"states": 4, "active": 1, "key_softmax": False},
                          lambda *a: _sse_inputs(*a, gated=False, states=4),
                          lambda q, k, v, x, p: sse_loop(q, k, v, x["router"], 1, key_softmax=False), True),
    "rat": ("rat", {"chunk": 5}, _rat_inputs, lambda q, k, v, x, p: rat_loop(q, k, v, x["fk"], x["fv"], 5), True),
    "rat-defaults": ("rat", {"chunk": 4}, lambda *a: {}, _default_rat, True),
    "mega": ("mega", {"chunk": 5, "ema_dim": 3}, _mega_inputs,
             lambda q, k, v, x, p: mega_loop(q, k, v, x["ema_alpha"], x["ema_delta"], x["ema_beta"], x["ema_eta"],
                                             5), False),
}
IDS = list(CASES)
INTERVAL = {"theta", "eta", "alpha", "fk", "fv", "ema_alpha", "ema_delta"}   # inputs bounded to [0, 1] here


def get(case, **extra):
    name, params = CASES[case][:2]
    return az.get(name, **params, **extra)


def make(case, b=2, hq=2, hkv=2, s=29, d=4, dv=3, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=gen, dtype=F64)
    k = torch.randn(b, hkv, s, d, generator=gen, dtype=F64)
    v = torch.randn(b, hkv, s, dv, generator=gen, dtype=F64)
    inputs = CASES[case][2](gen, b, hkv, s, d, dv)
    return q.to(dtype), k.to(dtype), v.to(dtype), inputs


HEADS = [(2, 2), (4, 2), (3, 1)]


def cut(attn, inputs, a, b):
    """The inputs of tokens a..b-1: per-token ones sliced, per-call ones whole."""
    per_token = attn.per_token_inputs()
    return {n: t[:, :, a:b] if n in per_token else t for n, t in inputs.items()}


def rows_of(attn, x):
    """A state without RAT's padding rows (count 0), for comparing packed and alone runs."""
    if attn.name != "rat":
        return x
    return x[:, :, : int((x[..., -1] > 0).sum(-1).max())]


def err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", IDS)
def test_every_form_and_the_final_state_equal_the_per_token_loop(case):
    for hq, hkv in HEADS:
        q, k, v, x = make(case, hq=hq, hkv=hkv, s=17)
        expected, final = CASES[case][3](q, k, v, x, CASES[case][1])
        attn = get(case)
        for mode in MODES:
            o, state = attn(q, k, v, causal=True, mode=mode, output_final_state=True, **x)
            assert o.shape == expected.shape and state.shape == final.shape, (mode, hq, hkv)
            assert err(o, expected) < 1e-10 and err(state, final) < 1e-10, (mode, hq, hkv)


@pytest.mark.parametrize("case", IDS)
def test_chunk_equals_parallel_at_lengths_not_multiple_of_the_chunk(case):
    q, k, v, x = make(case, s=37)
    ref = get(case).reference(q, k, v, causal=True, **x)
    sizes = (1, 5, 16, 64) if CASES[case][0] == "sse" else (None,)   # sse's chunk_size is compute-only
    for size in sizes:
        attn = get(case) if size is None else get(case, chunk_size=size)
        assert err(attn(q, k, v, causal=True, mode="chunk", **x), ref) < 1e-10, size


@pytest.mark.parametrize("case", IDS)
def test_causal_cross_pattern_queries_are_the_last_positions(case):
    q, k, v, x = make(case, s=20)
    attn = get(case)
    if case == "mega":  # the queries' EMA needs the earlier queries: refused, not computed from absent ones
        with pytest.raises(ValueError, match="causal_cross"):
            attn(q[:, :, -7:], k, v, causal=True, **x)
        return
    full = attn.reference(q, k, v, causal=True, **x)
    for mode in MODES:
        assert err(attn(q[:, :, -7:], k, v, causal=True, mode=mode, **x), full[:, :, -7:]) < 1e-10, mode


@pytest.mark.parametrize("case", IDS)
def test_pieces_with_the_state_carried_equal_one_pass(case):
    q, k, v, x = make(case, s=21)
    attn = get(case)
    whole, final = attn.reference(q, k, v, causal=True, output_final_state=True, **x)
    for mode in MODES:
        state, outs = None, []
        for a, b in [(0, 8), (8, 9), (9, 20), (20, 21)]:
            o, state = attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, mode=mode, initial_state=state,
                            output_final_state=True, **cut(attn, x, a, b))
            outs.append(o)
        assert err(torch.cat(outs, 2), whole) < 1e-10 and err(state, final) < 1e-10, mode


@pytest.mark.parametrize("case", IDS)
def test_step_by_step_decoding_equals_the_call(case):
    q, k, v, x = make(case, s=12)
    attn = get(case)
    state = attn.init_state(2, 2, 4, 3, dtype=F64)
    assert state.shape == attn.state_shape(2, 2, 4, 3) and not state.any()
    outs = []
    for t in range(12):
        o_t, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state,
                               **{n: y[:, :, 0] if n in attn.per_token_inputs() else y
                                  for n, y in cut(attn, x, t, t + 1).items()})
        outs.append(o_t)
    whole, final = attn(q, k, v, causal=True, output_final_state=True, **x)
    assert err(torch.stack(outs, 2), whole) < 1e-10 and err(state, final) < 1e-10


@pytest.mark.parametrize("case", IDS)
def test_packed_sequences_never_share_state(case):
    """cu_seqlens: each sequence equals its own run from its own initial state (states left mid-chunk and
    mid-mini-batch, so rows sit at different offsets); changing one sequence changes no other's outputs."""
    hkv = 1
    q, k, v, x = make(case, b=1, hq=2, hkv=hkv, s=24)
    cu = torch.tensor([0, 9, 10, 19, 24])
    attn = get(case)
    warm = []
    for i, n in enumerate((3, 7, 11, 2)):
        wq, wk, wv, wx = make(case, b=1, hq=2, hkv=hkv, s=n, seed=10 + i)
        warm.append(attn(wq, wk, wv, causal=True, output_final_state=True, **wx)[1])
    s0 = attn.join_states(warm)
    k2 = k.clone()
    k2[:, :, :9] += 5.0  # a different first document
    for mode in MODES:
        o, states = attn(q, k, v, causal=True, mode=mode, cu_seqlens=cu, initial_state=s0, output_final_state=True,
                         **x)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone, st_ = attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, mode=mode,
                              initial_state=s0[i:i + 1], output_final_state=True, **cut(attn, x, a, b))
            assert err(o[:, :, a:b], alone) < 1e-10, (mode, i)
            assert err(rows_of(attn, states[i:i + 1]), rows_of(attn, st_)) < 1e-10, (mode, i)
        o2 = attn(q, k2, v, causal=True, mode=mode, cu_seqlens=cu, initial_state=s0, **x)
        assert torch.equal(o2[:, :, 9:], o[:, :, 9:]), mode
        assert not torch.equal(o2[:, :, :9], o[:, :, :9])


@pytest.mark.parametrize("case", IDS)
def test_gradients_of_the_chunk_form_equal_those_of_the_definition(case):
    q, k, v, x = make(case, b=1, hq=2, hkv=1, s=9, d=3, dv=2)
    attn = get(case)
    # gates strictly inside [0, 1], so that gradcheck's perturbations stay valid inputs
    floats = {n: (t.clamp(0.05, 0.95) if n in INTERVAL else t).requires_grad_() for n, t in x.items()}
    leaves = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *floats.values())
    names = list(floats)

    def run(form, *t):
        return form(*t[:3], causal=True, **dict(zip(names, t[3:])))

    assert torch.autograd.gradcheck(lambda *t: run(lambda *a, **kw: attn(*a, mode="chunk", **kw), *t), leaves,
                                    fast_mode=True)
    grads = torch.autograd.grad(run(lambda *a, **kw: attn(*a, mode="chunk", **kw), *leaves).square().sum(), leaves)
    ref = torch.autograd.grad(run(attn.reference, *leaves).square().sum(), leaves)
    assert all(err(a, b) < 1e-10 for a, b in zip(grads, ref))


@pytest.mark.parametrize("case", IDS)
def test_low_precision_is_finite_and_close_to_the_definition(case):
    q, k, v, x = make(case, b=1, hq=2, hkv=2, s=150, d=8, dv=8)
    attn = get(case)
    rounded = [t.to(torch.bfloat16) for t in (q, k, v)]
    ref = attn.reference(*(t.double() for t in rounded), causal=True, **x)
    got = attn(*rounded, causal=True, **{n: t.float() for n, t in x.items()})
    assert got.dtype == torch.bfloat16
    got = got.double()
    assert torch.isfinite(got).all()
    # No worse than twice the unavoidable error (rounding the exact output to bf16), plus the float32 inputs.
    assert (got - ref).norm() <= 2 * (ref.to(torch.bfloat16).double() - ref).norm() + 1e-6 * ref.norm()


@settings(max_examples=10, deadline=None)
@given(case=st.sampled_from(IDS), b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 3),
       s=st.integers(1, 20), d=st.integers(1, 5), dv=st.integers(1, 4), cross=st.integers(0, 5))
def test_fuzz_chunk_and_recurrent_equal_the_definition(case, b, hkv, groups, s, d, dv, cross):
    cross = cross if CASES[case][4] else 0   # mega: self-attention only
    q, k, v, x = make(case, b=b, hq=hkv * groups, hkv=hkv, s=s, d=d, dv=dv, seed=s * 7 + d)
    sq = max(1, s - cross)
    attn = get(case)
    ref = attn.reference(q[:, :, -sq:], k, v, causal=True, **x)
    for mode in ("chunk", "recurrent"):
        assert err(attn(q[:, :, -sq:], k, v, causal=True, mode=mode, **x), ref) < 1e-10


@pytest.mark.parametrize("case", IDS)
def test_info_and_shared_bad_inputs(case):
    attn = get(case)
    info = attn.info
    assert info.family == "linear" and not info.exact
    assert info.patterns == (("causal_self",) if case == "mega" else ("causal_self", "causal_cross"))
    assert info.paper.title and info.paper.arxiv and 2019 < info.paper.year < 2026
    q, k, v, x = make(case, s=10)
    with pytest.raises(ValueError, match="noncausal_self"):
        attn(q, k, v, **x)
    with pytest.raises(ValueError, match="mode must be one of"):
        attn(q, k, v, causal=True, mode="fused", **x)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        attn(q, k, v, causal=True, initial_state=torch.zeros(2, 2, 4, 99, dtype=F64), **x)
    with pytest.raises(TypeError, match="initial_state must be a torch.Tensor"):
        attn(q, k, v, causal=True, initial_state=[0.0], **x)
    with pytest.raises(ValueError, match="rise strictly from 0 to S=10"):
        attn(q[:1], k[:1], v[:1], causal=True, cu_seqlens=torch.tensor([0, 4, 4, 10]), **cut(attn, {
            n: t[:1] if n in attn.per_token_inputs() else t for n, t in x.items()}, 0, 10))
    with pytest.raises(TypeError, match="unknown input"):
        attn(q, k, v, causal=True, gate=torch.zeros(2, 2, 10, 4), **x)
    state = attn.init_state(2, 2, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match="state must be"):
        attn.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state[:1], **_step_inputs(attn, x))
    with pytest.raises(ValueError, match="k_t"):
        attn.step(q[:, :, 0], k[:, :, :1], v[:, :, 0], state, **_step_inputs(attn, x))
    for name, t in x.items():  # every input of the wrong shape is named
        with pytest.raises(ValueError, match=name):
            attn(q, k, v, causal=True, **{**x, name: t[..., :1, :] if t.dim() > 3 else t[..., :1]})


def _step_inputs(attn, x):
    return {n: t[:, :, 0] if n in attn.per_token_inputs() else t for n, t in x.items()}


def test_bad_values_name_the_input_and_the_range():
    q, k, v, x = make("titans", s=10)
    with pytest.raises(ValueError, match="'eta' must be finite and in"):
        az.get("titans")(q, k, v, causal=True, **{**x, "eta": x["eta"] + 2})
    with pytest.raises(ValueError, match="'theta'"):
        az.get("titans")(q, k, v, causal=True, **{**x, "theta": -x["theta"] - 1})
    with pytest.raises(ValueError, match="parameter 'momentum'"):
        az.get("titans", momentum=1.5)
    q, k, v, x = make("sse-gated-top2", s=10)
    with pytest.raises(ValueError, match="log forget gates"):
        az.get("sse", states=3)(q, k, v, causal=True, **{**x, "g": -x["g"] + 1})
    with pytest.raises(ValueError, match="'active'.*<= states"):
        az.get("sse", states=3, active=4)(q, k, v, causal=True, **x)
    with pytest.raises(TypeError, match="missing required input 'router'"):
        az.get("sse")(q, k, v, causal=True)
    with pytest.raises(ValueError, match="router"):
        az.get("sse", states=3).step(q[:, :, 0], k[:, :, 0], v[:, :, 0], az.get("sse", states=3).init_state(2, 2, 4, 3),
                                     router=x["router"][:, :, 0, :2])
    q, k, v, x = make("rat", s=10)
    with pytest.raises(ValueError, match="'fk' holds forget gates"):
        az.get("rat")(q, k, v, causal=True, **{**x, "fk": x["fk"] + 1.5})
    bad = az.get("rat", chunk=5)(q, k, v, causal=True, output_final_state=True, **x)[1].clone()
    bad[..., -1] = 2.5
    with pytest.raises(ValueError, match="counts tokens per chunk row"):
        az.get("rat", chunk=5)(q, k, v, causal=True, initial_state=bad, **x)
    q, k, v, x = make("mega", s=10)
    with pytest.raises(ValueError, match="'ema_alpha' must be finite and in"):
        az.get("mega", ema_dim=3)(q, k, v, causal=True, **{**x, "ema_alpha": x["ema_alpha"] + 1.5})
    q4, _, _, _ = make("mega", hq=4, s=10)   # GQA: one EMA state per query head, so the state depends on Hq / Hkv
    assert az.get("mega", ema_dim=3).init_state(2, 2, 4, 3, groups=2).shape == (2, 2, 3 * 3 + 64 + 1, 7)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        az.get("mega", ema_dim=3)(q4, k, v, causal=True, initial_state=az.get("mega", ema_dim=3).init_state(
            2, 2, 4, 3), **x)


def test_rat_state_grows_one_row_per_chunk_and_mega_titans_sse_do_not():
    for case, rows in (("rat", lambda s: -(-s // 5)), ("mega", None), ("titans", None), ("sse-gated-top2", None)):
        attn = get(case)
        shapes = {}
        for s in (7, 23, 61):
            q, k, v, x = make(case, s=s)
            shapes[s] = attn(q, k, v, causal=True, output_final_state=True, **x)[1].shape
        if rows is None:
            assert len(set(shapes.values())) == 1, case
        else:
            assert all(shp[2] == rows(s) for s, shp in shapes.items()), shapes
