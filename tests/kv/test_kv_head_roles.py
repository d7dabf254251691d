"""head_roles: per-head budgets from attnzoo.heads' retrieval probe, cached on disk per model and probe
setting, reproducible across processes."""
from __future__ import annotations

import pytest
import torch

import attnzoo.kv as kv
from attnzoo.kv import headwise, profile

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One profile cache for the module: the probe runs once."""
    return tmp_path_factory.mktemp("attnzoo_cache")


def test_budgets_are_reproducible_and_read_back_from_disk(smollm2, cache_dir, monkeypatch):
    model, tok = smollm2
    tmp_path = cache_dir
    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path))
    first = headwise.role_scores(model, tok, examples=1, context=192)
    files = list((tmp_path / "kv_profiles").glob("head_roles-*.pt"))
    assert len(files) == 1 and first.shape == (30, 3) and bool((first > 0).any())
    profile._CACHE.pop(model)  # a new process: only the disk remains
    again = headwise.role_scores(model, tok, examples=1, context=192)
    assert torch.equal(first, again)
    paths = {profile.disk_path(model, "head_roles", headwise.role_config(e, c)) for e, c in ((1, 192), (2, 192),
                                                                                              (1, 256))}
    assert len(paths) == 3 and files[0] in paths  # each probe setting has its own file
    ratios = headwise.role_ratios(first, 2048, 0.75, 68)
    assert ratios.shape == (30, 3) and ratios.mean().item() == pytest.approx(0.75, abs=0.01)
    assert len(ratios.unique()) == 2  # whole heads (0) and windowed heads (one ratio)
    # the retrieval heads (ratio 0) are the highest-scoring ones
    whole = ratios == 0
    assert bool(whole.any()) and first[whole].min() >= first[~whole].max()


def test_head_roles_removes_the_ratio(smollm2, cache_dir, monkeypatch):
    model, tok = smollm2
    monkeypatch.setenv("ATTNZOO_CACHE", str(cache_dir))  # the profile of the test above, read back
    x = tok("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt")["input_ids"][:, :240]
    for ratio in (0.5, 0.75):
        press = kv.get("head_roles", ratio=ratio, examples=1, context=192, recent=32)
        with torch.no_grad(), press(model, tok, layout="ragged") as session:
            model(input_ids=x)
            stats = session.stats()
        assert abs(stats["removed"] - ratio) <= 0.02, stats


def test_head_roles_press_needs_a_tokenizer(smollm2):
    with pytest.raises(ValueError, match="pass the tokenizer"):
        headwise.role_scores(smollm2[0], None)
    press = kv.get("head_roles", ratio=0.75, examples=2, context=256)
    assert press.label == "head_roles" and press.kind == "evict" and press.needs_tokenizer
