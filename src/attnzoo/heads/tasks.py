"""Inputs for the probes, all built from real text that ships with Python: prose from the standard
library's docstrings (`attnzoo.models.stdlib_text`), the standard library's own source code,
repeated real-token sequences, and passkey (needle-in-a-haystack) questions over that prose.

Answers are scored by teacher forcing: the prompt and the gold answer go through the model in
one pass, and an answer counts as right when every answer token is the argmax of the logits
before it, which is exactly when greedy decoding would produce it.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import models

# Plain, long, stable standard-library modules for the "code" domain.
_CODE_MODULES = ("textwrap", "heapq", "bisect", "fractions", "statistics", "shlex", "difflib", "colorsys")


def split_ids(tokenizer, split: str) -> list[int]:
    """Token ids of a whole split of the real prose (tokenized once; `attnzoo.models` caches it)."""
    return models._tokenized(tokenizer.name_or_path, id(tokenizer), split, tokenizer)


def prose_segments(tokenizer, n: int, length: int, split: str = "train") -> list[torch.Tensor]:
    """`n` (1, length) segments of real prose, spread evenly over the split."""
    total = len(split_ids(tokenizer, split))
    step = max(length, (total - length) // max(n, 1))
    return [models.real_token_ids(tokenizer, length, split, offset=i * step) for i in range(n)]


@functools.lru_cache(maxsize=4)
def _code_ids(tokenizer) -> tuple[int, ...]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((lib / f"{m}.py").read_text(encoding="utf-8") for m in _CODE_MODULES if (lib / f"{m}.py").exists())
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def code_segments(tokenizer, n: int, length: int) -> list[torch.Tensor]:
    """`n` (1, length) segments of the standard library's Python source."""
    ids = _code_ids(tokenizer)
    step = max(length, (len(ids) - length) // max(n, 1))
    if (n - 1) * step + length > len(ids):
        raise ValueError(f"the code text has {len(ids)} tokens; cannot cut {n} segments of {length}")
    return [torch.tensor(ids[i * step:i * step + length]).unsqueeze(0) for i in range(n)]


def repeated_sequences(tokenizer, n: int, half: int, split: str = "train") -> torch.Tensor:
    """(n, 2 * half): `n` real-text chunks of `half` tokens, each written twice in a row. In the
    second copy, an induction head attends to the token after the earlier occurrence."""
    chunks = prose_segments(tokenizer, n, half, split)
    return torch.cat([torch.cat([c, c], dim=1) for c in chunks])


@dataclass
class PasskeyExample:
    """A passkey question over real prose. `ids` (1, S) holds prompt + gold answer; the answer
    tokens are ids[answer_start:], the needle sentence ids[needle[0]:needle[1]], the haystack with
    its needles ids[context[0]:context[1]]."""

    ids: torch.Tensor
    answer_start: int
    needle: tuple[int, int]
    key: str
    depth: float
    context: tuple[int, int]


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the user's message, with the assistant turn opened."""
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00MESSAGE\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
        before, after = text.split(marker)
    else:
        before, after = "", "\n\n"
    enc = functools.partial(tokenizer, add_special_tokens=False)
    return enc(before)["input_ids"], enc(after)["input_ids"]


def passkey_examples(tokenizer, n: int, context_tokens: int, split: str = "heldout", seed: int = 0,
                     digits: int = 5, distractors: int = 0) -> list[PasskeyExample]:
    """`n` passkey questions: a needle "The pass key is 71432. ..." placed at evenly spread depths,
    each at the real sentence end nearest its depth (`sentence_cuts`), in `context_tokens` tokens
    of real prose; the model must answer with the digits. With `distractors`, the needles name
    boxes of different colours ("The pass key of the red box is ...") and the question asks for one
    of them: a grounded QA task whose wrong answers are plausible. Different seeds and splits give
    other keys and haystacks."""
    rng = random.Random(seed)
    enc = functools.partial(tokenizer, add_special_tokens=False)
    text = split_ids(tokenizer, split)
    before, after = chat_frame(tokenizer)
    out = []
    for i in range(n):
        names = rng.sample(_COLOURS, distractors + 1) if distractors else [None]
        keys = ["".join(str(rng.randint(0, 9)) for _ in range(digits)) for _ in names]
        asked = rng.randrange(len(names))
        start = rng.randint(0, len(text) - context_tokens - 1)
        hay = list(text[start:start + context_tokens])
        cuts = sentence_cuts(tokenizer, hay) or [0]  # no sentence end at all: the needles open the context
        depth = (i + 0.5) / n
        # the asked needle sits at `depth`; distractors at other evenly spread depths
        depths = [depth if j == asked else (depth + (j + 1) / (len(names) + 1)) % 1.0 for j in range(len(names))]
        inserts = []
        for name, key, d in zip(names, keys, depths):
            what = "The pass key" if name is None else f"The pass key of the {name} box"
            at = _nearest(cuts, int(d * context_tokens))
            inserts.append((at, enc(f" {what} is {key}. Remember it. {key} is {what[0].lower() + what[1:]}.")["input_ids"]))
        body, last, spans = [], 0, []
        for at, needle in sorted(inserts, key=lambda t: t[0]):
            body += hay[last:at]
            spans.append((len(before) + len(body), needle))
            body += needle
            last = at
        body += hay[last:]
        what = "the pass key" if names[asked] is None else f"the pass key of the {names[asked]} box"
        question = enc(f"\n\nWhat is {what}? Answer with the number only.")["input_ids"]
        lead = enc(f"{what[0].upper() + what[1:]} is ")["input_ids"]
        prompt = before + body + question + after + lead
        needle_start, needle = next((p, nd) for p, nd in spans if nd == inserts[asked][1])
        out.append(PasskeyExample(torch.tensor([prompt + enc(keys[asked])["input_ids"]]), len(prompt),
                                  (needle_start, needle_start + len(needle)), keys[asked], depth,
                                  (len(before), len(before) + len(body))))
    return out


def sentence_cuts(tokenizer, ids: list[int]) -> list[int]:
    """Positions i in `ids` where cutting before ids[i] falls right after a real sentence end of the
    decoded text (`models.sentence_ends`): never inside code, a number or a dotted name."""
    pieces = tokenizer.batch_decode([[t] for t in ids], clean_up_tokenization_spaces=False)
    ends = set(models.sentence_ends("".join(pieces)))
    return [i + 1 for i, end in enumerate(itertools.accumulate(map(len, pieces))) if end in ends]


def _nearest(cuts: list[int], at: int) -> int:
    """The cut closest to `at` (the later one on a tie)."""
    i = bisect.bisect_left(cuts, at)
    return min(cuts[max(0, i - 1):i + 1], key=lambda c: (abs(c - at), -c))


_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]


def answer_hits(logits: torch.Tensor, ex: PasskeyExample) -> torch.Tensor:
    """Bool per answer token: is it the argmax of the logits before it? logits: (1, S, V)."""
    pred = logits[0, ex.answer_start - 1:-1].argmax(-1)
    return pred == ex.ids[0, ex.answer_start:]


@torch.no_grad()
def passkey_accuracy(model, examples: list[PasskeyExample]) -> float:
    """Share of examples whose whole answer greedy decoding would produce."""
    hits = [bool(answer_hits(model(input_ids=ex.ids, use_cache=False).logits, ex).all()) for ex in examples]
    return sum(hits) / len(hits)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets ids[:, start + 1:] (start >= 0)."""
    return torch.nn.functional.cross_entropy(logits[:, start:-1].flatten(0, 1).float(), ids[:, start + 1:].flatten())
