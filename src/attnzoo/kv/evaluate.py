"""Run presses on the long-context tasks: accuracy, KV bytes held, prefill and decode latency, each
against the uncompressed model in the same run.

Settings:
- query_agnostic: the context is prefilled and compressed before the question is seen; the question
  then goes through the model as a second forward (kvpress's protocol).
- query_aware: context and question are prefilled (and compressed) together.
Greedy decoding. Prefill time covers every forward before the first answer token; decode time is
per generated token after it.

`share_prefill`: presses whose prefill output is the uncompressed model's (they compress after each
layer's attention and read everything) replay the uncompressed run's prefill (its per-layer queries,
keys and values) instead of recomputing it: the same cache and answers, in a fraction of the time;
their prefill time then measures compression only (`shared_prefill` in the record).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict

import torch

from .. import hf
from .base import KVPress, cache_bytes, get, require_cache_api, with_cache
from .tasks import Prompt, Sample, is_correct, make_prompt

SETTINGS = ("query_agnostic", "query_aware")
BASELINE = "full"


def presses_for(methods: list[str], ratios: list[float]) -> list[KVPress]:
    """One press per (method, ratio); kv_quant, which removes no entries, once per bit width. A method
    "a+b+int4" composes a and b (each at the ratio) with int4 storage (see `compose`)."""
    out = []
    for name in methods:
        if "+" in name:
            out += [composed(name, r) for r in ratios]
        elif name == "kv_quant":
            out += [get(name, bits=8), get(name, bits=4)]
        else:
            out += [get(name, ratio=r) for r in ratios]
    return out


QUANT_PARTS = {"int8": 8, "int4": 4, "int2": 2}


def composed(spec: str, ratio: float) -> KVPress:
    """`compose` of the parts of "a+b+int4": eviction presses at `ratio`, intN as kv_quant(bits=N)."""
    from .compose import compose

    return compose(*[get("kv_quant", bits=QUANT_PARTS[p]) if p in QUANT_PARTS else get(p, ratio=ratio)
                     for p in spec.split("+")])


@torch.no_grad()
def capture_prefill(model, input_ids: torch.Tensor, cache) -> tuple[dict, torch.Tensor]:
    """The uncompressed prefill of `input_ids` into `cache`: ({layer: (query, key, value, scaling)}, the
    last token's logits), what `PressSession.replay_prefill` replays."""
    captured = {}

    def make(layer):
        def grab(module, query, key, value, attention_mask, scaling, call_next):
            captured[layer] = (query, key, value, scaling)
            return call_next(query, key, value, attention_mask)

        return grab

    with hf.hook(model, {i: make(i) for i, _ in hf.attention_modules(model)}, innermost=True):
        out = model(input_ids=input_ids, **with_cache(model, cache), logits_to_keep=1)
    return captured, out.logits


@torch.no_grad()
def generate(model, tokenizer, prompt: Prompt, setting: str, press: KVPress | None, max_new_tokens: int,
             shared: tuple | None = None, capture: bool = False) -> dict:
    """Greedy answer of `model` to `prompt` under `press` (None: uncompressed) in `setting`. `capture`
    (uncompressed only): keep the prefill's per-layer tensors in the result's "shared"; `shared`: such a
    capture, replayed instead of the prefill when the press allows it."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    DynamicCache, _ = require_cache_api()
    device = next(model.parameters()).device
    ctx, question = prompt.context_ids.to(device), prompt.question_ids.to(device)
    cache = DynamicCache(config=model.config)
    session = press(model, tokenizer) if press is not None else contextlib.nullcontext()
    eos = tokenizer.eos_token_id
    replay = shared is not None and press is not None and session.replays_prefill
    first = torch.cat([ctx, question], dim=1) if setting == "query_aware" else ctx
    with session:
        start = _clock(device)
        if replay:
            session.replay_prefill(first, shared[0], cache)
            logits = shared[1]
        elif capture:
            captured = capture_prefill(model, first, cache)
            logits = captured[1]
        else:
            logits = model(input_ids=first, **with_cache(model, cache), logits_to_keep=1).logits
        if setting == "query_agnostic":
            logits = model(input_ids=question, **with_cache(model, cache), logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        prefill = _clock(device) - start
        held = session.stats() if press is not None else _plain_stats(cache)
        tokens, steps = [int(token)], []
        while len(tokens) < max_new_tokens and tokens[-1] != eos:
            start = _clock(device)
            out = model(input_ids=token, **with_cache(model, cache), logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(_clock(device) - start)
            tokens.append(int(token))
        end = session.stats() if press is not None else _plain_stats(cache)
    extra = {"shared": captured} if capture else {}
    return {**extra, "shared_prefill": replay, "output": tokenizer.decode([t for t in tokens if t != eos]),
            "prefill_s": prefill,
            "decode_s": statistics.median(steps) if steps else None, "new_tokens": len(tokens),
            "bytes": held["bytes"], "bytes_end": end["bytes"], "removed": held["removed"],
            "read_fraction": end["read_fraction"]}


def _clock(device: torch.device) -> float:
    """perf_counter once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _plain_stats(cache) -> dict:
    return {"bytes": cache_bytes(cache), "removed": 0.0,
            "read_fraction": None}


def evaluate(model, tokenizer, presses: list[KVPress], samples: list[Sample], settings=SETTINGS,
             progress: bool = True, records: list | None = None, share_prefill: bool = False) -> list[dict]:
    """Every (sample, setting) run uncompressed and under every press: one record per run, appended to
    `records` (a new list if None) as each run ends, so an interrupted evaluation keeps what it measured."""
    from tqdm.auto import tqdm

    records = [] if records is None else records
    bar = tqdm(total=len(samples) * len(settings) * (len(presses) + 1), disable=not progress, unit="run",
               desc="attnzoo kv")
    for sample in samples:
        prompt = make_prompt(sample, tokenizer)
        for setting in settings:
            shared = None
            for press in [None, *presses]:
                label = BASELINE if press is None else press.label
                bar.set_postfix_str(f"{sample.task}@{sample.length} d={sample.depth} {setting} {label}")
                run = generate(model, tokenizer, prompt, setting, press, sample.max_new_tokens, shared=shared,
                               capture=share_prefill and press is None)
                shared = run.pop("shared", shared)
                records.append({
                    "task": sample.task, "length": sample.length, "prompt_tokens": prompt.n_tokens,
                    "depth": sample.depth, "seed": sample.seed, "setting": setting, "method": label,
                    "name": BASELINE if press is None else press.name,
                    "kind": "none" if press is None else press.kind,
                    "ratio": 0.0 if press is None else press.ratio, "answers": list(sample.answers),
                    "correct": is_correct(sample, run["output"]), **run})
                bar.update()
    bar.close()
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per (method, ratio, setting): accuracy, and bytes / latency as means and as ratios to the
    uncompressed run of the same sample and setting."""
    key = lambda r: (r["task"], r["length"], r["depth"], r["seed"], r["setting"])
    base = {key(r): r for r in records if r["method"] == BASELINE}
    groups = defaultdict(list)
    for r in records:
        groups[(r["method"], r["ratio"], r["setting"])].append(r)
    rows = []
    for (method, ratio, setting), runs in groups.items():
        pairs = [(r, base[key(r)]) for r in runs]
        mean = lambda xs: sum(xs) / len(xs) if xs else None
        decode = [r["decode_s"] / b["decode_s"] for r, b in pairs if r["decode_s"] and b["decode_s"]]
        reads = [r["read_fraction"] for r in runs if r["read_fraction"] is not None]
        rows.append({
            "method": method, "name": runs[0]["name"], "kind": runs[0]["kind"], "ratio": ratio, "setting": setting,
            "n": len(runs), "accuracy": mean([float(r["correct"]) for r in runs]),
            "bytes": mean([r["bytes"] for r in runs]),
            "bytes_fraction": mean([r["bytes"] / b["bytes"] for r, b in pairs]),
            "removed": mean([r["removed"] for r in runs]),
            "read_fraction": mean(reads),
            "prefill_s": mean([r["prefill_s"] for r in runs]),
            "prefill_vs_full": mean([r["prefill_s"] / b["prefill_s"] for r, b in pairs]),
            "decode_ms": mean([1e3 * r["decode_s"] for r in runs if r["decode_s"]]),
            "decode_vs_full": mean(decode),
        })
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in records))}
    return sorted(rows, key=lambda r: (order[r["method"]], r["ratio"], SETTINGS.index(r["setting"])))


def accuracy_by(records: list[dict], field: str) -> dict:
    """{setting: {(method, ratio): {value of `field` (e.g. depth, length): accuracy}}}."""
    acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        acc[r["setting"]][(r["method"], r["ratio"])][r[field]].append(float(r["correct"]))
    return {s: {k: {d: sum(v) / len(v) for d, v in sorted(ds.items())} for k, ds in m.items()}
            for s, m in acc.items()}
