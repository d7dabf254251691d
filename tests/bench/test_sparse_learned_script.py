"""benchmarks/sparse_learned.py: its variant list, its count of the causal pairs a selection reads, and the
mass kept of several selections from one softmax pass (minference.masses_kept)."""
from __future__ import annotations

import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import attnzoo as az

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse_learned.py"


@pytest.fixture(scope="module")
def script():
    return SimpleNamespace(**runpy.run_path(str(SCRIPT), run_name="sparse_learned"))


def test_variants_take_their_own_block_or_the_default(script):
    assert script.parse_variants("seer:64,moba,quest:128,topk", 16) == [
        ("seer", 64), ("moba", 16), ("quest", 128), ("topk", 1)]
    with pytest.raises(ValueError, match="--variants: 'hash'"):
        script.parse_variants("moba,hash", 16)
    with pytest.raises(ValueError, match="topk reads single keys"):
        script.parse_variants("topk:8", 16)


@pytest.mark.parametrize("name,params", [("moba", {"block_size": 16, "top_k": 3}), ("quest", {"page": 8, "top_k": 2}),
                                         ("topk", {"top_k": 20})])
def test_causal_share_counts_the_selected_causal_pairs(script, name, params):
    torch.manual_seed(0)
    s = 150   # not a multiple of the blocks: the last block is partial
    q, k = torch.randn(1, 4, s, 8), torch.randn(1, 2, s, 8)
    sel = az.get(name, **params).selection(q, k, causal=True)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    expected = (sel.dense() & causal).sum().item() / (4 * causal.sum().item())
    assert script.causal_share(sel, s) == pytest.approx(expected, rel=1e-12)
    if name == "topk":   # query t reads min(t + 1, top_k) keys
        reads = sum(min(t + 1, 20) for t in range(s))
        assert script.causal_share(sel, s) == pytest.approx(reads / (s * (s + 1) / 2), rel=1e-12)


def test_masses_kept_share_one_softmax_and_equal_the_definition():
    from attnzoo.variants.sparse import minference as mi

    torch.manual_seed(1)
    s = 300   # more than one query tile, not a multiple of it
    q, k = torch.randn(1, 4, s, 8, dtype=torch.float64), torch.randn(1, 2, s, 8, dtype=torch.float64)
    attns = [az.get("moba", block_size=16, top_k=3), az.get("quest", page=32, top_k=2), az.get("topk", top_k=40)]
    sels = [a.selection(q, k, causal=True) for a in attns]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 8 ** -0.5
    probs = torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1)
    for sel, mass in zip(sels, mi.masses_kept(q, k, sels)):
        assert torch.allclose(mass, (probs * sel.dense()).sum(-1).mean((0, 2)), rtol=0, atol=1e-12)
        assert torch.equal(mass, mi.mass_kept(q, k, sel))
