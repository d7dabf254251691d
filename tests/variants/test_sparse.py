"""The selection contract, proven by moba and the topk oracle: given its selection, each equals dense
softmax over exactly the selected keys; selections are per (batch, head); budgets at the edges."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from harness import PATTERN_SHAPES, qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo as az
from attnzoo.core.selection import attend_selected

CONFIGS = [("moba", {"block_size": 8, "top_k": 3}), ("moba", {"block_size": 5, "top_k": 1}),
           ("topk", {"top_k": 7}), ("quest", {"page": 6, "top_k": 3})]


def plain_softmax(q, k, v, mask, scale):
    """softmax over the allowed keys, one row at a time; rows with nothing allowed give zeros."""
    b, hq, sq, _ = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(sq):
                keys = torch.nonzero(mask[bi, h, i]).flatten()
                if len(keys):
                    w = torch.softmax(scale * k[bi, h // g, keys] @ q[bi, h, i], 0)
                    out[bi, h, i] = w @ v[bi, h // g, keys]
    return out


def moba_gate(qi, keys):
    return float(qi @ keys.mean(0))


def quest_gate(qi, keys):
    """Quest's upper bound of qi . k over the page: sum over channels of max(q min, q max)."""
    return float(torch.maximum(qi * keys.amin(0), qi * keys.amax(0)).sum())


def block_mask(q, k, causal, block, top_k, gate):
    """A block method's choice written as in the papers, query by query: the gate of each block, own block
    forced, later blocks excluded under causality, top_k blocks; then causality inside the blocks."""
    b, hq, sq, _ = q.shape
    sk, g = k.shape[2], hq // k.shape[1]
    n = math.ceil(sk / block)
    mask = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            pages = [k[bi, h // g, j * block:(j + 1) * block] for j in range(n)]
            for i in range(sq):
                pos = i + sk - sq
                own = pos // block
                cands = [j for j in range(n) if j != own and (not causal or j < own)]
                cands.sort(key=lambda j: -gate(q[bi, h, i], pages[j]))
                for j in [own] + cands[: top_k - 1]:
                    mask[bi, h, i, j * block:(j + 1) * block] = True
                if causal:
                    mask[bi, h, i, pos + 1:] = False
    return mask


def topk_mask(q, k, causal, top_k):
    b, hq, sq, _ = q.shape
    sk, g = k.shape[2], hq // k.shape[1]
    mask = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            for i in range(sq):
                visible = sk if not causal else i + sk - sq + 1
                scores = k[bi, h // g, :visible] @ q[bi, h, i]
                mask[bi, h, i, scores.topk(min(top_k, visible)).indices] = True
    return mask


def independent_mask(name, params, q, k, causal):
    if name == "moba":
        return block_mask(q, k, causal, params["block_size"], params["top_k"], moba_gate)
    if name == "quest":
        return block_mask(q, k, causal, params["page"], params["top_k"], quest_gate)
    return topk_mask(q, k, causal, params["top_k"])


@pytest.mark.parametrize("pattern", list(PATTERN_SHAPES))
@pytest.mark.parametrize("name,params", CONFIGS)
def test_fast_path_and_reference_equal_softmax_over_the_selected_keys(name, params, pattern):
    causal, sq, sk = PATTERN_SHAPES[pattern]
    q, k, v = qkv(2, 4, 2, sq, sk, 8)
    attn = az.get(name, **params)
    mask = independent_mask(name, params, q, k, causal)
    assert torch.equal(attn.dense_mask(sq, sk, causal=causal, q=q, k=k), mask)
    expected = plain_softmax(q, k, v, mask, 8 ** -0.5)
    assert (attn.reference(q, k, v, causal=causal) - expected).abs().max() < 1e-10
    assert (attn(q, k, v, causal=causal) - expected).abs().max() < 1e-10


def test_selections_are_per_batch_row_and_head_never_a_union():
    q, k, v = qkv(2, 4, 2, 64, 64, 8, seed=3)
    attn = az.get("moba", block_size=8, top_k=2)
    sel = attn.selection(q, k, causal=True)
    assert sel.indices.shape == (2, 4, 64, 2)
    mask = attn.dense_mask(64, 64, causal=True, q=q, k=k)
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])
    # Each query reads at most top_k blocks: 2 * 8 keys, not the union over heads or rows.
    assert int(mask.sum(-1).max()) <= 16


@pytest.mark.parametrize("causal,sq,sk", [(True, 50, 50), (True, 13, 50), (False, 50, 50), (False, 21, 50)])
def test_a_budget_that_selects_everything_is_full_attention(causal, sq, sk):
    q, k, v = qkv(1, 4, 2, sq, sk, 8)
    full = az.attention(q, k, v, variant="full", causal=causal)
    for attn in (az.get("moba", block_size=7, top_k=8), az.get("topk", top_k=50)):
        assert (attn(q, k, v, causal=causal) - full).abs().max() < 1e-10


def test_the_smallest_budget_still_reads_the_queries_own_block():
    q, k, v = qkv(1, 2, 1, 40, 40, 8, seed=5)
    attn = az.get("moba", block_size=8, top_k=1)
    mask = attn.dense_mask(40, 40, causal=True, q=q, k=k)
    own = torch.arange(40) // 8
    for i in range(40):
        assert mask[0, :, i].nonzero()[:, 1].div(8, rounding_mode="floor").unique().tolist() == [int(own[i])]
        assert mask[0, :, i, i].all()
    assert torch.isfinite(attn(q, k, v, causal=True)).all()


def test_gradients_flow_through_the_selected_keys_like_the_reference():
    q, k, v = qkv(1, 4, 2, 37, 37, 8, requires_grad=True)
    for attn in (az.get("moba", block_size=6, top_k=2), az.get("topk", top_k=5)):
        grads = torch.autograd.grad(attn(q, k, v, causal=True).square().sum(), (q, k, v))
        ref = torch.autograd.grad(attn.reference(q, k, v, causal=True).square().sum(), (q, k, v))
        assert all((a - b).abs().max() < 1e-10 for a, b in zip(grads, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_follows_flashattention_rule_given_the_selection(dtype):
    """Error of the gather path in `dtype` <= 2x the error of SDPA in `dtype` under the same mask."""
    q, k, v = qkv(1, 4, 2, 96, 96, 32, dtype=dtype, seed=7)
    attn = az.get("moba", block_size=16, top_k=2)
    sel = attn.selection(q, k, causal=True)
    call = attn.prepare(q, k, v, True, None, {})
    mask = attn._allowed(sel, call)
    exact = plain_softmax(q.double(), k.double(), v.double(), mask, 32 ** -0.5)
    ours = attend_selected(q, k, v, sel, call).double()
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=mask).double()
    assert (ours - exact).abs().max() <= 2 * (sdpa - exact).abs().max() + 1e-6


@settings(max_examples=20, deadline=None)
@given(hkv=st.integers(1, 2), groups=st.integers(1, 3), sk=st.integers(1, 45), cut=st.integers(0, 20),
       block=st.integers(1, 9), top_k=st.integers(1, 6), causal=st.booleans())
def test_fuzz_moba_fast_path_equals_reference(hkv, groups, sk, cut, block, top_k, causal):
    sq = max(1, sk - cut)
    q, k, v = qkv(1, hkv * groups, hkv, sq, sk, 4, seed=sk + block)
    attn = az.get("moba", block_size=block, top_k=top_k)
    assert (attn(q, k, v, causal=causal) - attn.reference(q, k, v, causal=causal)).abs().max() < 1e-10


def test_bad_budgets_and_missing_content_raise():
    q, k, v = qkv(1, 2, 1, 16, 16, 8)
    with pytest.raises(ValueError, match="'top_k' must be a positive int"):
        az.get("moba", top_k=0)
    with pytest.raises(ValueError, match="'block_size' must be a positive int"):
        az.get("moba", block_size=0)
    with pytest.raises(TypeError, match="'top_k' must be int"):
        az.get("topk", top_k=2.5)
    with pytest.raises(TypeError, match="dense_mask needs q= and k="):
        az.get("moba").dense_mask(16, 16, causal=True)
    with pytest.raises(ValueError, match="Sq=16"):
        az.get("moba").dense_mask(8, 16, q=q, k=k)
    with pytest.raises(ValueError, match="Hkv"):
        az.get("moba")(q, k[:, :, :, :4], v)
