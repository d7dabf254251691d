"""The public API: registry, info, configured variants, input checks, errors naming the argument."""
from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.core.info import ALL_PATTERNS
from harness import qkv


def test_public_api_names():
    for name in ("attention", "get", "variants", "VariantInfo", "register", "Variant", "SoftmaxVariant"):
        assert hasattr(az, name)


def test_variants_listing_and_filters():
    infos = az.variants()
    names = [i.name for i in infos]
    assert len(names) == len(set(names)) >= 5
    for i in infos:
        assert i.patterns and set(i.patterns) <= set(ALL_PATTERNS)
        assert i.family and isinstance(i.exact, bool) and "torch" in i.backends
    assert all(i.family == "masks" for i in az.variants(family="masks"))
    assert all("causal_cross" in i.patterns for i in az.variants(pattern="causal_cross"))
    assert all(i.exact for i in az.variants(exact=True))
    with pytest.raises(ValueError, match="family"):
        az.variants(family="nope")
    with pytest.raises(ValueError, match="pattern"):
        az.variants(pattern="diagonal")


def test_every_variant_cites_a_paper_and_documents_parameters():
    for info in az.variants():
        assert info.paper is not None and info.paper.title and info.paper.year > 1990, info.name
        for p in info.params:
            assert p.doc, (info.name, p.name)
        d = info.as_dict()
        assert d["name"] == info.name and "patterns" in d


def test_get_returns_cached_configured_variant():
    a = az.get("sliding_window", window=8)
    assert a is az.get("sliding_window", window=8)
    assert a is not az.get("sliding_window", window=9)
    assert a.config == {"window": 8, "right": None}
    assert a.info.name == "sliding_window" and a.info.paper.title


def test_attention_one_call_equals_configured_call():
    q, k, v = qkv(1, 4, 2, 33, 33, 16)
    o1 = az.attention(q, k, v, variant="sliding_window", window=5, causal=True)
    o2 = az.get("sliding_window", window=5)(q, k, v, causal=True)
    assert torch.equal(o1, o2)


def test_full_backends_agree_with_sdpa():
    q, k, v = qkv(2, 6, 3, 40, 40, 16, dtype=torch.float32)
    full = az.get("full")
    for causal in (False, True):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal)
        for backend in ("torch", "sdpa", "auto"):
            assert (full(q, k, v, causal=causal, backend=backend) - ref).abs().max() < 1e-5


def test_bottom_right_causal_on_sdpa_and_torch():
    q, k, v = qkv(1, 2, 1, 5, 30, 8, dtype=torch.float32)
    full = az.get("full")
    a = full(q, k, v, causal=True, backend="sdpa")
    b = full(q, k, v, causal=True, backend="torch")
    r = full.reference(q, k, v, causal=True)
    assert (a - r).abs().max() < 1e-5 and (b - r).abs().max() < 1e-5
    # the last query sees every key: equals non-causal attention for that row
    assert (b[:, :, -1] - full(q, k, v, causal=False)[:, :, -1]).abs().max() < 1e-5


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0], k, v), r"q must have rank 4 \(B, Hq, Sq, D\)"),
    (lambda q, k, v: (q, k[0], v), r"k must have rank 4"),
    (lambda q, k, v: (q, k[:, :, :, :7], v), r"k must have head dim D=8"),
    (lambda q, k, v: (q, k, v[:, :, :5]), r"v must be \(B, Hkv=2, Sk=10"),
    (lambda q, k, v: (q[:1], k, v), r"batch sizes differ"),
    (lambda q, k, v: (q[:, :3], k, v), r"Hq=3 must be a multiple of key/value heads Hkv=2"),
    (lambda q, k, v: (q.int(), k, v), r"q must be float16/bfloat16/float32/float64"),
    (lambda q, k, v: (q.float(), k, v), r"share one dtype"),
    (lambda q, k, v: (q.numpy(), k, v), r"q must be a torch.Tensor"),
])
def test_bad_tensors(bad, match):
    q, k, v = qkv(2, 4, 2, 10, 10, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        az.attention(*bad(q, k, v))


def test_bad_call_arguments():
    q, k, v = qkv(1, 2, 2, 12, 10, 8)
    with pytest.raises(ValueError, match=r"causal=True needs Sq <= Sk"):
        az.attention(q, k, v, causal=True)
    q = q[:, :, :10]
    with pytest.raises(ValueError, match="unknown variant 'slidin_window'.*sliding_window"):
        az.attention(q, k, v, variant="slidin_window")
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['windw'\]"):
        az.get("sliding_window", windw=3)
    with pytest.raises(TypeError, match="unknown parameter or input 'windw'"):
        az.attention(q, k, v, variant="full", windw=3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="scale"):
            az.attention(q, k, v, scale=bad)
    with pytest.raises(TypeError, match="scale"):
        az.attention(q, k, v, scale="1")
    with pytest.raises(TypeError, match="causal must be a bool"):
        az.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        az.attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="backend='sdpa' cannot serve"):
        az.attention(q, k, v, "sliding_window", window=3, backend="sdpa")


def test_misspelled_parameter_or_input_names_it_and_suggests_the_closest():
    q, k, v = qkv(1, 2, 2, 10, 10, 8)
    ids = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(TypeError, match=r"unknown parameter or input 'windw' \(did you mean 'window'\?\)"):
        az.attention(q, k, v, variant="sliding_window", windw=4)
    with pytest.raises(TypeError, match=r"'document_id' \(did you mean 'document_ids'\?\)"):
        az.attention(q, k, v, variant="document", document_id=ids)
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['windw'\] \(did you mean 'window'\?\)"):
        az.get("sliding_window", windw=3)
    with pytest.raises(TypeError, match=r"did you mean 'right' for 'rite', 'window' for 'windw'\?"):
        az.get("sliding_window", windw=3, rite=1)
    # a parameter passed at call time is named as one, with where parameters go
    with pytest.raises(TypeError, match=r"'windw'.*did you mean 'window'.*az.get"):
        az.get("sliding_window")(q, k, v, windw=3)
    with pytest.raises(TypeError, match=r"unknown parameter or input 'zzz'; parameters: none, inputs: none"):
        az.attention(q, k, v, variant="full", zzz=1)  # nothing close: no suggestion


def test_scale_is_used():
    q, k, v = qkv(1, 1, 1, 9, 9, 8)
    full = az.get("full")
    assert (full(q, k, v, scale=0.3) - full.reference(q, k, v, scale=0.3)).abs().max() < 1e-12
    assert (full(q, k, v, scale=0.3) - full(q, k, v)).abs().max() > 1e-3


def test_dense_mask_shapes():
    sw = az.get("sliding_window", window=2)
    assert sw.dense_mask(5, 7).shape == (5, 7)
    assert sw.dense_mask(5, 7, heads=3).shape == (3, 5, 7)
    assert sw.dense_mask(5, 5, causal=True).dtype == torch.bool
    with pytest.raises(ValueError, match="sq and sk"):
        sw.dense_mask(0, 5)


def test_mask_mod_follows_flex_convention():
    sw = az.get("sliding_window", window=2, right=0)
    q_idx = torch.arange(6).view(-1, 1)
    kv_idx = torch.arange(6).view(1, -1)
    assert torch.equal(sw.mask_mod(0, 0, q_idx, kv_idx), sw.dense_mask(6, 6))
    mm = sw.mask_mod_for(2, 6, causal=True)
    assert torch.equal(mm(0, 0, torch.arange(2).view(-1, 1), kv_idx), sw.dense_mask(2, 6, causal=True))
    with pytest.raises(TypeError, match="mask_mod_for"):
        az.get("document").mask_mod(0, 0, q_idx, kv_idx)


def test_mods_are_plain_functions_flex_can_classify():
    """FlexAttention tells a mask_mod (4 positional arguments) from a score_mod (5) by counting a function's
    arguments; a bound method's `self` would count too."""
    from torch.nn.attention.flex_attention import _get_mod_type, _ModificationType

    assert _get_mod_type(az.get("sliding_window", window=2).mask_mod) == _ModificationType.MASK_MOD
    assert _get_mod_type(az.get("softcap").score_mod) == _ModificationType.SCORE_MOD
    assert _get_mod_type(az.get("sliding_window").mask_mod_for(4, 4)) == _ModificationType.MASK_MOD
    attn = az.get("sliding_window", window=3)
    assert attn.mask_mod is attn.mask_mod  # one function object: Flex's compile caches hit


def test_dense_mask_head_counts_are_checked():
    with pytest.raises(ValueError, match="kv_heads"):
        az.get("sliding_window").dense_mask(4, 4, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="heads"):
        az.get("sliding_window").dense_mask(4, 4, heads=0)
    with pytest.raises(TypeError, match=r"heads=Hq"):
        az.get("multi_scale_window").dense_mask(8, 8)  # per-head windows depend on Hq
    with pytest.raises(TypeError, match=r"kv_heads=Hkv"):
        az.get("strided_shards").dense_mask(8, 8, heads=4)  # shards follow the kv heads


def test_none_for_a_parameter_that_takes_no_none_names_it():
    with pytest.raises(TypeError, match="parameter 'cap' must be int or float, got NoneType"):
        az.get("softcap", cap=None)


def test_nn_is_reachable_from_the_top_level_as_the_design_says():
    layer = az.nn.MultiheadAttention(dim=32, heads=4, kv_heads=2, variant="sliding_window", window=4)
    y, cache = layer(torch.randn(1, 9, 32))
    assert y.shape == (1, 9, 32) and "nn" in az.__all__
