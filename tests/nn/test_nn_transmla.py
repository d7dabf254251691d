"""TransMLA: GQA layers rewritten as MLA. At full rank with RoPE kept on every key channel the MLA
form is the GQA function (float64 on attnzoo modules, <= 1e-4 on SmolLM2's logits over real text);
RoRoPE's change of basis commutes with RoPE; the latent is the PCA optimum; sizes; bad input. Also
MLA's `rope_head_dim` and `head_dim=0`, which the conversion needs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnzoo.nn as azn
from attnzoo.nn.transmla import TRANSMLA_PAPER, mla_from_gqa, rorope_rotation, transmla
from nn_refs import F64, decode_pieces, lin, max_err, randn, rope

TOL = 1e-10


def gqa(dim=24, heads=6, kv_heads=3, head_dim=4, seed=0, **kw):
    torch.manual_seed(seed)
    return azn.GroupedQueryAttention(dim, heads, kv_heads, head_dim=head_dim, **kw).to(F64)


def test_rope_head_dim_rotates_each_chunk_as_a_head_of_that_dim():
    torch.manual_seed(0)
    m = azn.MLA(24, 3, kv_rank=5, rope_dim=12, head_dim=0, v_head_dim=4, rope_head_dim=4, latent_norm=False).to(F64)
    x = randn(2, 7, 24)
    y, cache = m(x)
    pos = torch.arange(7)
    k_r = lin(m.wkv_a, x)[..., 5:]
    want = torch.cat([rope(k_r[..., i:i + 4], pos, m.rope_base) for i in (0, 4, 8)], dim=-1)
    assert max_err(cache.k_rope, want) <= TOL
    assert max_err(m(x, absorb=True)[0], y) <= TOL
    assert max_err(decode_pieces(m, x, [3, 4])[0], y) <= TOL


@pytest.mark.parametrize("kwargs,match", [
    (dict(rope_head_dim=5), "rope_head_dim"),
    (dict(rope_head_dim=6), "rope_head_dim"),
    (dict(head_dim=0), "v_head_dim"),
    (dict(head_dim=-1), "head_dim"),
])
def test_mla_conversion_options_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        azn.MLA(24, 3, kv_rank=5, rope_dim=8, **kwargs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv_heads=st.sampled_from([1, 2, 3]), group=st.integers(1, 3), head_half=st.integers(1, 3),
       s=st.integers(1, 9), causal=st.booleans())
def test_full_rank_with_rope_on_every_key_channel_is_the_gqa_layer(kv_heads, group, head_half, s, causal):
    d = 2 * head_half
    g = gqa(16, kv_heads * group, kv_heads, d, rope_base=500.0)
    x = randn(2, s, 16, seed=1)
    m = mla_from_gqa(g, randn(3, 11, 16, seed=2), rope_heads=kv_heads)
    want, _ = g(x, causal=causal)
    assert m.kv_rank == kv_heads * d and m.rope_dim == kv_heads * d and m.head_dim == 0
    assert m.kv_elements_per_token() == g.kv_elements_per_token()
    assert max_err(m(x, causal=causal)[0], want) <= TOL
    assert max_err(m(x, causal=causal, absorb=True)[0], want) <= TOL


def test_decoding_with_the_latent_cache_equals_the_gqa_layer():
    g = gqa()
    m = mla_from_gqa(g, randn(2, 9, 24, seed=3), rope_heads=3)
    x = randn(2, 10, 24, seed=4)
    assert max_err(decode_pieces(m, x, [4, 5, 6])[0], g(x)[0]) <= TOL


def test_rorope_rotation_is_orthogonal_commutes_with_rope_and_sorts_energy():
    kv_heads, d = 3, 8
    keys = randn(50, kv_heads * d, seed=5) * torch.tensor([3.0] * d + [0.5] * d + [1.0] * d, dtype=F64)
    rot = rorope_rotation(keys, kv_heads, d)
    assert max_err(rot @ rot.T, torch.eye(kv_heads * d, dtype=F64)) <= TOL
    pos = torch.arange(50)

    def per_head_rope(k):
        return torch.cat([rope(k[:, i * d:(i + 1) * d], pos) for i in range(kv_heads)], dim=-1)

    assert max_err(per_head_rope(keys @ rot.T), per_head_rope(keys) @ rot.T) <= TOL
    rotated = (keys @ rot.T).view(50, kv_heads, 2, d // 2).pow(2).sum(dim=(0, 2))  # (slot, frequency)
    assert (rotated[:-1] >= rotated[1:] - 1e-9).all()  # strongest slot first, every frequency


def test_keys_shared_up_to_scale_need_one_rope_slot():
    g = gqa()
    with torch.no_grad():
        w = g.k_proj.weight.view(3, 4, 24)
        w[1], w[2] = 0.5 * w[0], -2.0 * w[0]
    x = randn(2, 8, 24, seed=6)
    m = mla_from_gqa(g, x, rope_heads=1)
    assert m.rope_dim == 4 and m.head_dim == 8 and m.kv_rank == 8 + 12
    assert max_err(m(x)[0], g(x)[0]) <= TOL


def test_latent_is_the_pca_optimum_of_the_values():
    g = gqa()
    x = randn(40, 24, seed=7)
    v = lin(g.v_proj, x)
    eig = torch.linalg.eigvalsh(v.T @ v).flip(0)
    for rank in (12, 8, 3):
        m = mla_from_gqa(g, x, kv_rank=rank, rope_heads=3)
        ukv = m.wkv_b.weight.view(6, 4, rank)  # head_dim 0: all value rows
        rebuilt = torch.cat([lin(m.wkv_a, x)[:, :rank] @ ukv[h].T for h in (0, 2, 4)], dim=-1)
        assert abs((rebuilt - v).pow(2).sum().item() - eig[rank:].sum().item()) <= 1e-8 * eig.sum().item()


def test_sizes_and_paper():
    g = gqa(576, 9, 3, 64)
    x = randn(80, 576, seed=8)
    m = mla_from_gqa(g, x, kv_rank=128, rope_heads=1)
    assert (m.kv_rank, m.rope_dim, m.head_dim, m.v_head_dim) == (128, 64, 128, 64)
    assert m.kv_bytes_per_token(torch.bfloat16) == (128 + 64) * 2
    assert m.num_parameters() == 576 * 9 * 192 + 576 * (128 + 64) + 128 * 9 * 192 + 576 * 576
    assert TRANSMLA_PAPER.title.startswith("TransMLA") and TRANSMLA_PAPER.arxiv == "2502.07864"


def test_bad_input():
    g = gqa()
    x = randn(20, 24)
    with pytest.raises(ValueError, match="kv_rank must be <= 20"):
        mla_from_gqa(g, x, kv_rank=21, rope_heads=1)
    with pytest.raises(ValueError, match="rope_heads must be <= kv_heads=3"):
        mla_from_gqa(g, x, rope_heads=4)
    with pytest.raises(ValueError, match="calibration"):
        mla_from_gqa(g, randn(20, 12))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        mla_from_gqa(azn.MoHAttention(24, 6, 2, 2, head_dim=4), x)
    with pytest.raises(ValueError, match="RoPE, no biases"):
        mla_from_gqa(gqa(bias=True), x)
    wq, wk = g.q_proj.weight, g.k_proj.weight
    with pytest.raises(ValueError, match="heads % kv_heads"):
        transmla(wq, wk, wk, g.o_proj.weight, 5, 3, x)
    with pytest.raises(ValueError, match="expected wq"):
        transmla(wq[:12], wk, wk, g.o_proj.weight, 6, 3, x)
    with pytest.raises(TypeError, match="calibration"):
        transmla(wq, wk, wk, g.o_proj.weight, 6, 3, [[0.0]])


def test_smollm2_at_full_rank_gives_the_same_logits_on_real_text(smollm2):
    from attnzoo.lab import transmla as lab
    from attnzoo.models import real_token_ids

    lm, tok = smollm2
    ids = real_token_ids(tok, 48, "heldout")
    want = lab.logits(lm, ids)
    inputs = lab.attention_inputs(lm, real_token_ids(tok, 48, "train"))
    kv_heads = lm.config.num_key_value_heads
    converted = lab.convert(lm, inputs, kv_rank=None, rope_heads=kv_heads)
    assert converted[0].kv_elements_per_token() == 2 * kv_heads * lm.config.head_dim
    with lab.swapped(lm, converted):
        got = lab.logits(lm, ids)
    assert all(isinstance(layer.self_attn, torch.nn.Module) and not isinstance(layer.self_attn, lab.ConvertedAttention)
               for layer in lm.model.layers)  # restored
    assert (got - want).abs().max().item() <= 1e-4


def test_converted_attention_refuses_what_it_does_not_run():
    from attnzoo.lab.transmla import ConvertedAttention

    m = ConvertedAttention(mla_from_gqa(gqa(), randn(20, 24), rope_heads=3))
    x = randn(1, 4, 24)
    assert max_err(m(x)[0], m.mla(x)[0]) == 0
    with pytest.raises(ValueError, match="use_cache=False"):
        m(x, cache=object())
    with pytest.raises(ValueError, match="attention mask"):
        m(x, attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_mean_pooled_baseline_is_a_model_with_fewer_kv_heads_and_is_restored(smollm2):
    from attnzoo.lab import transmla as lab
    from attnzoo.models import real_token_ids

    lm, tok = smollm2
    assert lab.pooled_kv_heads(3) == [1] and lab.pooled_kv_heads(8) == [4, 2, 1]
    k_proj = lm.model.layers[0].self_attn.k_proj
    before = k_proj.weight.detach().clone()
    ids = real_token_ids(tok, 8, "heldout")
    with lab.pooled(lm, 1):
        heads = k_proj.weight.view(3, 64, -1)
        assert max_err(heads[0], heads[2]) == 0 and max_err(heads[0], before.view(3, 64, -1).mean(0)) <= 1e-6
        assert lab.logits(lm, ids).isfinite().all()
    assert torch.equal(k_proj.weight, before)
