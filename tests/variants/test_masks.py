"""The mask family: every variant exact against its dense definition on every pattern it claims."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnzoo as az
from attnzoo.core import blocks
from attnzoo.core.variant import SoftmaxVariant
from attnzoo.variants.masks import mswa_windows
from harness import PATTERN_SHAPES, assert_exact, assert_fa_rule, assert_reference_rule, qkv


def doc_ids(b, sq, sk, contiguous=True):
    g = torch.Generator().manual_seed(sk)
    rows = []
    for _ in range(b):
        cuts = sorted(torch.randint(1, sk, (3,), generator=g).tolist())
        ids = torch.zeros(sk, dtype=torch.long)
        for c in cuts:
            ids[c:] += 1
        if not contiguous:
            ids = ids[torch.randperm(sk, generator=g)]
        rows.append(ids)
    return {"document_ids": torch.stack(rows)}


def block_ids(b, sq, sk, labels=lambda ids: ids):
    """Passages of uneven lengths, the last run being the final block; `labels` relabels the runs."""
    return {"block_ids": labels(doc_ids(b, sq, sk)["document_ids"])}


# name -> list of (params, inputs(b, sq, sk) -> dict). Variants with a `grid` run the self patterns
# at S = prod(grid) (see `_lengths`); the generic head counts (2 to 9) suit every case here.
CASES = {
    "full": [({}, None)],
    "sliding_window": [({"window": 9}, None), ({"window": 5, "right": 0}, None), ({"window": 0, "right": 3}, None),
                       ({"window": 40, "right": 2}, None)],
    "sink_window": [({"sinks": 4, "window": 7}, None), ({"sinks": 0, "window": 3, "right": 0}, None),
                    ({"sinks": 20, "window": 1}, None)],
    "document": [({}, doc_ids), ({}, lambda b, sq, sk: doc_ids(b, sq, sk, contiguous=False))],
    "prefix_lm": [({"prefix": 0}, None), ({"prefix": 30}, None),
                  ({}, lambda b, sq, sk: {"prefix_lengths": torch.tensor([5, 50])[:b]})],
    "multi_scale_window": [({"window": 12}, None), ({"window": 16, "layer": 5, "num_layers": 6, "right": 0}, None)],
    "dilated_window": [({"window": 5, "dilation": 3}, None),
                       ({"window": 4, "dilation": 2, "right": 1, "offsets": "cyclic"}, None)],
    "shifted_cross_chunk": [({"chunk": 16}, None), ({"chunk": 12, "pattern": "flow"}, None)],
    "strided_shards": [({"block_size": 4, "local_blocks": 2, "vert_stride": 3}, None),
                       ({"block_size": 5, "local_blocks": 1, "vert_stride": 4, "homo_head": True, "head_offset": 1,
                         "dense_heads": 1}, None)],
    "hepos": [({"stride": 3}, None)],
    "block_rag": [({}, block_ids), ({}, lambda b, sq, sk: block_ids(b, sq, sk, labels=lambda ids: 7 * (ids % 2)))],
    "neighborhood": [({"grid": (6, 7), "kernel_size": 3, "dilation": (1, 2)}, None),
                     ({"grid": (47,), "kernel_size": 9, "dilation": 2, "is_causal": True}, None),
                     ({"grid": (3, 4, 5), "kernel_size": (3, 3, 5), "is_causal": (True, False, False)}, None)],
    "swin_window": [({"grid": (6, 8), "window": (3, 4), "shift": (1, 2)}, None),
                    ({"grid": (2, 4, 6), "window": 2, "shift": (0, 1, 1)}, None)],
    "halo": [({"grid": (6, 8), "block": (3, 2), "halo": 1}, None), ({"grid": (45,), "block": 9, "halo": 4}, None)],
    "hilo": [({"grid": (6, 8), "window": 2, "alpha": 0.5}, None),
             ({"grid": (4, 4, 6), "window": 2, "alpha": 0.25}, None)],
}


def _inputs(fn, b, sq, sk):
    return {} if fn is None else fn(b, sq, sk)


def _lengths(params, sq, sk):
    """(Sq, Sk) for a test: grid variants serve self-attention over exactly prod(grid) tokens."""
    return (math.prod(params["grid"]),) * 2 if "grid" in params else (sq, sk)


def _cases():
    for name, configs in CASES.items():
        for i, (params, inputs) in enumerate(configs):
            yield pytest.param(name, params, inputs, id=f"{name}-{i}")


def test_every_mask_variant_has_cases():
    assert {i.name for i in az.variants(family="masks")} <= set(CASES)


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
@pytest.mark.parametrize("pattern", list(PATTERN_SHAPES))
def test_torch_path_equals_reference_float64(small_blocks, name, params, inputs, pattern):
    attn = az.get(name, **params)
    causal, sq, sk = PATTERN_SHAPES[pattern]
    if pattern not in attn.info.patterns:
        q, k, v = qkv(2, 6, 2, sq, sk, 16)
        with pytest.raises(ValueError, match=pattern):
            attn(q, k, v, causal=causal, **_inputs(inputs, 2, sq, sk))
        return
    if sq == sk:
        sq, sk = _lengths(params, sq, sk)
    q, k, v = qkv(2, 6, 2, sq, sk, 16, dv=24)  # GQA 3:1 and Dv != D
    assert_exact(attn, q, k, v, causal, **_inputs(inputs, 2, sq, sk))


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_flashattention_rule(small_blocks, name, params, inputs, dtype):
    attn = az.get(name, **params)
    causal = "causal_self" in attn.info.patterns
    sq, sk = _lengths(params, 150, 150)
    q, k, v = qkv(2, 4, 2, sq, sk, 32, seed=3)
    # variants that are not a mask over the keys (HiLo's pooled heads) have no SDPA equivalent:
    # their baseline is their own definition run in dtype
    rule = assert_fa_rule if isinstance(attn, SoftmaxVariant) else assert_reference_rule
    rule(attn, q, k, v, causal, dtype, **_inputs(inputs, 2, sq, sk))


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
def test_gradients_match_reference(small_blocks, name, params, inputs):
    attn = az.get(name, **params)
    causal = "causal_self" in attn.info.patterns
    s, _ = _lengths(params, 37, 37)
    q, k, v = qkv(1, 2, 1, s, s, 8, requires_grad=True, seed=5)
    extra = _inputs(inputs, 1, s, s)
    # fast_mode checks a random directional derivative: the full Jacobian costs minutes per case here,
    # and the exact comparison with the reference's gradients below is the stronger check
    torch.autograd.gradcheck(lambda a, b, c: attn(a, b, c, causal=causal, backend="torch", **extra), (q, k, v),
                             atol=1e-8, fast_mode=True)
    grads = torch.autograd.grad(attn(q, k, v, causal=causal, **extra).square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(attn.reference(q, k, v, causal=causal, **extra).square().sum(), (q, k, v))
    for g1, g2 in zip(grads, ref_grads):
        assert (g1 - g2).abs().max() < 1e-10


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
def test_decode_single_query_smollm2_heads(name, params, inputs):
    """Sq = 1 against a long cache, 9 query / 3 kv heads as in SmolLM2."""
    attn = az.get(name, **params)
    cross = [p for p in ("causal_cross", "noncausal_cross") if p in attn.info.patterns]
    if not cross:
        pytest.skip(f"{name} serves self-attention only")
    q, k, v = qkv(2, 9, 3, 1, 700, 64, seed=7)
    assert_exact(attn, q, k, v, cross[0] == "causal_cross", **_inputs(inputs, 2, 1, 700))


@pytest.mark.parametrize("name,params,inputs", list(_cases()))
@pytest.mark.parametrize("causal", [False, True])
def test_key_intervals_agree_with_the_mask(name, params, inputs, causal):
    """Tiles from a variant's kv_intervals are exactly the tiles its mask touches (and full only where full)."""
    attn = az.get(name, **params)
    pattern = "causal_self" if causal else "noncausal_self"
    if not isinstance(attn, SoftmaxVariant) or not attn.has_mask or pattern not in attn.info.patterns:
        pytest.skip("no mask, or pattern not served")
    s, _ = _lengths(params, 83, 83)
    for sq in {s, s // 3} if "causal_cross" in attn.info.patterns else {s}:
        q, k, v = qkv(2, 6, 2, sq, s, 4)
        call = attn.prepare(q, k, v, causal, None, _inputs(inputs, 2, sq, s))
        q_pos = torch.arange(sq) + s - sq
        intervals = attn.kv_intervals(call, q_pos)
        if intervals is None:
            continue
        from_intervals = attn.block_structure(call, 8, 16)
        b, h = attn._index_grids(call)
        kv_pos = torch.arange(s).view(1, 1, 1, -1)
        from_mask = blocks.from_mask_rows(
            lambda q0, q1: attn.full_mask(call, b, h, q_pos[q0:q1].view(1, 1, -1, 1), kv_pos).expand(2, 6, q1 - q0, s),
            sq, s, 8, 16)
        assert torch.equal(from_intervals.any.expand_as(from_mask.any), from_mask.any)
        assert not (from_intervals.full.expand_as(from_mask.full) & ~from_mask.full).any()


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.integers(1, 3), sq=st.integers(1, 70),
    sk=st.integers(1, 70), d=st.sampled_from([8, 12, 16]), causal=st.booleans(),
    window=st.integers(0, 40), right=st.one_of(st.none(), st.integers(0, 10)), sinks=st.integers(0, 8),
    size=st.integers(1, 12), flag=st.booleans(),
    name=st.sampled_from(["full", "sliding_window", "sink_window", "document", "prefix_lm", "multi_scale_window",
                          "dilated_window", "shifted_cross_chunk", "strided_shards", "hepos", "block_rag"]),
)
def test_fuzz_shapes_patterns_params(b, hkv, group, sq, sk, d, causal, window, right, sinks, size, flag, name):
    from attnzoo.backends import torch_blockwise as tb

    if (causal or name == "block_rag") and sq > sk:
        sq, sk = sk, sq
    params = {"sliding_window": {"window": window, "right": right},
              "sink_window": {"sinks": sinks, "window": window, "right": right},
              "prefix_lm": {"prefix": sinks * 5},
              "multi_scale_window": {"window": window, "right": right,
                                     **({"layer": sinks % 4, "num_layers": 4} if flag else {})},
              "dilated_window": {"window": window // 4, "dilation": size % 4 + 1, "right": right,
                                 "offsets": "cyclic" if flag else None},
              "shifted_cross_chunk": {"chunk": size * 3, "pattern": "flow" if flag else "fixed"},
              "strided_shards": {"block_size": size, "local_blocks": sinks % 3 + 1, "vert_stride": window % 4 + 1,
                                 "homo_head": flag},
              "hepos": {"stride": size % 5 + 1}}.get(name, {})
    attn = az.get(name, **params)
    if name == "prefix_lm":
        causal = False
    inputs = doc_ids(b, sq, sk) if name == "document" and sk > 1 else {}
    if name == "document" and not inputs:
        inputs = {"document_ids": torch.zeros(b, sk, dtype=torch.long)}
    if name == "document" and sq > sk:
        inputs["q_document_ids"] = torch.zeros(b, sq, dtype=torch.long)
    if name == "block_rag":
        inputs = block_ids(b, sq, sk) if sk > 1 else {"block_ids": torch.zeros(b, sk, dtype=torch.long)}
    q, k, v = qkv(b, hkv * group, hkv, sq, sk, d, seed=sq * 100 + sk)
    old = tb.Q_BLOCK, tb.KV_BLOCK
    tb.Q_BLOCK, tb.KV_BLOCK = 8, 16
    try:
        assert_exact(attn, q, k, v, causal, **inputs)
    finally:
        tb.Q_BLOCK, tb.KV_BLOCK = old


def _divisors(n):
    return [x for x in range(1, n + 1) if n % x == 0]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), dims=st.integers(1, 3), name=st.sampled_from(["neighborhood", "swin_window", "halo", "hilo"]),
       hkv=st.integers(1, 2), group=st.integers(1, 3), causal=st.booleans())
def test_fuzz_grid_variants(data, dims, name, hkv, group, causal):
    from attnzoo.backends import torch_blockwise as tb

    draw = lambda lo, hi: data.draw(st.integers(lo, hi))  # noqa: E731
    if name == "hilo":
        window = draw(1, 3)
        grid = tuple(window * draw(1, 4) for _ in range(min(dims, 2)))
        params = {"grid": grid, "window": window, "alpha": data.draw(st.sampled_from([0, 0.25, 0.5, 1]))}
        causal = False
    else:
        grid = tuple(draw(1, 8 if dims < 3 else 4) for _ in range(dims))
        if name == "neighborhood":
            dilation = tuple(draw(1, n) for n in grid)
            kernel = tuple(1 + 2 * draw(0, (n // dl - 1) // 2) for n, dl in zip(grid, dilation))
            params = {"grid": grid, "kernel_size": kernel, "dilation": dilation,
                      "is_causal": tuple(data.draw(st.booleans()) for _ in grid)}
        elif name == "swin_window":
            window = tuple(data.draw(st.sampled_from(_divisors(n))) for n in grid)
            params = {"grid": grid, "window": window, "shift": tuple(draw(0, w - 1) for w in window)}
        else:
            params = {"grid": grid, "block": tuple(data.draw(st.sampled_from(_divisors(n))) for n in grid),
                      "halo": draw(0, 3)}
    s = math.prod(params["grid"])
    q, k, v = qkv(1, hkv * group, hkv, s, s, 8, seed=s)
    old = tb.Q_BLOCK, tb.KV_BLOCK
    tb.Q_BLOCK, tb.KV_BLOCK = 8, 16
    try:
        assert_exact(az.get(name, **params), q, k, v, causal)
    finally:
        tb.Q_BLOCK, tb.KV_BLOCK = old


def test_sliding_window_mask_semantics():
    m = az.get("sliding_window", window=2, right=1).dense_mask(6, 6)
    assert m[3].tolist() == [False, True, True, True, True, False]
    mc = az.get("sliding_window", window=2).dense_mask(6, 6, causal=True)
    assert mc[3].tolist() == [False, True, True, True, False, False]
    # bottom-right alignment: 2 queries over 6 keys are positions 4 and 5
    assert az.get("sliding_window", window=1).dense_mask(2, 6, causal=True).tolist() == [
        [False, False, False, True, True, False], [False, False, False, False, True, True]]


def test_sink_window_sees_sinks_and_band():
    m = az.get("sink_window", sinks=2, window=1).dense_mask(8, 8, causal=True)
    assert m[7].nonzero().flatten().tolist() == [0, 1, 6, 7]


def test_document_mask_blocks_other_documents():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = az.get("document").dense_mask(6, 6, causal=True, document_ids=ids)
    assert m.shape == (1, 1, 6, 6)
    assert m[0, 0, 4].tolist() == [False, False, True, True, True, False]


def test_document_packed_equals_each_document_alone():
    """Packed documents give the same outputs as running each document on its own."""
    lengths = [13, 40, 7, 29]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    s = sum(lengths)
    q, k, v = qkv(1, 4, 2, s, s, 16, seed=11)
    packed = az.attention(q, k, v, "document", causal=True, document_ids=ids, backend="torch")
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = az.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], "full", causal=True, backend="torch")
        assert (packed[:, :, sl] - alone).abs().max() < 1e-12
        start += n


def test_prefix_lm_semantics():
    m = az.get("prefix_lm", prefix=3).dense_mask(5, 5)
    assert m.tolist() == [[True, True, True, False, False]] * 3 + [
        [True, True, True, True, False], [True, True, True, True, True]]
    with pytest.raises(ValueError, match="causal_self"):
        q, k, v = qkv(1, 1, 1, 4, 4, 8)
        az.get("prefix_lm", prefix=2)(q, k, v, causal=True)


def test_empty_rows_give_zeros_not_nan(small_blocks):
    # window 0 one-sided with Sq > Sk non-causal: early queries sit before every key
    attn = az.get("sliding_window", window=0, right=0)
    q, k, v = qkv(1, 2, 2, 50, 20, 8)
    out = attn(q, k, v, causal=False, backend="torch")
    ref = attn.reference(q, k, v, causal=False)
    assert torch.isfinite(out).all()
    assert (out[:, :, :30] == 0).all() and (ref[:, :, :30] == 0).all()
    assert (out - ref).abs().max() < 1e-12
    ids = torch.tensor([[0] * 10 + [1] * 10])
    out = az.attention(q[:, :, :20], k, v, "document", document_ids=ids,
                       q_document_ids=torch.full((1, 20), 5), backend="torch")
    assert (out == 0).all()


@pytest.mark.parametrize("name,params", [("sliding_window", {"window": -1}), ("sliding_window", {"window": 1.5}),
                                         ("sink_window", {"sinks": -2}), ("prefix_lm", {"prefix": "3"}),
                                         ("sliding_window", {"window": True})])
def test_bad_parameters(name, params):
    with pytest.raises((ValueError, TypeError), match=list(params)[0]):
        az.get(name, **params)


def test_bad_inputs():
    q, k, v = qkv(2, 2, 2, 10, 10, 8)
    with pytest.raises(TypeError, match="document_ids"):
        az.attention(q, k, v, "document")
    with pytest.raises(ValueError, match=r"document_ids.*\(2, 10\)"):
        az.attention(q, k, v, "document", document_ids=torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        az.attention(q, k, v, "document", document_ids=torch.zeros(2, 10))
    with pytest.raises(TypeError, match="unknown parameter or input 'document_ids'"):
        az.attention(q, k, v, "sliding_window", window=3, document_ids=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="q_document_ids"):
        az.attention(qkv(2, 2, 2, 12, 10, 8)[0], k, v, "document", document_ids=torch.zeros(2, 10, dtype=torch.long))


# ---- the rest of the family: known answers -------------------------------------------------------


def _rows_of(mask, row):
    return mask[row].nonzero().flatten().tolist()


def test_multi_scale_window_allocation_follows_mswa():
    assert mswa_windows(64, 8) == [16, 16, 32, 32, 64, 64, 128, 128]  # head groups: w/4, w/2, w, 2w
    assert mswa_windows(64, 4, layer=0, num_layers=8) == [4, 8, 16, 32]  # shallow layers: base w/4
    assert mswa_windows(64, 4, layer=7, num_layers=8) == [32, 64, 128, 256]  # deep layers: base 2w
    m = az.get("multi_scale_window", window=8).dense_mask(20, 20, causal=True, heads=4)
    assert [len(_rows_of(m[h], 19)) for h in range(4)] == [3, 5, 9, 17]


def test_multi_scale_window_with_equal_windows_is_sliding_window(small_blocks):
    q, k, v = qkv(2, 6, 2, 50, 50, 16)
    for causal in (False, True):
        msw = az.attention(q, k, v, "multi_scale_window", windows=[7] * 6, right=2, causal=causal)
        swa = az.attention(q, k, v, "sliding_window", window=7, right=2, causal=causal)
        assert (msw - swa).abs().max() < 1e-12


def test_multi_scale_window_explicit_windows_per_head(small_blocks):
    windows = [0, 3, 11, 40, 2, 5]
    q, k, v = qkv(1, 6, 2, 30, 61, 16)
    attn = az.get("multi_scale_window", windows=windows, right=0)
    assert_exact(attn, q, k, v, True)
    out = attn(q, k, v, causal=True)
    for h, w in enumerate(windows):
        alone = az.attention(q, k, v, "sliding_window", window=w, right=0, causal=True)
        assert (out[:, h] - alone[:, h]).abs().max() < 1e-12
    with pytest.raises(ValueError, match=r"windows.*Hq=9"):
        attn(*qkv(1, 9, 3, 30, 61, 16), causal=True)


def test_dilated_window_semantics(small_blocks):
    m = az.get("dilated_window", window=2, dilation=3, right=1).dense_mask(20, 20)
    assert _rows_of(m, 10) == [4, 7, 10, 13]
    assert _rows_of(az.get("dilated_window", window=2, dilation=3).dense_mask(20, 20, causal=True), 10) == [4, 7, 10]
    # 'cyclic' offsets: the dilation heads together cover the whole span, each key once
    heads = az.get("dilated_window", window=2, dilation=3, offsets="cyclic").dense_mask(30, 30, causal=True, heads=3)
    assert heads.sum(0).max() == 1 and _rows_of(heads.any(0), 20) == list(range(12, 21))
    q, k, v = qkv(1, 4, 2, 40, 40, 8)
    one = az.attention(q, k, v, "dilated_window", window=5, dilation=1, causal=True)
    assert (one - az.attention(q, k, v, "sliding_window", window=5, causal=True)).abs().max() < 1e-12


def test_shifted_cross_chunk_patterns():
    fixed = az.get("shifted_cross_chunk", chunk=4).dense_mask(12, 12, heads=2)
    assert _rows_of(fixed[0], 5) == [4, 5, 6, 7]  # unshifted heads: the query's own chunk
    assert _rows_of(fixed[1], 5) == [2, 3, 4, 5]  # shifted heads: half of the previous chunk, half of this one
    assert _rows_of(fixed[1], 1) == [0, 1]  # the first chunk's shifted window starts at 0 (no wrap-around)
    flow = az.get("shifted_cross_chunk", chunk=8, pattern="flow").dense_mask(24, 24, heads=4)
    assert [_rows_of(flow[h], 17)[0] for h in range(4)] == [16, 14, 12, 10]


def _dkernel_mask(heads, kv_heads, s, block, local, stride, homo=False, offset=0, dense=0):
    """S2-Attention's layout built the way DKernel builds it: a block mask, blown up, times causal."""
    nb = -(-s // block)
    qb, kb = torch.arange(nb).view(-1, 1), torch.arange(nb).view(1, -1)
    step = max(1, stride // heads)
    rows = []
    for h in range(heads):
        kvh = h // (heads // kv_heads)
        vertical = (kb + (0 if homo else kvh * step) + offset) % stride == 0
        block_mask = (qb - kb < local) | vertical | (kvh >= kv_heads - dense)
        rows.append((qb >= kb) & block_mask)
    dense_mask = torch.stack(rows).repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :s, :s]
    return dense_mask & torch.ones(s, s, dtype=torch.bool).tril()


@pytest.mark.parametrize("kw", [dict(block=4, local=2, stride=3), dict(block=3, local=1, stride=8),
                                dict(block=5, local=3, stride=2, homo=True, offset=1),
                                dict(block=2, local=1, stride=4, dense=1)])
def test_strided_shards_match_dkernel_layout(kw):
    attn = az.get("strided_shards", block_size=kw["block"], local_blocks=kw["local"], vert_stride=kw["stride"],
                  homo_head=kw.get("homo", False), head_offset=kw.get("offset", 0), dense_heads=kw.get("dense", 0))
    q, k, v = qkv(1, 8, 4, 37, 37, 4)
    call = attn.prepare(q, k, v, True, None, {})
    b, h = attn._index_grids(call)
    ours = attn.full_mask(call, b, h, torch.arange(37).view(1, 1, -1, 1), torch.arange(37).view(1, 1, 1, -1))[0]
    assert torch.equal(ours.expand(8, 37, 37), _dkernel_mask(8, 4, 37, kw["block"], kw["local"], kw["stride"],
                                                            kw.get("homo", False), kw.get("offset", 0),
                                                            kw.get("dense", 0)))


def test_hepos_heads_cover_every_key_once():
    m = az.get("hepos", stride=4).dense_mask(5, 23, heads=8)
    assert torch.equal(m[:4].sum(0), torch.ones(5, 23, dtype=torch.long))
    assert _rows_of(m[6], 0) == [2, 6, 10, 14, 18, 22]


def test_block_rag_blocks_and_final_block(small_blocks):
    ids = torch.tensor([[4, 4, 4, 9, 9, 2, 2, 2]])
    m = az.get("block_rag").dense_mask(8, 8, causal=True, block_ids=ids)[0, 0]
    assert _rows_of(m, 4) == [3, 4]  # a passage sees only itself, causally
    assert _rows_of(m, 6) == list(range(7))  # the final block sees everything before it
    # packed passages give the same outputs as each passage alone; the final block sees it all
    lengths = [13, 20, 9, 16]
    ids = torch.cat([torch.full((n,), i % 2) for i, n in enumerate(lengths)]).unsqueeze(0)
    s = sum(lengths)
    q, k, v = qkv(1, 4, 2, s, s, 16, seed=2)
    packed = az.attention(q, k, v, "block_rag", causal=True, block_ids=ids)
    start = 0
    for n in lengths[:-1]:
        sl = slice(start, start + n)
        alone = az.attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], "full", causal=True)
        assert (packed[:, :, sl] - alone).abs().max() < 1e-12
        start += n
    assert (packed[:, :, start:] - az.attention(q, k, v, "full", causal=True)[:, :, start:]).abs().max() < 1e-12
    # decoding: the generated tokens extend the final block
    dec = az.attention(q[:, :, -1:], k, v, "block_rag", causal=True, block_ids=ids)
    assert (dec - az.attention(q[:, :, -1:], k, v, "full", causal=True)).abs().max() < 1e-12


def test_neighborhood_natten_windows():
    m = az.get("neighborhood", grid=(10,), kernel_size=3).dense_mask(10, 10)
    assert _rows_of(m, 0) == [0, 1, 2] and _rows_of(m, 5) == [4, 5, 6] and _rows_of(m, 9) == [7, 8, 9]
    d = az.get("neighborhood", grid=(10,), kernel_size=3, dilation=2).dense_mask(10, 10)
    assert _rows_of(d, 0) == [0, 2, 4] and _rows_of(d, 1) == [1, 3, 5] and _rows_of(d, 9) == [5, 7, 9]
    c = az.get("neighborhood", grid=(10,), kernel_size=3, is_causal=True).dense_mask(10, 10)
    assert _rows_of(c, 0) == [0] and _rows_of(c, 5) == [3, 4, 5]
    # 2-D: a corner token sees the 3 x 3 block in the corner
    m2 = az.get("neighborhood", grid=(4, 5), kernel_size=3).dense_mask(20, 20)
    assert _rows_of(m2, 0) == [0, 1, 2, 5, 6, 7, 10, 11, 12]


def test_neighborhood_with_the_whole_grid_as_kernel_is_full_attention(small_blocks):
    attn = az.get("neighborhood", grid=(5, 7), kernel_size=(5, 7))
    assert attn.dense_mask(35, 35).all()
    q, k, v = qkv(2, 4, 2, 35, 35, 16)
    for causal in (False, True):
        assert (attn(q, k, v, causal=causal) - az.attention(q, k, v, "full", causal=causal)).abs().max() < 1e-12


@pytest.mark.parametrize("grid,kernel,dilation,causal", [((11,), 5, 2, False), ((6, 7), (3, 5), (2, 1), (False, True)),
                                                         ((4, 3, 5), 3, 1, (True, False, True))])
def test_neighborhood_matches_natten_when_installed(grid, kernel, dilation, causal):
    flex_backend = pytest.importorskip("natten.backends.flex")
    from torch.nn.attention.flex_attention import create_mask

    n, s = len(grid), math.prod(grid)
    per_dim = lambda x: tuple(x) if isinstance(x, tuple) else (x,) * n  # noqa: E731
    block_mask = flex_backend.get_na_flex_mask("cpu", n, grid, per_dim(kernel), (1,) * n, per_dim(dilation),
                                               per_dim(causal))
    theirs = create_mask(block_mask.mask_mod, 1, 1, s, s, device="cpu")[0, 0]
    ours = az.get("neighborhood", grid=grid, kernel_size=kernel, dilation=dilation, is_causal=causal)
    assert torch.equal(ours.dense_mask(s, s), theirs)


def _swin_by_rolling(grid, window, shift):
    """Swin's shifted-window mask built as Swin builds it: roll the grid by -shift, label the regions the roll
    brought together, cut windows; then map it back to the original token order."""
    size = math.prod(grid)
    pos = torch.arange(size).view(grid)
    region = torch.zeros(grid, dtype=torch.long)
    for dim, (n, w, s) in enumerate(zip(grid, window, shift)):
        idx = torch.arange(n)
        label = (idx >= n - w).long() + (idx >= n - s).long() if s else torch.zeros(n, dtype=torch.long)
        region = region * 3 + label.view([-1 if i == dim else 1 for i in range(len(grid))])
    rolled = torch.roll(pos, shifts=[-s for s in shift], dims=list(range(len(grid))))
    win = torch.zeros(grid, dtype=torch.long)
    for dim, (n, w) in enumerate(zip(grid, window)):
        win = win * (n // w) + (torch.arange(n) // w).view([-1 if i == dim else 1 for i in range(len(grid))])
    group = (win * 3 ** len(grid) + region).flatten()  # of each rolled slot
    original = rolled.flatten()  # the token sitting in each rolled slot
    label = torch.empty(size, dtype=torch.long)
    label[original] = group
    return label.view(-1, 1) == label.view(1, -1)


@pytest.mark.parametrize("grid,window,shift", [((8,), (4,), (2,)), ((6, 8), (3, 4), (1, 2)), ((6, 6), (3, 3), (0, 0)),
                                               ((4, 6, 6), (2, 3, 3), (1, 1, 2))])
def test_swin_window_is_swins_cyclic_shift_mask(grid, window, shift):
    s = math.prod(grid)
    ours = az.get("swin_window", grid=grid, window=window, shift=shift).dense_mask(s, s)
    assert torch.equal(ours, _swin_by_rolling(grid, window, shift))


def test_swin_window_without_shift_is_block_diagonal(small_blocks):
    m = az.get("swin_window", grid=(24,), window=6).dense_mask(24, 24)
    assert torch.equal(m, torch.block_diag(*[torch.ones(6, 6, dtype=torch.bool)] * 4))
    q, k, v = qkv(1, 4, 2, 24, 24, 8)
    ids = (torch.arange(24) // 6).unsqueeze(0)
    out = az.attention(q, k, v, "swin_window", grid=(24,), window=6)
    assert (out - az.attention(q, k, v, "document", document_ids=ids)).abs().max() < 1e-12


def test_halo_blocks_see_their_halo():
    m = az.get("halo", grid=(12,), block=4, halo=1).dense_mask(12, 12)
    assert _rows_of(m, 5) == [3, 4, 5, 6, 7, 8] and _rows_of(m, 0) == [0, 1, 2, 3, 4]
    m2 = az.get("halo", grid=(4, 4), block=2, halo=1).dense_mask(16, 16)
    assert _rows_of(m2, 0) == [0, 1, 2, 4, 5, 6, 8, 9, 10]


def test_hilo_extremes(small_blocks):
    q, k, v = qkv(2, 4, 2, 48, 48, 16)
    local = az.attention(q, k, v, "hilo", grid=(6, 8), window=2, alpha=0)
    assert (local - az.attention(q, k, v, "swin_window", grid=(6, 8), window=2)).abs().max() < 1e-12
    pooled_k = k.view(2, 2, 3, 2, 4, 2, 16).mean((3, 5)).reshape(2, 2, 12, 16)
    pooled_v = v.view(2, 2, 3, 2, 4, 2, 16).mean((3, 5)).reshape(2, 2, 12, 16)
    lofi = az.attention(q, k, v, "hilo", grid=(6, 8), window=2, alpha=1)
    assert (lofi - az.attention(q, pooled_k, pooled_v, "full")).abs().max() < 1e-12
    # alpha splits the heads: the first ones Hi-Fi, the last int(H * alpha) Lo-Fi
    half = az.attention(q, k, v, "hilo", grid=(6, 8), window=2, alpha=0.5)
    assert (half[:, :2] - local[:, :2]).abs().max() < 1e-12 and (half[:, 2:] - lofi[:, 2:]).abs().max() < 1e-12


@pytest.mark.parametrize("name,params,match", [
    ("neighborhood", {"grid": (8,), "kernel_size": 4}, "kernel_size"),
    ("neighborhood", {"grid": (8, 8), "kernel_size": (3, 3, 3)}, "kernel_size"),
    ("neighborhood", {"grid": (8,), "kernel_size": 5, "dilation": 2}, "kernel_size"),
    ("neighborhood", {"grid": None}, "grid"),
    ("neighborhood", {"grid": (8, 0)}, "grid"),
    ("swin_window", {"grid": (6, 8), "window": 4}, "window"),
    ("swin_window", {"grid": (8,), "window": 4, "shift": 4}, "shift"),
    ("halo", {"grid": (8,), "block": 3}, "block"),
    ("hilo", {"grid": (6, 8), "window": 4}, "window"),
    ("hilo", {"grid": (6, 8), "alpha": 1.5}, "alpha"),
    ("multi_scale_window", {"windows": [3, -1]}, "windows"),
    ("multi_scale_window", {"layer": 2}, "num_layers"),
    ("multi_scale_window", {"layer": 4, "num_layers": 4}, "layer"),
    ("dilated_window", {"dilation": 0}, "dilation"),
    ("dilated_window", {"dilation": 2, "offsets": [0, 2]}, "offsets"),
    ("shifted_cross_chunk", {"pattern": "zigzag"}, "pattern"),
    ("strided_shards", {"vert_stride": 0}, "vert_stride"),
    ("hepos", {"stride": 0}, "stride"),
])
def test_bad_parameters_of_the_new_variants(name, params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        az.get(name, **params)


def test_bad_calls_name_the_argument():
    q, k, v = qkv(1, 2, 1, 30, 30, 8)
    with pytest.raises(ValueError, match=r"grid \(5, 5\).*S"):
        az.attention(q, k, v, "neighborhood", grid=(5, 5), kernel_size=3)
    with pytest.raises(ValueError, match=r"grid \(4, 4\)"):
        az.attention(q, k, v, "hilo", grid=(4, 4))
    with pytest.raises(ValueError, match="noncausal_cross"):
        az.attention(q[:, :, :10], k, v, "swin_window", grid=(5, 6), window=(5, 3))
    with pytest.raises(ValueError, match="dense_heads"):
        az.attention(q, k, v, "strided_shards", dense_heads=2)
    with pytest.raises(ValueError, match=r"offsets.*Hq=2"):
        az.attention(q, k, v, "dilated_window", offsets=[0, 1, 1])
    with pytest.raises(ValueError, match="block_ids"):
        az.attention(qkv(1, 2, 1, 40, 30, 8)[0], k, v, "block_rag", block_ids=torch.zeros(1, 30, dtype=torch.long))


# ---- per-head masks: head counts, GQA, standalone mask functions ---------------------------------

PER_HEAD = [("multi_scale_window", {"window": 12}), ("multi_scale_window", {"windows": [3, 0, 9, 30, 5, 1]}),
            ("dilated_window", {"window": 4, "dilation": 3, "offsets": "cyclic"}),
            ("dilated_window", {"window": 3, "dilation": 2, "offsets": [1, 0, 1, 1, 0, 0]}),
            ("shifted_cross_chunk", {"chunk": 16}), ("shifted_cross_chunk", {"chunk": 12, "pattern": "flow"}),
            ("strided_shards", {"block_size": 4, "local_blocks": 2, "vert_stride": 3}),
            ("strided_shards", {"block_size": 5, "local_blocks": 1, "vert_stride": 4, "dense_heads": 1}),
            ("strided_shards", {"block_size": 4, "local_blocks": 2, "vert_stride": 3, "vert_position": "absolute"}),
            ("hepos", {"stride": 4})]


@pytest.mark.parametrize("name,params", PER_HEAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PER_HEAD)])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_mask_under_gqa_is_the_mask_the_call_uses(name, params, causal):
    """SDPA under dense_mask(heads=Hq, kv_heads=Hkv) equals the variant's own output, 6 query heads on 2 kv heads."""
    attn = az.get(name, **params)
    q, k, v = qkv(1, 6, 2, 53, 53, 8, seed=4)
    mask = attn.dense_mask(53, 53, causal=causal, heads=6, kv_heads=2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                            attn_mask=mask)
    sdpa = torch.where(mask.any(-1, keepdim=True), sdpa, torch.zeros_like(sdpa))
    assert (sdpa - attn(q, k, v, causal=causal)).abs().max() < 1e-12
    mm = attn.mask_mod_for(53, 53, causal=causal, heads=6, kv_heads=2)
    h, qi, ki = torch.arange(6).view(-1, 1, 1), torch.arange(53).view(1, -1, 1), torch.arange(53).view(1, 1, -1)
    assert torch.equal(mm(torch.tensor(0), h, qi, ki).expand_as(mask), mask)


def test_strided_shards_gqa_matches_dkernel():
    """Hq=4 on Hkv=2: shards follow the kv heads (DKernel's layout), in dense_mask, mask_mod_for and the output."""
    attn = az.get("strided_shards", block_size=4, local_blocks=2, vert_stride=4)
    mask = attn.dense_mask(37, 37, causal=True, heads=4, kv_heads=2)
    assert torch.equal(mask, _dkernel_mask(4, 2, 37, 4, 2, 4))
    q, k, v = qkv(1, 4, 2, 37, 37, 8, seed=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=mask)
    assert (sdpa - attn(q, k, v, causal=True)).abs().max() < 1e-12


def _dkernel_relative_mask(heads, kv_heads, sq, sk, block, local, stride, dense=0):
    """DKernel's bidirectional default (vert_position_type='relative'), written as its get_sparse_attn_mask does:
    blocks beyond the local band, counted from 0 at its edges, kept every `stride`; the same for all sparse heads."""
    qb = (torch.arange(sq) + sk - sq).view(-1, 1) // block  # bottom-right aligned queries, as everywhere in attnzoo
    kb = torch.arange(sk).view(1, -1) // block
    left = (qb - kb - local + 1).clamp(min=0)
    right = (kb - qb - local + 1).clamp(min=0)
    sparse = (left + right) % stride == 0
    return torch.stack([sparse | (h // (heads // kv_heads) >= kv_heads - dense) for h in range(heads)])


@pytest.mark.parametrize("kw", [dict(block=4, local=2, stride=3), dict(block=3, local=1, stride=5, dense=1),
                                dict(block=5, local=3, stride=2)])
@pytest.mark.parametrize("sq", [41, 13])
def test_strided_shards_bidirectional_uses_dkernels_relative_positions(kw, sq):
    attn = az.get("strided_shards", block_size=kw["block"], local_blocks=kw["local"], vert_stride=kw["stride"],
                  dense_heads=kw.get("dense", 0))
    ours = attn.dense_mask(sq, 41, heads=4, kv_heads=2)
    assert torch.equal(ours, _dkernel_relative_mask(4, 2, sq, 41, kw["block"], kw["local"], kw["stride"],
                                                    kw.get("dense", 0)))
    q, k, v = qkv(1, 4, 2, sq, 41, 8, seed=2)
    assert_exact(attn, q, k, v, False)
    # absolute positions stay available for non-causal calls
    absolute = az.get("strided_shards", block_size=kw["block"], local_blocks=kw["local"], vert_stride=kw["stride"],
                      vert_position="absolute")
    m = absolute.dense_mask(41, 41, heads=4, kv_heads=4)
    kb = torch.arange(41) // kw["block"]
    shard = (kb + max(1, kw["stride"] // 4)) % kw["stride"] == 0  # head 1's shard, from key position 0
    assert torch.equal(m[1, 40], shard | ((40 // kw["block"] - kb).abs() < kw["local"]))


def _chunks_by_shifting(s, chunk, shifts):
    """Shifted chunk attention built by rolling the sequence: a head shifted by `sh` cuts it into chunks at
    -sh + n chunk (LongLoRA's S2-Attn, rolling q, k and v together); a token attends within its chunk."""
    out = []
    for sh in shifts:
        group = (torch.arange(s) + sh) // chunk
        out.append(group.view(-1, 1) == group.view(1, -1))
    return torch.stack(out)


def test_shifted_cross_chunk_queries_see_themselves_and_their_shifted_chunk():
    attn = az.get("shifted_cross_chunk", chunk=8)
    causal = attn.dense_mask(32, 32, causal=True, heads=2)
    assert causal.diagonal(dim1=1, dim2=2).all()  # every query sees itself
    assert _rows_of(causal[1], 15) == [12, 13, 14, 15]  # the shifted chunk [12, 20) holds query 15
    assert _rows_of(causal[1], 9) == [4, 5, 6, 7, 8, 9]  # front half: half the previous chunk, as before
    shifts = [0, 4]
    tril = torch.ones(32, 32, dtype=torch.bool).tril()
    assert torch.equal(causal, _chunks_by_shifting(32, 8, shifts) & tril)
    assert torch.equal(attn.dense_mask(32, 32, heads=2), _chunks_by_shifting(32, 8, shifts))
    flow = az.get("shifted_cross_chunk", chunk=12, pattern="flow")
    assert torch.equal(flow.dense_mask(50, 50, heads=4), _chunks_by_shifting(50, 12, [0, 3, 6, 9]))
    q, k, v = qkv(1, 4, 2, 50, 50, 8, seed=3)
    out = flow(q, k, v, causal=True)
    assert torch.isfinite(out).all() and (out.abs().sum(-1) > 0).all()  # no row is left empty


def test_per_head_mask_functions_serve_every_head_and_any_device():
    """Standalone mask_mod of head-count-free masks serves any head; mask_mod_for builds per-head tables on
    the device of the indices it is given (here 'meta', standing in for CUDA)."""
    h = torch.arange(8).view(-1, 1, 1)
    qi, ki = torch.arange(30).view(1, -1, 1), torch.arange(30).view(1, 1, -1)
    hepos = az.get("hepos", stride=4)
    assert torch.equal(hepos.mask_mod(torch.tensor(0), h, qi, ki).expand(8, 30, 30), hepos.dense_mask(30, 30, heads=8))
    dil = az.get("dilated_window", window=3, dilation=4, offsets="cyclic")
    assert torch.equal(dil.mask_mod(torch.tensor(0), h, qi, ki), dil.dense_mask(30, 30, heads=8))
    listed = az.get("multi_scale_window", windows=[1, 2, 3, 4])
    assert torch.equal(listed.mask_mod(0, h[:4], qi, ki), listed.dense_mask(30, 30, heads=4))
    for name, params in [("multi_scale_window", {"window": 8}), ("shifted_cross_chunk", {"chunk": 8}),
                         ("strided_shards", {"block_size": 4})]:
        mm = az.get(name, **params).mask_mod_for(30, 30, causal=True, heads=8, kv_heads=4)
        out = mm(torch.tensor(0, device="meta"), h.to("meta"), qi.to("meta"), ki.to("meta"))
        assert out.device.type == "meta" and out.shape == (8, 30, 30)


@pytest.mark.parametrize("name,params", [("multi_scale_window", {"window": 8}), ("shifted_cross_chunk", {}),
                                         ("strided_shards", {}), ("document", {})])
def test_standalone_mask_mod_refuses_what_it_cannot_know(name, params):
    with pytest.raises(TypeError, match="mask_mod_for"):
        az.get(name, **params).mask_mod


# ---- FlexAttention users: create_block_mask / flex_attention with our mask functions ---------------

FLEX_MASKS = [  # (name, params, grid-free): standalone mask_mod, S = 256 (whole CPU Flex tiles)
    ("full", {}), ("sliding_window", {"window": 20}), ("sliding_window", {"window": 7, "right": 3}),
    ("sink_window", {"sinks": 4, "window": 30}), ("prefix_lm", {"prefix": 50}),
    ("multi_scale_window", {"windows": [4, 9, 17, 40]}), ("dilated_window", {"window": 6, "dilation": 3,
                                                                             "offsets": "cyclic"}),
    ("hepos", {"stride": 3}), ("strided_shards", {"block_size": 16, "homo_head": True, "vert_position": "absolute"}),
    ("neighborhood", {"grid": (16, 16), "kernel_size": 5}), ("swin_window", {"grid": (16, 16), "window": 4,
                                                                              "shift": 2}),
    ("halo", {"grid": (16, 16), "block": 4, "halo": 2}),
]


def _flex_causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize("name,params", FLEX_MASKS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FLEX_MASKS)])
def test_flex_users_standalone_mask_mod(name, params):
    from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention

    attn = az.get(name, **params)
    causal = name != "prefix_lm"  # prefix_lm is non-causal only (causality is built in)
    q, k, v = qkv(1, 4, 4, 256, 256, 16, dtype=torch.float32, seed=6)
    mask_mod = and_masks(_flex_causal, attn.mask_mod) if causal else attn.mask_mod
    block_mask = create_block_mask(mask_mod, 1, 4, 256, 256, device="cpu")
    out = flex_attention(q, k, v, block_mask=block_mask)
    ref = attn.reference(q.double(), k.double(), v.double(), causal=causal)
    assert (out.double() - ref).abs().max() < 2e-5


FLEX_MASKS_FOR = [  # masks that need the call's sizes or inputs: mask_mod_for
    ("multi_scale_window", {"window": 24}, {}), ("shifted_cross_chunk", {"chunk": 64}, {}),
    ("shifted_cross_chunk", {"chunk": 48, "pattern": "flow"}, {}), ("strided_shards", {"block_size": 16}, {}),
    ("strided_shards", {"block_size": 16, "dense_heads": 1}, {}),
    ("document", {}, {"document_ids": torch.tensor([[0] * 100 + [1] * 60 + [2] * 96])}),
    ("block_rag", {}, {"block_ids": torch.tensor([[5] * 70 + [3] * 90 + [5] * 96])}),
]


@pytest.mark.parametrize("name,params,inputs", FLEX_MASKS_FOR,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(FLEX_MASKS_FOR)])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_users_mask_mod_for(name, params, inputs, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attn = az.get(name, **params)
    q, k, v = qkv(1, 4, 2, 256, 256, 16, dtype=torch.float32, seed=7)
    mm = attn.mask_mod_for(256, 256, causal=causal, heads=4, kv_heads=2, **inputs)
    block_mask = create_block_mask(mm, 1, 4, 256, 256, device="cpu")
    out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    ref = attn.reference(q.double(), k.double(), v.double(), causal=causal, **inputs)
    assert (out.double() - ref).abs().max() < 2e-5


def test_window_convention_against_hugging_face():
    """window=w - 1 is Hugging Face's causal sliding_window=w (w keys, the query included); bidirectionally HF's
    |q - kv| <= w is window=w, right=w. The HF masks are evaluated from transformers' own mask functions."""
    masking = pytest.importorskip("transformers.masking_utils")
    qi, ki = torch.arange(40).view(-1, 1), torch.arange(40).view(1, -1)
    for w in (1, 4, 9):
        hf_causal = masking.sliding_window_causal_mask_function(w)(0, 0, qi, ki)
        assert torch.equal(az.get("sliding_window", window=w - 1).dense_mask(40, 40, causal=True), hf_causal)
        assert int(hf_causal[30].sum()) == w
        hf_bi = masking.sliding_window_bidirectional_mask_function(w)(0, 0, qi, ki)
        assert torch.equal(az.get("sliding_window", window=w, right=w).dense_mask(40, 40), hf_bi)
    for name in ("sliding_window", "sink_window", "multi_scale_window", "dilated_window"):
        info = az.get(name).info
        assert "w + 1" in info.summary + info.param("window").doc + info.param("window").expected, name


@pytest.mark.parametrize("sq,sk,block,stride", [(10, 1, 1, 1), (70, 5, 2, 3), (40, 17, 4, 2)])
def test_strided_shards_relative_positions_with_more_queries_than_keys(sq, sk, block, stride):
    """Non-causal Sq > Sk puts queries before key 0: their relative shards reach further than Sk blocks."""
    q, k, v = qkv(1, 2, 1, sq, sk, 8)
    attn = az.get("strided_shards", block_size=block, local_blocks=1, vert_stride=stride)
    assert_exact(attn, q, k, v, False)
