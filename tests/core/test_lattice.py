"""core.blocks.from_lattice (dilated windows' block structure in one pass) equals the structure of the dense mask."""
from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.core import blocks


@pytest.mark.parametrize("params", [dict(window=5, dilation=3), dict(window=7, dilation=4, offsets="cyclic"),
                                    dict(window=3, dilation=1), dict(window=4, dilation=5, right=2, offsets=[0, 3, 1, 4])])
def test_dilated_structure_is_exact(params):
    attn = az.get("dilated_window", **params)
    for causal, sq, sk in [(True, 101, 101), (False, 101, 101), (True, 45, 101), (False, 45, 101), (False, 130, 70)]:
        if causal and sq > sk:
            continue
        q, k = torch.zeros(1, 4, sq, 8), torch.zeros(1, 4, sk, 8)
        got = attn.block_structure(attn.prepare(q, k, k, causal, None, {}), 16, 32)
        m = attn.dense_mask(sq, sk, causal=causal, heads=4).expand(1, 4, sq, sk)
        want = blocks.from_mask_rows(lambda q0, q1: m[..., q0:q1, :], sq, sk, 16, 32)
        assert torch.equal(got.any.expand_as(want.any), want.any), (causal, sq, sk)
        assert torch.equal((got.full & got.any).expand_as(want.full), want.full & want.any), (causal, sq, sk)


def test_rows_are_chunked_without_changing_the_result():
    lo = torch.arange(300).view(1, 1, -1) - 40
    one = blocks.from_lattice(lo, lo + 41, lo, 3, 300, 300, 16, 32)
    chunked = blocks.from_lattice(lo, lo + 41, lo, 3, 300, 300, 16, 32, rows_at_once=64)
    assert torch.equal(one.any, chunked.any) and torch.equal(one.full, chunked.full)
