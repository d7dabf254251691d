"""The uncompressed SmolLM2 answers the passkey task: a baseline that fails makes every press's accuracy
meaningless. Its wording once asked for "the pass key" over Python documentation, and the chat-tuned
model explained the Python term instead of copying the number (3/10 at 2k tokens)."""
from __future__ import annotations

import builtins
import keyword
import random
import re

import pytest

from attnzoo.kv import evaluate, tasks

pytestmark = pytest.mark.model


def test_the_passkey_question_asks_for_nothing_python_defines():
    _, needles, question, *_ = tasks._needles("passkey", random.Random(0))
    asked = re.match(r"What is the ([a-z ]+)\?", question).group(1)
    assert asked in needles[0] and asked in question.rsplit("\n", 1)[1]
    assert not [w for w in asked.split() if keyword.iskeyword(w) or w in dir(builtins) or w == "key"], asked


# Samples where the former wording's answers were "a Python module that provides a way to" and "a
# special method in Python that allows you".
@pytest.mark.parametrize("depth,seed", [(0.5, 1), (0.9, 1)])
def test_uncompressed_smollm2_copies_the_passkey_at_512_tokens(smollm2, depth, seed):
    model, tok = smollm2
    sample = tasks.make_sample("passkey", tok, 512, depth, seed)
    run = evaluate.generate(model, tok, tasks.make_prompt(sample, tok), "query_aware", None, sample.max_new_tokens)
    assert tasks.is_correct(sample, run["output"]), run["output"]
