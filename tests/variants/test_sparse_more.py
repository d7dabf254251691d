"""routing, recycled, dma, minference and seer under the sparse family's contract (the checks of
test_sparse_family.py, run over these variants' cases against sparse_defs_more.py), then what is particular
to each: k-means state, the recycled step structure across calls, dma's learned mask, MInference's offline
search and SeerAttention's self-distillation on real SmolLM2 activations."""
from __future__ import annotations

import json
import math

import pytest
import sparse_defs_more as defs
import test_sparse_family as contract
import torch
from harness import PATTERN_SHAPES, qkv
from test_sparse_family import Case

import attnzoo as az

_SK_OF_SQ = {sq: sk for _, sq, sk in PATTERN_SHAPES.values()}


def _dt(q, fill=None):
    """dma's dynamic mask for the contract's calls (2 kv heads, Sk of the pattern): distinct values exact in
    bfloat16 and float16 (k / 16), so rounding never reorders the keys."""
    b, sk = q.shape[0], _SK_OF_SQ[q.shape[2]]
    if fill is not None:
        return {"dt": torch.full((b, 2, sk), fill, dtype=q.dtype)}
    g = torch.Generator().manual_seed(q.shape[2])
    return {"dt": torch.stack([torch.randperm(sk, generator=g) for _ in range(2 * b)]).view(b, 2, sk).to(q.dtype) / 16}


CASES = {
    "routing": Case(
        params={"clusters": 3, "top_k": 9, "kmeans_steps": 2},
        define=defs.routing,
        all_params=lambda sk: {"clusters": 3, "top_k": sk},
        bad=(({"clusters": 0}, ValueError, "'clusters' must be a positive int"),
             ({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"kmeans_steps": -1}, ValueError, "'kmeans_steps' must be a non-negative int"),
             ({"top_k": 2.0}, TypeError, "'top_k' must be int")),
    ),
    "recycled": Case(
        params={"top_k": 5, "stride": 4},
        define=defs.recycled,
        all_params=lambda sk: {"top_k": sk, "stride": 4},
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"stride": 0}, ValueError, "'stride' must be a positive int")),
    ),
    "dma": Case(
        params={"top_k": 7},
        define=defs.dma,
        inputs=_dt,
        all_params=lambda sk: {"top_k": sk},
        all_inputs=lambda q: _dt(q, fill=0.0),
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"top_k": "all"}, TypeError, "'top_k' must be int")),
    ),
    "minference": Case(
        params={"budget": 20, "heads": ("vertical_slash", 0.5), "block_size": 6, "last_q": 8},
        define=defs.minference,
        all_params=lambda sk: {"budget": 6 * math.ceil(sk / 6), "heads": ("block_sparse", 0.0), "block_size": 6},
        smallest={"budget": 1, "heads": ("block_sparse", 0.0), "block_size": 6},
        own=lambda p, pos, sk: set(range(pos // 6 * 6, min(pos // 6 * 6 + 6, sk))),
        bad=(({"budget": 0}, ValueError, "'budget' must be a positive int"),
             ({"heads": ("diagonal", 0.5)}, ValueError, "'heads' must be \\(pattern, share\\)"),
             ({"heads": ("a_shape", 1.5)}, ValueError, "share a float in \\[0, 1\\]"),
             ({"heads": "a_shape"}, TypeError, "'heads' must be tuple or list"),
             ({"block_size": 0}, ValueError, "'block_size' must be a positive int")),
    ),
    "seer": Case(
        params={"block_size": 6, "top_k": 3},
        define=defs.seer,
        all_params=lambda sk: {"block_size": 6, "top_k": math.ceil(sk / 6)},
        smallest={"block_size": 6, "top_k": 1},
        own=contract._own_block,
        bad=(({"top_k": 0}, ValueError, "'top_k' must be a positive int"),
             ({"block_size": 0}, ValueError, "'block_size' must be a positive int")),
    ),
}
contract.CASES.update(CASES)   # the contract's helpers look cases up by name
NAMES = list(CASES)


# ---- the family contract --------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", list(PATTERN_SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_and_reference_equal_the_independent_definition(name, pattern):
    contract.test_fast_path_and_reference_equal_the_independent_definition(name, pattern)


@pytest.mark.parametrize("name", NAMES)
def test_selections_are_per_batch_row_and_kv_head(name):
    contract.test_selections_are_per_batch_row_and_kv_head_unless_the_paper_shares_them(name)


@pytest.mark.parametrize("name", NAMES)
def test_a_budget_that_selects_everything_is_full_attention(name):
    contract.test_a_budget_that_selects_everything_is_full_attention(name)


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].own])
def test_the_smallest_budget_still_reads_the_queries_own_block(name):
    contract.test_the_smallest_budget_still_reads_the_queries_own_block(name)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_of_the_fast_path_equal_the_references(name):
    contract.test_gradients_of_the_fast_path_equal_the_references(name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_follows_flashattention_rule_against_the_definition(name, dtype):
    contract.test_low_precision_follows_flashattention_rule_against_the_definition(name, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_bad_parameters_raise_naming_them(name):
    contract.test_bad_parameters_raise_naming_them(name)


@pytest.mark.parametrize("name", NAMES)
def test_info_cites_the_paper_and_declares_the_budget(name):
    contract.test_info_cites_the_paper_and_declares_the_budget(name)
