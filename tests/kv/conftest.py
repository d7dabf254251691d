"""Fixtures the kv tests share: SmolLM2's tokenizer, and a tiny random-weight Qwen3 that reads its ids."""
from __future__ import annotations

import pytest
from kv_tiny import tiny_qwen3


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def tiny(tok):
    """A tiny random-weight Qwen3 that reads SmolLM2's token ids: fast plumbing for the whole pipeline."""
    return tiny_qwen3(vocab=len(tok))
