"""attnzoo kv's needles go in at real sentence ends of the haystack, never inside code, numbers or names."""
from __future__ import annotations

import random
import re

import pytest

from attnzoo.kv import tasks

pytestmark = pytest.mark.model


def at_sentence_end(before: str, after: str) -> bool:
    """`before` ends with a word of 2+ characters without a dot, then ".", "!" or "?"; `after` goes on
    with spaces and an uppercase letter, or with a line break."""
    return bool(re.search(r"(?:^|\s)[^\s.!?]{2,}[.!?]$", before)) and bool(re.match(r"[ \t]*\n|[ \t]+[A-Z]", after))


def test_every_needle_of_the_default_run_and_of_every_task_sits_at_a_sentence_end(smollm2):
    _, tok = smollm2
    # `attnzoo kv`'s defaults (passkey, niah_single, qa at 1024 tokens, depths 0.2 and 0.8), then every
    # task at more depths and seeds
    samples = tasks.make_samples(("passkey", "niah_single", "qa"), tok, [1024], [0.2, 0.8], 1)
    samples += tasks.make_samples(tasks.TASKS, tok, [512], [0.0, 0.5, 1.0], 2)
    bad, count = [], 0
    for s in samples:
        _, needles, *_ = tasks._needles(s.task, random.Random(f"{s.task}-{s.length}-{s.depth}-{s.seed}"))
        for needle in needles:
            at = s.context.find(needle)
            assert at > 0 and s.context.count(needle) == 1, (s.task, needle)
            count += 1
            before, after = s.context[:at].rstrip(" "), s.context[at + len(needle):]
            if not at_sentence_end(before, after):
                bad.append(f"{s.task} {s.depth} {s.seed}: {before[-40:]!r} | {after[:25]!r}")
    assert count > 60 and not bad, "\n".join(bad)
