"""evaluate(share_prefill=True): replaying the uncompressed prefill gives the same cache and answers as
running each press's own prefill."""
from __future__ import annotations

import pytest
import torch

import attnzoo.kv as kv
from attnzoo.kv import evaluate, tasks

pytestmark = pytest.mark.model


@pytest.mark.parametrize("setting", evaluate.SETTINGS)
def test_replayed_prefill_gives_the_same_answers_and_bytes(tiny, tok, setting):
    prompt = tasks.make_prompt(tasks.make_sample("passkey", tok, 300, 0.5, seed=1), tok)
    presses = [kv.get("snapkv", ratio=0.6, window=8) + kv.get("kv_quant", bits=4), kv.get("tova", ratio=0.5),
               kv.get("quest", ratio=0.5)]
    base = evaluate.generate(tiny, tok, prompt, setting, None, 6, capture=True)
    for press in presses:
        own = evaluate.generate(tiny, tok, prompt, setting, press, 6)
        replayed = evaluate.generate(tiny, tok, prompt, setting, press, 6, shared=base["shared"])
        assert replayed["shared_prefill"] == (press.name != "quest")  # read-sparse prefill is not replayed
        assert replayed["output"] == own["output"] and replayed["bytes"] == own["bytes"]
        assert replayed["bytes_end"] == own["bytes_end"]
