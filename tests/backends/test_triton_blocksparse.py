"""The `triton` backend's block-sparse kernels for mask variants (backends/triton/blocksparse.py).

- Everywhere (no triton needed): the kernel tables (`Layout`) encode exactly the variant's dense mask, for every
  pattern, GQA, per-head and per-batch masks and lengths off the tile grid; they are reused while the inputs are
  unchanged; a failing kernel falls back with a warning.
- With triton: the kernels themselves under Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess, small
  tiles and shapes), forward and gradients against float64, fully masked rows, the backward's fallback.
- On CUDA: FlashAttention's rule in float16 and bfloat16, outputs and gradients, for every structured variant.
"""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from harness import BACKWARD_FALLBACK_AND_REPORT, qkv, run_under_triton_interpreter
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import attnzoo as az
from attnzoo.backends.triton import blocksparse as bs

CUDA = torch.cuda.is_available()


def _docs(b, s, cuts):
    ids = torch.zeros(b, s, dtype=torch.long)
    for c in cuts:
        ids[:, c:] += 1
    return ids


# name, params, inputs(b, sq, sk), heads (hq, hkv)
CASES = [
    ("sliding_window", {"window": 21}, lambda b, sq, sk: {}, (4, 2)),
    ("sink_window", {"sinks": 3, "window": 17}, lambda b, sq, sk: {}, (2, 1)),
    ("prefix_lm", {"prefix": 37}, lambda b, sq, sk: {}, (2, 2)),
    ("document", {}, lambda b, sq, sk: {"document_ids": _docs(b, sk, (23, 60, 61))}, (2, 1)),
    ("document", {}, lambda b, sq, sk: {"document_ids": _docs(b, sk, (40,)) % 2 * torch.arange(sk).lt(80)}, (2, 2)),
    ("block_rag", {}, lambda b, sq, sk: {"block_ids": _docs(b, sk, (30, 70))}, (2, 1)),
    ("dilated_window", {"window": 6, "dilation": 3, "offsets": "cyclic"}, lambda b, sq, sk: {}, (3, 1)),
    ("multi_scale_window", {"window": 24}, lambda b, sq, sk: {}, (4, 2)),
    ("strided_shards", {"block_size": 8, "local_blocks": 2, "vert_stride": 3}, lambda b, sq, sk: {}, (4, 2)),
]


def _patterns(name):
    if name == "prefix_lm":
        return [(False, 101, 101), (False, 45, 101)]
    if name == "block_rag":
        return [(True, 101, 101), (False, 45, 101)]
    return [(True, 101, 101), (False, 101, 101), (True, 45, 101), (False, 45, 101)]


@pytest.mark.parametrize("name,params,inputs,heads", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_layout_encodes_the_dense_mask(name, params, inputs, heads):
    attn = az.get(name, **params)
    hq, hkv = heads
    for causal, sq, sk in _patterns(name):
        given = inputs(2, sq, sk)
        if name == "document" and sq != sk:
            given["q_document_ids"] = given["document_ids"][:, -sq:].clone()
        q, k, v = qkv(2, hq, hkv, sq, sk, 8)
        call = attn.prepare(q, k, v, causal, None, given)
        lay = bs.build_layout(attn, call, 32, 32)
        lay_kv = bs.build_layout(attn, call, 16, 64)
        want = attn.dense_mask(sq, sk, causal=causal, heads=hq, kv_heads=hkv, batch=2, **given)
        want = want.expand(2, hq, sq, sk)
        assert torch.equal(lay.dense(sq, sk, 2, hq), want), (causal, sq, sk)
        assert torch.equal(lay_kv.dense(sq, sk, 2, hq), want), (causal, sq, sk)


def test_neighborhood_2d_layout():
    attn = az.get("neighborhood", grid=(12, 20), kernel_size=(5, 7), dilation=(1, 2))
    q, k, v = qkv(1, 2, 2, 240, 240, 8)
    call = attn.prepare(q, k, v, False, None, {})
    lay = bs.build_layout(attn, call, 64, 32)
    assert torch.equal(lay.dense(240, 240, 1, 2), attn.dense_mask(240, 240, heads=2).expand(1, 2, 240, 240))


def test_layout_is_reused_until_the_ids_change():
    attn = az.get("document")
    q, k, v = qkv(1, 2, 2, 200, 200, 8)
    ids = _docs(1, 200, (90,))
    call = lambda: attn.prepare(q, k, v, True, None, {"document_ids": ids})
    first = bs.layout_for(attn, call(), 128, 64)
    built = bs.stats["layouts_built"]
    assert bs.layout_for(attn, call(), 128, 64) is first and bs.stats["layouts_built"] == built
    ids[0, 50:90] = 1
    assert bs.layout_for(attn, call(), 128, 64) is not first and bs.stats["layouts_built"] == built + 1


def test_refusals_name_the_reason():
    q = torch.randn(1, 2, 16, 8)
    call = az.get("sliding_window").prepare(q, q, q, True, None, {})
    assert ("CUDA" if bs.TRITON_ERROR is None else "triton is not importable") in bs.why_not(
        az.get("sliding_window"), call, q)
    assert "score modifier" in bs.why_not(az.get("alibi", heads=2), call, q)
    assert not bs.serves(type(az.get("full"))) and bs.serves(type(az.get("document")))


def test_a_failing_kernel_falls_back_with_a_warning(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(bs, "forward", boom)
    monkeypatch.setattr(bs, "_warned", set())
    attn = az.get("sliding_window", window=9)
    q, k, v = qkv(1, 2, 1, 50, 50, 8)
    call = attn.prepare(q, k, v, True, None, {})
    with pytest.warns(RuntimeWarning, match="simulated kernel failure"):
        out = bs.run(attn, q, k, v, call)
    assert (out - attn.reference(q, k, v, causal=True)).abs().max() < 1e-10


# ---- the kernels under Triton's CPU interpreter -------------------------------------------------------------------
INTERPRETED = textwrap.dedent(r"""
    import warnings
    import torch, torch.nn.functional as F
    import attnzoo as az
    from attnzoo.backends.triton import blocksparse as bs
    bs.BLOCK_M, bs.BLOCK_N = 32, 64  # two bit words a tile row
    bs.BWD_BLOCK_M, bs.BWD_BLOCK_N = 16, 64
    bs.OPTIONS["tma_min_rows"] = 0  # tensor descriptors also for these small calls (head dims 16 and 32)
    warnings.simplefilter("error", RuntimeWarning)   # a fallback would hide a kernel failure
    torch.manual_seed(0)
    worst = {}

    def ids(b, s, cuts):
        t = torch.zeros(b, s, dtype=torch.long)
        for c in cuts:
            t[:, c:] += 1
        return t

    def check(tag, attn, causal, b, hq, hkv, sq, sk, d, dv, inputs, dtype):
        q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, dv)
        ours = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        ref = [t.to(dtype).double().detach().requires_grad_() for t in (q, k, v)]
        call = attn.prepare(*ours, causal, None, inputs)
        o = bs.run(attn, *ours, call)
        ro = attn.reference(*ref, causal=causal, **inputs)
        do = torch.randn_like(ro)
        (o.double() * do).sum().backward()
        (ro * do).sum().backward()
        for n, a, r in (("o", o, ro), *zip(("dq", "dk", "dv"), (t.grad for t in ours), (t.grad for t in ref))):
            assert torch.isfinite(a).all(), (tag, n)
            err = ((a.double() - r).norm() / r.norm().clamp(min=1e-30)).item()
            worst[f"{tag}.{n}"] = err
        return o, ours

    cases = [
        ("window", az.get("sliding_window", window=21), True, 1, 4, 2, 70, 70, 24, 16, {}),
        ("window.cross", az.get("sliding_window", window=21, right=5), False, 1, 2, 1, 30, 75, 16, 16, {}),
        ("sinks.cross", az.get("sink_window", sinks=3, window=10), True, 1, 2, 1, 40, 90, 16, 16, {}),
        ("document", az.get("document"), True, 2, 2, 1, 75, 75, 16, 16, {"document_ids": ids(2, 75, (20, 50))}),
        ("dilated", az.get("dilated_window", window=6, dilation=3, offsets="cyclic"), False, 1, 3, 1, 50, 50, 16, 16, {}),
        ("prefix", az.get("prefix_lm", prefix=33), False, 1, 1, 1, 64, 64, 32, 32, {}),
        # one lattice for all heads: the residue classes run as bands on strided views (lengths not multiples of 3)
        ("lattice", az.get("dilated_window", window=6, dilation=3), True, 2, 4, 2, 50, 50, 16, 16, {}),
        ("lattice.cross", az.get("dilated_window", window=4, dilation=3, right=2, offsets=[1, 1]), False, 1, 2, 1,
         37, 71, 16, 32, {}),
        # lengths that 3 divides: all classes in one launch, as a class dimension of (B, 3, H, S / 3, D) views
        ("lattice.folded", az.get("dilated_window", window=5, dilation=3), True, 2, 4, 2, 48, 48, 16, 16, {}),
    ]
    for tag, attn, causal, b, hq, hkv, sq, sk, d, dv, inputs in cases:
        lattice = bs._lattice(attn, attn.prepare(torch.zeros(b, hq, sq, d), torch.zeros(b, hkv, sk, d),
                                                 torch.zeros(b, hkv, sk, dv), causal, None, inputs))
        assert (lattice is not None) == tag.startswith("lattice") and (tag != "lattice.folded" or lattice[1]), tag
    # float16, not bfloat16: the interpreter's dot multiplies numpy arrays, and numpy has no bfloat16
    for dtype in (torch.float32, torch.float16):
        for tag, attn, causal, b, hq, hkv, sq, sk, d, dv, inputs in cases:
            if dtype == torch.float16 and tag not in ("document", "lattice"):
                continue
            check(f"{str(dtype)[6:]}.{tag}", attn, causal, b, hq, hkv, sq, sk, d, dv, inputs, dtype)
    # the forward reads K/V through tensor descriptors where head dims are powers of two (16 and 32 above; 24 is
    # not): the same cases through pointers
    bs.OPTIONS["tma"] = False
    for tag, attn, causal, b, hq, hkv, sq, sk, d, dv, inputs in cases[1:]:
        check(f"float32.pointers.{tag}", attn, causal, b, hq, hkv, sq, sk, d, dv, inputs, torch.float32)
    bs.OPTIONS["tma"] = True
    # dK/dV split over work items: every key block with more than one query tile adds its chunks into float32
    # accumulators (on the GPU only blocks far above the mean are split, e.g. sinks)
    bs.DKDV_CHUNK = 1
    for tag, attn, causal, b, hq, hkv, sq, sk, d, dv, inputs in cases:
        check(f"float32.split.{tag}", attn, causal, b, hq, hkv, sq, sk, d, dv, inputs, torch.float32)
    bs.DKDV_CHUNK = None

    # inputs that are slices of longer sequences (not dense): the gradients must not be written with their strides
    q, k, v = torch.randn(1, 4, 90, 16), torch.randn(1, 2, 120, 16), torch.randn(1, 2, 120, 16)
    attn = az.get("sliding_window", window=13)
    sl = [t[:, :, 10:80].detach().requires_grad_() for t in (q, k, v)]
    sliced = [t[:, :, 5:75] for t in sl]                     # views with the strides of the 90/120-token tensors
    o = bs.run(attn, *sliced, attn.prepare(*sliced, True, None, {}))
    ref_in = [t.detach().double().clone().requires_grad_() for t in sliced]
    ro = attn.reference(*ref_in, causal=True)
    do = torch.randn_like(ro)
    (o.double() * do).sum().backward()
    (ro * do).sum().backward()
    for n, a, r in (("o", o, ro), *zip(("dq", "dk", "dv"), (t.grad[:, :, 5:75] for t in sl), (t.grad for t in ref_in))):
        worst["float32.sliced." + n] = ((a.double() - r).norm() / r.norm()).item()
    assert all((t.grad[:, :, :5] == 0).all() and (t.grad[:, :, 75:] == 0).all() for t in sl)

    # rows with no allowed key: queries of a document absent from the keys give zeros and zero gradients
    kd = ids(1, 64, (32,))
    qd = torch.full((1, 20), 7)
    qd[:, :5] = 1
    o, ours = check("float32.empty_rows", az.get("document"), False, 1, 2, 2, 20, 64, 16, 16,
                    {"document_ids": kd, "q_document_ids": qd}, torch.float32)
    assert (o[:, :, 5:] == 0).all() and (ours[0].grad[:, :, 5:] == 0).all()

    # a backward kernel failure falls back (right gradients, one warning): BACKWARD_FALLBACK_AND_REPORT, through
    # BlockSparse and through LatticeSparse (folded residue classes)
    FALLBACK_CASES = [(az.get("sliding_window", window=9), True, 1, 2, 1, 40, 40, 16, 16, {}, torch.float32),
                      (az.get("dilated_window", window=5, dilation=3), True, 1, 2, 1, 48, 48, 16, 16, {}, torch.float32)]
""") + BACKWARD_FALLBACK_AND_REPORT


def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    run_under_triton_interpreter(INTERPRETED)


# ---- on a GPU -------------------------------------------------------------------------------------------------------
GPU_CASES = [
    ("sliding_window", {"window": 100}, {}), ("sink_window", {"sinks": 4, "window": 100}, {}),
    ("prefix_lm", {"prefix": 150}, {}), ("document", {}, "docs"), ("block_rag", {}, "blocks"),
    ("dilated_window", {"window": 32, "dilation": 4, "offsets": "cyclic"}, {}),
    ("dilated_window", {"window": 32, "dilation": 3}, {}),  # one lattice: bands on the residue classes
    ("dilated_window", {"window": 32, "dilation": 4}, {}),  # 4 divides the length: the classes in one launch
    ("neighborhood", {"grid": (20, 25), "kernel_size": 7}, {}), ("neighborhood", {"grid": (500,), "kernel_size": 63}, {}),
]


def _low_precision_grads(attn, q, k, v, causal, dtype, inputs, do):
    """SDPA with the variant's dense mask in `dtype`: FlashAttention's baseline for outputs and gradients."""
    mask = attn.dense_mask(q.shape[2], k.shape[2], causal=causal, heads=q.shape[1], kv_heads=k.shape[1],
                           batch=q.shape[0], device=q.device, **inputs).expand(q.shape[0], q.shape[1], q.shape[2], -1)
    g = q.shape[1] // k.shape[1]
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    o = F.scaled_dot_product_attention(leaves[0], leaves[1].repeat_interleave(g, 1), leaves[2].repeat_interleave(g, 1),
                                       attn_mask=mask)
    o = torch.where(mask.any(-1, keepdim=True), o, 0)
    return [o, *torch.autograd.grad(o, leaves, do.to(dtype))]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,params,inputs", GPU_CASES)
def test_fa_rule_forward_and_backward_on_cuda(name, params, inputs, dtype, monkeypatch):
    monkeypatch.setitem(bs.OPTIONS, "tma_min_rows", 0)  # tensor descriptors also for these small calls
    attn = az.get(name, **params)
    s = 500
    given = {"docs": {"document_ids": _docs(2, s, (70, 200, 201, 330)).cuda()},
             "blocks": {"block_ids": _docs(2, s, (100, 250, 400)).cuda()}}[inputs] if inputs else {}
    causal = name not in ("prefix_lm", "neighborhood")
    q, k, v = (t.cuda() for t in qkv(2, 4, 2, s, s, 64))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attn.reference(*leaves, causal=causal, **given)
    do = torch.randn_like(ref)
    ref = [ref, *torch.autograd.grad(ref, leaves, do)]
    base = _low_precision_grads(attn, q, k, v, causal, dtype, given, do)
    ours_leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = attn(*ours_leaves, causal=causal, backend="triton", **given)
    ours = [out, *torch.autograd.grad(out, ours_leaves, do.to(dtype))]
    for n, a, b_, r in zip(("o", "dq", "dk", "dv"), ours, base, ref):
        err, base_err = (a.double() - r).abs().max().item(), (b_.double() - r).abs().max().item()
        assert err <= 2 * base_err + 1e-6, f"{n}: {err:.3e} > 2 x SDPA's {base_err:.3e}"


def test_auto_takes_the_kernels_only_where_measured_faster(monkeypatch):
    from attnzoo.backends.triton import speed

    attn = az.get("neighborhood", grid=(64, 128), kernel_size=7)
    q = torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16, device="meta")
    call = attn.prepare(q, q, q, False, None, {})
    key = speed.shape_class(attn, call, q)
    assert key == ("neighborhood_2d", "<=16k", "d<=128", "bfloat16")
    monkeypatch.setattr(speed, "MEASURED", {key: (1.3, 1.2)})
    assert speed.auto_why_not(attn, call, q) is None
    monkeypatch.setattr(speed, "MEASURED", {key: (1.3, 0.9)})
    assert speed.auto_why_not(attn, call, q) is None  # no gradients recorded: the forward's ratio applies
    assert "0.90x (fwd+bwd)" in speed.auto_why_not(attn, call, q.requires_grad_())
    monkeypatch.setattr(speed, "MEASURED", {key: (1.0, 1.2)})
    assert "1.00x (fwd)" in speed.auto_why_not(attn, call, q.detach())
    cyclic = az.get("dilated_window", window=32, dilation=4, offsets="cyclic")
    c_call = cyclic.prepare(q.detach(), q.detach(), q.detach(), True, None, {})
    assert speed.shape_class(cyclic, c_call, q)[0] == "dilated_window_per_head"
    plain = az.get("dilated_window", window=32, dilation=4)
    assert speed.shape_class(plain, plain.prepare(q.detach(), q.detach(), q.detach(), True, None, {}), q)[0] == \
        "dilated_window"
    monkeypatch.setattr(speed, "MEASURED", {})
    assert "not measured" in speed.auto_why_not(attn, call, q)


@settings(max_examples=25, deadline=None)
@given(case=st.sampled_from(CASES), b=st.integers(1, 2), sq=st.integers(1, 90), sk=st.integers(1, 90),
       causal=st.booleans(), tiles=st.sampled_from([(16, 32), (32, 64), (64, 32)]))
def test_layout_fuzz(case, b, sq, sk, causal, tiles):
    """Any lengths (also shorter than a tile), patterns, batch sizes and tile shapes: the tables encode the mask."""
    name, params, inputs, (hq, hkv) = case
    attn = az.get(name, **params)
    assume(not ((causal or name == "block_rag") and sq > sk) and not (name == "prefix_lm" and causal))
    given_ = inputs(b, sq, sk)
    if name == "document":
        given_ = {"document_ids": _docs(b, sk, (sk // 3,))}
        if sq != sk:
            given_["q_document_ids"] = _docs(b, sq, (sq // 2,))
    if name == "block_rag":
        given_ = {"block_ids": _docs(b, sk, (sk // 2,))}
    q, k, v = qkv(b, hq, hkv, sq, sk, 8)
    lay = bs.build_layout(attn, attn.prepare(q, k, v, causal, None, given_), *tiles)
    want = attn.dense_mask(sq, sk, causal=causal, heads=hq, kv_heads=hkv, batch=b, **given_).expand(b, hq, sq, sk)
    assert torch.equal(lay.dense(sq, sk, b, hq), want)


@settings(max_examples=40, deadline=None)
@given(sq=st.integers(1, 70), sk=st.integers(1, 70), causal=st.booleans(), window=st.integers(0, 6),
       right=st.sampled_from([None, 0, 2]), dilation=st.integers(2, 4), offset=st.integers(0, 3),
       tiles=st.sampled_from([(16, 32), (32, 64)]))
def test_dilated_lattice_classes_encode_the_dense_mask(sq, sk, causal, window, right, dilation, offset, tiles):
    """A dilated window on one lattice runs as bands on strided residue classes: the classes' tables, put back at
    their rows and columns, give exactly the variant's mask (and each key class serves exactly one query class)."""
    sq = min(sq, sk) if causal else sq
    attn = az.get("dilated_window", window=window, dilation=dilation, right=right, offsets=[offset % dilation] * 2)
    q, k, v = qkv(1, 2, 1, sq, sk, 8)
    call = attn.prepare(q, k, v, causal, None, {})
    lattice = bs._lattice(attn, call)
    if sq < dilation or sk < dilation:
        assert lattice is None
        return
    d, folded, parts = lattice
    assert d == dilation and sorted(r for _, r, _, _ in parts) == list(range(d))
    assert folded == (all(a == r for a, r, _, _ in parts) and sq % d == 0 and sk % d == 0)
    got = torch.zeros(1, 2, sq, sk, dtype=torch.bool)
    for a, r, band, sub in parts:
        sub_mask = bs.build_layout(band, sub, *tiles).dense(sub.shapes.sq, sub.shapes.sk, 1, 2)
        got[:, :, a::d, r::d] = sub_mask
    want = attn.dense_mask(sq, sk, causal=causal, heads=2, kv_heads=1, batch=1).expand(1, 2, sq, sk)
    assert torch.equal(got, want)


def test_per_head_lattices_take_the_general_tables():
    q, k, v = qkv(1, 3, 1, 40, 40, 8)
    cyclic = az.get("dilated_window", window=4, dilation=3, offsets="cyclic")
    assert bs._lattice(cyclic, cyclic.prepare(q, k, v, True, None, {})) is None
    plain = az.get("dilated_window", window=4, dilation=1)
    assert bs._lattice(plain, plain.prepare(q, k, v, True, None, {})) is None
