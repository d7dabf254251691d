"""Content-sparse variants on the block-sparse Triton kernels (backends/triton/selected.py).

- Everywhere (no triton needed): the tables built from a selection encode exactly the variant's dense mask (its
  selection and causality), forward and backward tiles, every pattern, GQA, batch, lengths off the tile grid, every
  block size the kernels take; only selection variants that are exact softmax over known-size blocks are served.
- With triton: the kernels on those tables under Triton's CPU interpreter (a subprocess), outputs and gradients
  against float64, and the fallback when a kernel fails.
- On CUDA: FlashAttention's rule in float16 and bfloat16, outputs and gradients.
"""
from __future__ import annotations

import textwrap
import types

import pytest
import torch
import torch.nn.functional as F
from harness import BACKWARD_FALLBACK_AND_REPORT, qkv, run_under_triton_interpreter
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo as az
from attnzoo.backends.triton import blocksparse as bs
from attnzoo.backends.triton import selected

CUDA = torch.cuda.is_available()
SERVED = {"moba": "block_size", "quest": "page", "seer": "block_size", "hip": "block_size", "longheads": "chunk_size"}


def _check_tables(name, block, top_k, b, hq, hkv, sq, sk, causal, block_m, block_n, seed=0):
    attn = az.get(name, **{SERVED[name]: block, "top_k": top_k})
    q, k, _ = qkv(b, hq, hkv, sq, sk, 16, seed=seed)
    call = attn.prepare(q, k, k, causal, None, {})
    lay = selected.selection_layout(attn.select(q, k, call), call, block_m, block_n)
    want = attn.dense_mask(sq, sk, causal=causal, q=q, k=k)
    assert torch.equal(lay.dense(sq, sk, b, hq), want)
    # full tiles carry no mask: every pair in them must be allowed
    for r in range(lay.full_num.shape[0]):
        bb, rest = divmod(r, lay.b_step) if lay.b_step else (0, r)
        h, i = divmod(rest, lay.h_step) if lay.h_step else (0, rest)
        for j in lay.full_idx[r, : int(lay.full_num[r])].tolist():
            assert want[bb, h, i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n].all()


PATTERNS = [(True, 200, 200), (False, 200, 200), (True, 70, 230), (False, 90, 170)]


@pytest.mark.parametrize("name,causal,sq,sk", [(n, *p) for n in SERVED for p in PATTERNS
                                               if n != "longheads" or p[1] == p[2]])   # longheads: self-attention
def test_tables_encode_the_selection(name, causal, sq, sk):
    for block_m, block_n in ((64, 64), (128, 64), (64, 128)):
        _check_tables(name, 64, 2, 2, 4, 2, sq, sk, causal, block_m, block_n)


@settings(max_examples=25, deadline=None)
@given(block=st.sampled_from([16, 32, 64, 128, 256]), top_k=st.integers(1, 5), sq=st.integers(1, 300),
       extra=st.integers(0, 200), causal=st.booleans(), tiles=st.sampled_from([(64, 64), (128, 64), (64, 128)]),
       seed=st.integers(0, 100))
def test_tables_fuzz(block, top_k, sq, extra, causal, tiles, seed):
    _check_tables("moba", block, top_k, 1, 2, 1, sq, sq + extra, causal, *tiles, seed=seed)


def test_per_block_selection_has_no_partial_tiles_off_the_diagonal():
    """SeerAttention selects per query block: with 64-key blocks and 64-query tiles, the kernel's work is the
    selection exactly: every tile is full except those on the causal diagonal."""
    attn = az.get("seer", block_size=64, top_k=3)
    q, k, _ = qkv(1, 2, 2, 512, 512, 16)
    call = attn.prepare(q, k, k, True, None, {})
    lay = selected.selection_layout(attn.select(q, k, call), call, 64, 64)
    assert int(lay.part_num.max()) == 1 and lay.bits.shape[0] == 2 * 8
    assert int((lay.full_num + lay.part_num).sum()) == int(attn.dense_mask(512, 512, causal=True, q=q, k=k)
                                                          .view(1, 2, 8, 64, 8, 64).any(-1).any(-2).sum())


@pytest.mark.parametrize("sq,sk,block,grouped", [(300, 300, 64, True), (128, 320, 64, True), (100, 330, 64, False),
                                                  (256, 256, 128, True), (200, 200, 32, True)])
def test_tables_read_one_row_per_query_block_when_the_selection_is_shared(sq, sk, block, grouped):
    """SeerAttention's selection is shared by aligned query blocks: the tables then read one row per block (when the
    first query starts a block) and equal the per-query tables and the dense mask."""
    import dataclasses

    attn = az.get("seer", block_size=block, top_k=3)
    q, k, _ = qkv(1, 2, 1, sq, sk, 16)
    call = attn.prepare(q, k, k, True, None, {})
    sel = attn.select(q, k, call)
    assert sel.query_block == block
    want = attn.dense_mask(sq, sk, causal=True, q=q, k=k)
    for block_m, block_n in ((64, 64), (128, 64), (64, 128)):
        assert (selected._row_group(sel, call, block_m) > 1) == grouped
        lay = selected.selection_layout(sel, call, block_m, block_n)
        per_query = selected.selection_layout(dataclasses.replace(sel, query_block=None), call, block_m, block_n)
        assert torch.equal(lay.dense(sq, sk, 1, 2), want) and torch.equal(per_query.dense(sq, sk, 1, 2), want)
        assert torch.equal(lay.bits, per_query.bits) and torch.equal(lay.full_idx, per_query.full_idx)


def _check_shared_rows(block, top_k, b, hq, hkv, sq, sk, causal, block_m, block_n, seed=0, gate=False):
    attn = az.get("seer", block_size=block, top_k=top_k)
    q, k, _ = qkv(b, hq, hkv, sq, sk, 16, seed=seed)
    inputs = {}
    if gate:
        g = torch.Generator().manual_seed(seed)
        inputs = {"gate_q": torch.randn(hq, 16, 4, generator=g, dtype=q.dtype),
                  "gate_k": torch.randn(hq, 3, 16, 4, generator=g, dtype=q.dtype)}
    call = attn.prepare(q, k, k, causal, None, inputs)
    sel = attn.select(q, k, call)
    lay = selected.shared_rows_layout(sel, call, block_m, block_n)
    assert "indices" not in vars(sel)   # the tables read the per-block rows: no (B, Hq, Sq, n) expansion
    assert sel.shape == tuple(sel.indices.shape)
    offset = sk - sq
    applies = offset % block == 0 and block % block_m == 0 and block % block_n == 0 and offset % block_n == 0
    assert (lay is not None) == applies
    if lay is None:
        return
    want = attn.dense_mask(sq, sk, causal=causal, q=q, k=k, **inputs)
    assert torch.equal(lay.dense(sq, sk, b, hq), want)
    assert lay.full_idx.shape[1] == sel.indices.shape[-1] * (block // block_n)   # lists no longer than the row
    for r in range(lay.full_num.shape[0]):   # full tiles carry no mask; lists ascend
        bb, rest = divmod(r, lay.b_step)
        h, i = divmod(rest, lay.h_step)
        listed = lay.full_idx[r, : int(lay.full_num[r])].tolist()
        assert listed == sorted(listed)
        for j in listed:
            assert want[bb, h, i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n].all()


@pytest.mark.parametrize("causal,sq,sk", [(True, 300, 300), (False, 300, 300), (True, 256, 512), (False, 256, 512),
                                          (True, 100, 228), (True, 1, 1)])
def test_per_query_block_tables_encode_the_selection(causal, sq, sk):
    """SeerAttention's tables by `shared_rows_layout` (no device sync, bit patterns shared by all rows) encode its
    dense mask, on every pattern whose query blocks line up with the kernels' tiles, and refuse the others."""
    for block, block_m, block_n in ((64, 64, 64), (128, 128, 64), (128, 128, 128), (256, 128, 64), (128, 64, 64),
                                    (64, 128, 64)):
        if block % block_m == 0:
            _check_shared_rows(block, 3, 2, 4, 2, sq, sk, causal, block_m, block_n, gate=True)
        else:
            _check_shared_rows(block, 3, 1, 2, 1, sq, sk, causal, block_m, block_n)


@settings(max_examples=25, deadline=None)
@given(block=st.sampled_from([64, 128, 256]), top_k=st.integers(1, 6), sq=st.integers(1, 700),
       extra_blocks=st.integers(0, 3), causal=st.booleans(), tiles=st.sampled_from([(64, 64), (128, 64), (128, 128)]),
       seed=st.integers(0, 100))
def test_per_query_block_tables_fuzz(block, top_k, sq, extra_blocks, causal, tiles, seed):
    _check_shared_rows(block, top_k, 1, 2, 1, sq, sq + extra_blocks * block, causal, *tiles, seed=seed)


def test_per_query_block_tables_refuse_per_query_selections():
    attn = az.get("moba", block_size=64, top_k=2)
    q, k, _ = qkv(1, 2, 1, 256, 256, 16)
    call = attn.prepare(q, k, k, True, None, {})
    assert selected.shared_rows_layout(attn.select(q, k, call), call, 64, 64) is None


def test_served_variants_and_refusals():
    from attnzoo.core.selection import SelectionVariant

    for name in SERVED:
        assert selected.serves(type(az.get(name)))
    for name in ("nsa", "landmark", "dma", "hyper", "combiner", "recycled", "biformer"):  # own forward: not plain
        assert not selected.serves(type(az.get(name)))
    q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    call = types.SimpleNamespace(shapes=types.SimpleNamespace(d=64, dv=64))
    if bs.TRITON_ERROR is None:
        assert selected.why_not(az.get("moba", block_size=128), call, q) is None
        assert selected.why_not(az.get("quest", page=16), call, q) is None
        assert "blocks of 48 keys" in selected.why_not(az.get("moba", block_size=48), call, q)
        assert "blocks of 8 keys" in selected.why_not(az.get("quest", page=8), call, q)
        topk = az.get("topk")
        assert issubclass(type(topk), SelectionVariant) and "single keys" in selected.why_not(topk, call, q)
    cpu = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    assert selected.why_not(az.get("moba"), call, cpu) is not None


def test_a_selection_that_does_not_match_the_call_is_refused():
    attn = az.get("moba", block_size=64, top_k=2)
    q, k, _ = qkv(1, 2, 1, 100, 100, 16)
    call = attn.prepare(q, k, k, True, None, {})
    sel = attn.select(q, k, call)
    other = attn.prepare(q[:, :, :50], k, k, True, None, {})
    with pytest.raises(ValueError, match="does not match the call"):
        selected.selection_layout(sel, other, 64, 64)


# the one-launch table kernel (`_shared_rows_kernel`) equals its torch definition, `shared_rows_lists`
SHARED_ROWS_KERNEL_CHECK = textwrap.dedent(r"""
    def check_shared_rows_kernel(device):
        cases = [(300, 300, 64, True, 64, 64, 3), (256, 256, 128, True, 128, 64, 2), (200, 328, 64, True, 64, 64, 4),
                 (300, 300, 64, False, 64, 64, 2), (1000, 1000, 256, True, 128, 64, 3),
                 (1000, 1000, 256, False, 128, 128, 2), (513, 513, 128, True, 128, 128, 5), (1, 1, 64, True, 64, 64, 2)]
        for sq, sk, block, causal, block_m, block_n, top_k in cases:
            attn = az.get("seer", block_size=block, top_k=top_k)
            q, k = torch.randn(2, 4, sq, 16, device=device), torch.randn(2, 2, sk, 16, device=device)
            call = attn.prepare(q, k, k, causal, None, {})
            rows = attn.select(q, k, call).indices[:, :, ::block_m]
            args = (rows, block // block_n, block_m, block_n, sk - sq, sk, causal)
            for a, b in zip(selected.shared_rows_lists(*args), selected._shared_rows_kernel_lists(*args)):
                assert torch.equal(a, b), (sq, sk, block, causal, block_m, block_n)

    check_shared_rows_kernel("cuda" if torch.cuda.is_available() else "cpu")
""")


# ---- the kernels under Triton's CPU interpreter -------------------------------------------------------------------
INTERPRETED = textwrap.dedent(r"""
    import warnings
    import torch
    import attnzoo as az
    from attnzoo.backends.triton import blocksparse as bs, selected
    warnings.simplefilter("error", RuntimeWarning)   # a fallback would hide a kernel failure
    torch.manual_seed(0)
    worst = {}

    def check(tag, attn, causal, b, hq, hkv, sq, sk, d, dv, dtype):
        q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, dv)
        ours = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        ref = [t.to(dtype).double().detach().requires_grad_() for t in (q, k, v)]
        call = attn.prepare(*ours, causal, None, {})
        o = selected.run(attn, *ours, call)
        ro = attn.reference(*ref, causal=causal)
        do = torch.randn_like(ro)
        (o.double() * do).sum().backward()
        (ro * do).sum().backward()
        for n, a, r in (("o", o, ro), *zip(("dq", "dk", "dv"), (t.grad for t in ours), (t.grad for t in ref))):
            assert torch.isfinite(a).all(), (tag, n)
            worst[f"{tag}.{n}"] = ((a.double() - r).norm() / r.norm().clamp(min=1e-30)).item()

    cases = [
        ("moba128", az.get("moba", block_size=128, top_k=2), True, 1, 4, 2, 300, 300, 16, 16),
        ("moba64.cross", az.get("moba", block_size=64, top_k=2), True, 1, 2, 1, 70, 200, 16, 16),
        ("quest32", az.get("quest", page=32, top_k=3), False, 2, 2, 2, 100, 150, 16, 16),
        ("seer64", az.get("seer", block_size=64, top_k=2), True, 1, 2, 2, 260, 260, 32, 16),
        # per-query-block tables (shared_rows_layout): Sk cut inside a tile, and a cross call aligned to the blocks
        ("seer128.noncausal", az.get("seer", block_size=128, top_k=2), False, 1, 2, 1, 300, 300, 16, 16),
        ("seer128.cross", az.get("seer", block_size=128, top_k=2), True, 1, 2, 1, 128, 384, 16, 16),
    ]
    # float16, not bfloat16: the interpreter's dot multiplies numpy arrays, and numpy has no bfloat16
    for dtype in (torch.float32, torch.float16):
        for tag, attn, causal, b, hq, hkv, sq, sk, d, dv in cases:
            if dtype == torch.float16 and tag != "moba128":
                continue
            check(f"{str(dtype)[6:]}.{tag}", attn, causal, b, hq, hkv, sq, sk, d, dv, dtype)
    FALLBACK_CASES = [(az.get("moba", block_size=64, top_k=2), True, 1, 2, 1, 100, 100, 16, 16, torch.float32)]
""") + SHARED_ROWS_KERNEL_CHECK + BACKWARD_FALLBACK_AND_REPORT


def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    run_under_triton_interpreter(INTERPRETED)


# ---- on a GPU -------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_shared_rows_kernel_on_cuda():
    namespace = {"torch": torch, "az": az, "selected": selected}
    exec(SHARED_ROWS_KERNEL_CHECK, namespace)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("gate", [False, True])
def test_seer_call_replays_from_a_cuda_graph(gate):
    """SeerAttention's path (selection, one-launch tables, kernel) has no device sync: a caller can capture the call
    in a CUDA graph, and replaying it on new contents of the same buffers gives the eager call's output."""
    torch.manual_seed(0)
    attn = az.get("seer", block_size=128, top_k=3)
    q, k, v = (torch.randn(1, 4, 1000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    inputs = {"gate_q": torch.randn(4, 64, 8, device="cuda"), "gate_k": torch.randn(4, 3, 64, 8, device="cuda")
              } if gate else {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            attn(q, k, v, causal=True, **inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn(q, k, v, causal=True, **inputs)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    # the graph owns what it reads: the shared index tensors made once are not among it (dropping them from their
    # caches and writing over the freed memory changes nothing)
    from attnzoo.core import blocks, selection
    from attnzoo.variants.sparse import seer

    for made in (blocks.steps, selection._row_bias, seer._query_rows, selected._shared_bits):
        made.cache_clear()
    torch.cuda.empty_cache()
    junk = torch.full((1 << 26,), -7, dtype=torch.int64, device="cuda")
    graph.replay()
    torch.cuda.synchronize()
    del junk
    assert torch.equal(out, attn(q, k, v, causal=True, **inputs))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,params,causal,sq,sk", [
    ("moba", {"block_size": 128, "top_k": 3}, True, 700, 700), ("moba", {"block_size": 64, "top_k": 4}, True, 300, 900),
    ("quest", {"page": 32, "top_k": 6}, False, 500, 500), ("seer", {"block_size": 64, "top_k": 4}, True, 777, 777),
    ("hip", {"block_size": 64, "top_k": 4}, True, 640, 640)])
def test_fa_rule_forward_and_backward_on_cuda(name, params, causal, sq, sk, dtype):
    attn = az.get(name, **params)
    q, k, v = (t.cuda() for t in qkv(2, 4, 2, sq, sk, 64))
    # the selection is made once, in float64, and both sides attend over it: the rule compares the attention
    mask = attn.dense_mask(sq, sk, causal=causal, q=q, k=k)
    assert next(r for r in attn.explain(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal)
                if r["chosen"])["backend"] == "triton"
    sel = attn.selection(q, k, causal=causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attn.reference(*leaves, causal=causal)
    do = torch.randn_like(ref)
    ref = [ref, *torch.autograd.grad(ref, leaves, do)]
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    g = q.shape[1] // k.shape[1]
    base = F.scaled_dot_product_attention(low[0], low[1].repeat_interleave(g, 1), low[2].repeat_interleave(g, 1),
                                          attn_mask=mask)
    base = [base, *torch.autograd.grad(base, low, do.to(dtype))]
    ours_leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    call = attn.prepare(*ours_leaves, causal, None, {})
    out = selected.attend(*ours_leaves, sel, call)
    ours = [out, *torch.autograd.grad(out, ours_leaves, do.to(dtype))]
    for n, a, b_, r in zip(("o", "dq", "dk", "dv"), ours, base, ref):
        err, base_err = (a.double() - r).abs().max().item(), (b_.double() - r).abs().max().item()
        assert err <= 2 * base_err + 1e-6, f"{n}: {err:.3e} > 2 x SDPA's {base_err:.3e}"
    # and through the public API (selection made from the low-precision inputs)
    api = attn(*(t.detach().to(dtype) for t in (q, k, v)), causal=causal)
    assert torch.isfinite(api).all()
