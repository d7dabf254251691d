"""expected_attention: scores against the definition written with explicit rotation matrices."""
from __future__ import annotations

import types

import pytest
import torch
from kv_tiny import greedy_logits, ids, make_step, tiny_llama

import attnzoo.kv as kv
from attnzoo.kv.retrieval import rotary_module, rotate


@pytest.fixture(scope="module")
def llama64():
    return tiny_llama().double()


def _definition(model, step, future):
    """Per query head: pre-RoPE query mean and covariance; the rotation matrix averaged over the next
    `future` positions, built by rotating each basis vector; E[exp(scale q.k)] per key, normalised."""
    rotary = rotary_module(model)
    b, hq, sq, d = step.query.shape
    plain = rotate(rotary, step.query, -step.query_position)
    last = int(step.query_position[0, -1])
    basis = torch.eye(d, dtype=torch.float64).expand(future, 1, d, d).reshape(1, 1, future * d, d)
    pos = torch.arange(last + 1, last + 1 + future).repeat_interleave(d).view(1, -1)
    rot = rotate(rotary, basis, pos).view(future, d, d).transpose(1, 2).mean(0)  # mean of R(p): columns R e_j
    keys = step.keys.repeat_interleave(hq // step.keys.shape[1], dim=1)
    out = torch.zeros(b, hq, step.keys.shape[2], dtype=torch.float64)
    for h in range(hq):
        q = plain[0, h]
        mu, cov = q.mean(0), torch.cov(q.T, correction=0)
        mu_f, cov_f = rot @ mu, rot @ cov @ rot.T
        k = keys[0, h]
        logit = step.scaling * k @ mu_f + 0.5 * step.scaling ** 2 * ((k @ cov_f) * k).sum(-1)
        out[0, h] = torch.softmax(logit, -1)
    out = out.view(b, step.keys.shape[1], -1, out.shape[-1]).mean(2)
    return out * step.values.norm(dim=-1)


def test_scores_equal_the_definition_with_explicit_rotations(llama64):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 20, 12, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 20, 12, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 20, 12, generator=gen, dtype=torch.float64)
    session = types.SimpleNamespace(shared={}, model=llama64)
    step = make_step(q, k, v, session=session, scaling=12 ** -0.5)
    press = kv.get("expected_attention", ratio=0.5, future=32, sinks=0)
    torch.testing.assert_close(press.score(step).double(), _definition(llama64, step, 32), atol=1e-6, rtol=1e-5)
    sinks = kv.get("expected_attention", ratio=0.5, future=32, sinks=3).score(step)
    assert (sinks[..., :3] == float("inf")).all() and torch.isfinite(sinks[..., 3:]).all()


def test_compresses_a_real_run_before_the_question(llama64):
    x = ids(120)
    out = greedy_logits(llama64, x, steps=2, press=kv.get("expected_attention", ratio=0.75, future=64))
    assert all(torch.isfinite(o).all() for o in out)
    with torch.no_grad(), kv.get("expected_attention", ratio=0.75)(llama64) as session:
        llama64(input_ids=x)
        assert session.stats()["removed"] == pytest.approx(0.75, abs=0.01)
