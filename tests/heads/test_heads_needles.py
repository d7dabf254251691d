"""Passkey needles go in at real sentence ends of the haystack, never inside code, numbers or names."""
from __future__ import annotations

import re

import pytest

from attnzoo.heads import Settings, tasks
from attnzoo.models import sentence_ends

NEEDLE = re.compile(r" The pass key(?: of the \w+ box)? is \d+\. Remember it\. \d+ is the pass key(?: of the \w+ box)?\.")


def at_sentence_end(before: str, after: str) -> bool:
    """The test's own reading of "a sentence end": `before` ends with a word of 2+ characters without a
    dot, then ".", "!" or "?"; `after` goes on with spaces and an uppercase letter, or with a line break."""
    return bool(re.search(r"(?:^|\s)[^\s.!?]{2,}[.!?]$", before)) and bool(re.match(r"[ \t]*\n|[ \t]+[A-Z]", after))


@pytest.mark.parametrize("text, ends", [
    ("It ends here. The next one", ["It ends here."]),
    ("first part.\n\nSecond part! Third? Fourth", ["first part.", "first part.\n\nSecond part!",
                                                   "first part.\n\nSecond part! Third?"]),
    ("shape: x ** (alpha - 1) * math.exp(-x / beta) pdf(x) = ...", []),          # code
    ("IPv4Network('192.0.2.0/24') doesn't make sense.", []),                       # a number
    ("its default timeout value socket.setdefaulttimeout() -- see below", []),    # a dotted name
    ("using functools.update_wrapper()) it is unwrapped", []),
    ("correlation(x, y) -1.0\n\nSlope", []),
    ("not changed. >>> s = SequenceMatcher(None)", []),                           # a doctest follows
    ("e.g. The default, i.e. Another, version 3.5. Then", []),                    # abbreviations, numbers
])
def test_sentence_ends_skip_code_numbers_and_names(text, ends):
    assert [text[:i] for i in sentence_ends(text)] == ends


def _default_questions(tok, s: Settings) -> dict[str, list[tasks.PasskeyExample]]:
    """Every passkey question a default `attnzoo heads` run builds (retrieval scoring and held-out
    accuracy, position_bias's longer contexts, DeCoRe's keyed needles)."""
    return {
        "retrieval": tasks.passkey_examples(tok, s.passkey_examples, s.passkey_tokens, split="train", seed=s.seed),
        "held-out": tasks.passkey_examples(tok, s.eval_examples, s.passkey_tokens, split="heldout", seed=s.seed + 1),
        "position_bias": tasks.passkey_examples(tok, s.eval_examples, 2 * s.passkey_tokens, split="heldout",
                                                seed=s.seed + 3),
        "decore": tasks.passkey_examples(tok, s.eval_examples, 2 * s.passkey_tokens, split="heldout",
                                         seed=s.seed + 2, distractors=3),
    }


@pytest.mark.model
def test_every_default_needle_sits_at_a_sentence_end_of_the_real_text(smollm2):
    _, tok = smollm2
    bad, count = [], 0
    for name, examples in _default_questions(tok, Settings()).items():
        for i, ex in enumerate(examples):
            text = tok.decode(ex.ids[0, :ex.answer_start], clean_up_tokenization_spaces=False)
            needles = list(NEEDLE.finditer(text))
            assert len(needles) == (4 if name == "decore" else 1), (name, i)
            for m in needles:
                count += 1
                if not at_sentence_end(text[:m.start()], text[m.end():]):
                    bad.append(f"{name} {i}: {text[m.start() - 40:m.start()]!r} | {text[m.end():m.end() + 25]!r}")
            # the asked needle is where the example says it is
            assert NEEDLE.fullmatch(tok.decode(ex.ids[0, ex.needle[0]:ex.needle[1]], clean_up_tokenization_spaces=False))
    assert count == 8 + 8 + 8 + 32
    assert not bad, "\n".join(bad)


@pytest.mark.model
def test_needles_stay_near_their_depth(smollm2):
    _, tok = smollm2
    for ex in tasks.passkey_examples(tok, 8, 384, split="train"):
        lo, hi = ex.context
        where = (ex.needle[0] - lo) / (hi - lo - (ex.needle[1] - ex.needle[0]))
        assert abs(where - ex.depth) < 0.15, (where, ex.depth)
