"""Long-context tasks on real-text haystacks (RULER-style, string-matched).

The haystack is prose from the standard library's documentation (`models.stdlib_text("heldout")`;
profiling presses read the "train" split). Needles are synthetic facts inserted at a chosen depth.
Every task has an instruction, a context (haystack + needles) and a question; the prompt is split
into a context part and a question part so the question can be withheld from compression
(query-agnostic) or included in it (query-aware).
"""
from __future__ import annotations

import bisect
import functools
import random
from dataclasses import dataclass

import torch

from .. import models

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vartrack", "qa")

_WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "glacier", "harbor", "iris", "juniper", "kestrel",
          "lantern", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "thistle", "umber",
          "velvet", "willow", "yarrow", "zephyr")
_NAMES = ("Marta Quillon", "Edvin Sarrow", "Lisbet Orrin", "Tomas Vehl", "Ines Caldry", "Oren Maltby")
_TOWNS = ("Delford", "Carrowmere", "Ashbyth", "Lenwick", "Stavenholt", "Brimscombe", "Tarnish Bay", "Oldreach")
_JOBS = ("lighthouse keeper", "clockmaker", "bookbinder", "glassblower", "cartographer", "beekeeper")
_GOODS = ("copper kettles", "woollen scarves", "brass compasses", "painted tiles", "walnut boxes", "tin lanterns")


@dataclass(frozen=True)
class Sample:
    task: str
    length: int            # target prompt length in tokens
    depth: float           # where the asked needle sits in the haystack (0 = start, 1 = end)
    seed: int
    context: str           # instruction + haystack with needles
    question: str          # question + answer cue
    answers: tuple[str, ...]  # every one must appear in the output (case-insensitive)
    max_new_tokens: int


@dataclass(frozen=True)
class Prompt:
    context_ids: torch.Tensor   # (1, n): everything before the question
    question_ids: torch.Tensor  # (1, m): the question, the chat turn's end and the answer cue

    @property
    def n_tokens(self) -> int:
        return self.context_ids.shape[1] + self.question_ids.shape[1]


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def _key(rng: random.Random) -> str:
    return "-".join(rng.sample(_WORDS, 2))


def _needles(task: str, rng: random.Random) -> tuple[str, list[str], str, tuple[str, ...], int, bool]:
    """(instruction, needle sentences (the asked one first), question + answer cue, answers, max new
    tokens, whether the other needles are spread at random depths)."""
    magic = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
             "I will quiz you about the numbers afterwards.\n\n")
    if task == "passkey":
        # InfiniteBench's passkey form with its number_string wording: asked for "the pass key" over a
        # haystack of Python documentation (`pass`, key functions), the chat-tuned SmolLM2 explained the
        # Python term ("a Python function that allows you to pass") instead of copying the number.
        key = _digits(rng, 5)
        return ("There is an important sequence of digits hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will quiz you about the sequence of digits.\n\n",
                [f"The sequence of digits is {key}. Remember it. {key} is the sequence of digits."],
                "What is the sequence of digits?\nThe sequence of digits is", (key,), 8, False)
    if task == "niah_single":
        key, value = _key(rng), _digits(rng, 7)
        return (magic, [f"One of the special magic numbers for {key} is: {value}."],
                f"What is the special magic number for {key} mentioned in the provided text?\n"
                f"The special magic number for {key} mentioned in the provided text is", (value,), 10, False)
    if task == "niah_multikey":
        keys = [_key(rng) for _ in range(4)]
        while len(set(keys)) < 4:
            keys = [_key(rng) for _ in range(4)]
        values = [_digits(rng, 7) for _ in keys]
        return (magic, [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)],
                f"What is the special magic number for {keys[0]} mentioned in the provided text?\n"
                f"The special magic number for {keys[0]} mentioned in the provided text is", (values[0],), 10, True)
    if task == "niah_multivalue":
        key = _key(rng)
        values = [_digits(rng, 7) for _ in range(3)]
        return (magic, [f"One of the special magic numbers for {key} is: {v}." for v in values],
                f"What are all the special magic numbers for {key} mentioned in the provided text?\n"
                f"The special magic numbers for {key} mentioned in the provided text are", tuple(values), 36, True)
    if task == "vartrack":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(3)]
        value = _digits(rng, 5)
        chain = [f"VAR {names[0]} = {value}.", f"VAR {names[1]} = VAR {names[0]}.", f"VAR {names[2]} = VAR {names[1]}."]
        return ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n", chain,
                f"Find all variables that are assigned the value {value} in the text above.\nAnswer: According to "
                f"the chain(s) of variable assignment in the text above, 3 variables are assigned the value "
                f"{value}, they are:", tuple(names), 20, True)
    if task == "qa":
        name, town, job, goods = rng.choice(_NAMES), rng.choice(_TOWNS), rng.choice(_JOBS), rng.choice(_GOODS)
        passage = (f"{name} was born in the town of {town}. As a young woman she trained as a {job}, and later "
                   f"she opened a small shop selling {goods}.")
        kind = rng.randrange(3)
        question, cue, answer = [
            (f"In which town was {name} born?", f"{name} was born in the town of", town),
            (f"What did {name} train as?", f"{name} trained as a", job),
            (f"What did {name}'s shop sell?", f"{name}'s shop sold", goods),
        ][kind]
        return ("Read the following text carefully; a question about it follows.\n\n", [passage],
                f"Answer the question using the text above. {question}\n{cue}", (answer,), 10, False)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def _insert(haystack: str, sentences: list[tuple[float, str]]) -> str:
    """Insert each (depth, sentence) at the first real sentence end (`models.sentence_ends`: never
    inside code, a number or a dotted name) from that fraction of the text on, else at the last one;
    at the very end only when the haystack has no sentence end at all."""
    ends = models.sentence_ends(haystack) or [len(haystack)]
    cuts = []
    for depth, sentence in sentences:
        i = bisect.bisect_left(ends, int(depth * len(haystack)))
        cuts.append((ends[min(i, len(ends) - 1)], sentence))
    out, last = [], 0
    for at, sentence in sorted(cuts, key=lambda c: c[0]):
        out += [haystack[last:at], " " + sentence]
        last = at
    out.append(haystack[last:])
    return "".join(out)


@functools.lru_cache(maxsize=4)
def _heldout_tokens(tokenizer) -> int:
    return len(tokenizer(models.stdlib_text("heldout"), add_special_tokens=False)["input_ids"])


def make_sample(task: str, tokenizer, length: int, depth: float, seed: int = 0) -> Sample:
    """One sample whose full prompt is about `length` tokens, the asked needle at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{task}-{length}-{depth}-{seed}")
    instruction, needles, question, answers, max_new, spread = _needles(task, rng)
    fixed = len(tokenizer(instruction + " ".join(needles) + question, add_special_tokens=False)["input_ids"]) + 40
    n_hay = max(32, length - fixed)
    total = _heldout_tokens(tokenizer)
    offset = rng.randrange(0, max(1, total - n_hay))
    ids = models.real_token_ids(tokenizer, n_hay, "heldout", offset)[0]
    haystack = tokenizer.decode(ids)
    depths = [depth] + ([rng.random() for _ in needles[1:]] if spread else
                        [min(1.0, depth + 0.02 * (i + 1)) for i in range(len(needles) - 1)])
    context = instruction + _insert(haystack, list(zip(depths, needles)))
    return Sample(task, length, depth, seed, context, question, answers, max_new)


def make_prompt(sample: Sample, tokenizer) -> Prompt:
    """Token ids of the context part and the question part, through the tokenizer's chat template."""
    marker = "\x00QUESTION\x00"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{sample.context}\n\n{marker}"}],
                                             tokenize=False, add_generation_prompt=True)
        head, tail = text.split(marker)
        question_line, cue = sample.question.rsplit("\n", 1)
        before, after = head, question_line + tail + cue
    else:
        before, after = sample.context + "\n\n", sample.question
    enc = lambda s: tokenizer(s, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return Prompt(enc(before), enc(after))


def is_correct(sample: Sample, output: str) -> bool:
    text = output.lower()
    return all(a.lower() in text for a in sample.answers)


def make_samples(tasks, tokenizer, lengths, depths, samples: int) -> list[Sample]:
    return [make_sample(t, tokenizer, n, d, s) for n in lengths for t in tasks for d in depths for s in range(samples)]
