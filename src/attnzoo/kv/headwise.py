"""Presses with per-head budgets: some KV heads keep their whole cache, the others a short one.

Cache tensors stay rectangular, so a layer holds as many slots as its fullest head; the slots other
heads do not use are masked (see base.py). The entries kept follow the ratio; the bytes held are
measured and reported next to it.
"""
from __future__ import annotations

import math

import torch

from ..core.info import Paper, Param, nonneg_int, positive_int
from . import profile
from .base import KVPress, Selection, Step, keep_count, register, topk_mask
from .scorers import first_slots, recent_slots


def split_budget(length: int, ratio: float, window: int, n_heads: int) -> tuple[int, int]:
    """(heads kept whole, entries each other head keeps) so that `n_heads` heads of a row of `length`
    tokens keep `length - round(ratio * length)` entries on average. The other heads get `window`
    entries plus what rounding the number of whole heads down leaves over; when even `window` is
    over budget, no head is whole and every head keeps the budget."""
    target = int(keep_count(torch.tensor(length), ratio))
    if window >= target or length <= window:
        return 0, min(target, length)
    n_full = int(n_heads * (target - window) // (length - window))
    spare = n_heads * target - n_full * length - (n_heads - n_full) * window
    return n_full, min(length, window + spare // max(1, n_heads - n_full))


class HeadBudgetPress(KVPress):
    """Heads whose budget covers the row keep everything (and keep growing while decoding); the others
    keep `sinks` initial tokens plus their most recent ones, during decoding too if the method says so."""

    sinks = 4

    def budgets(self, step: Step) -> torch.Tensor:
        """(B, Hkv) entries each head of this layer keeps after prefill."""
        raise NotImplementedError

    def window_keep(self, step: Step, count: torch.Tensor) -> torch.Tensor:
        sinks = count.clamp(max=self.sinks)
        return first_slots(step, sinks) | recent_slots(step, count - sinks)

    def keep(self, step):
        key = (self.name, step.layer)
        if step.prefill:
            count = self.budgets(step)
            full = count >= step.row_length.view(-1, 1)
            step.session.shared[key] = full
        else:
            full, count = step.session.shared[key], step.budget
            if bool((step.valid.sum(-1) <= count).all()):
                return None
        return torch.where(full.unsqueeze(-1), step.valid, self.window_keep(step, count))


class WholeOrWindowPress(HeadBudgetPress):
    """The `split_budget` allocation over a ranking of heads computed once per model."""

    params = KVPress.params + (nonneg_int("sinks", 4, "initial tokens the windowed heads keep"),
                               positive_int("recent", 64, "recent window of the windowed heads"))

    def __init__(self, ratio: float = 0.0, **params):
        super().__init__(ratio, **params)
        self.scores: torch.Tensor | None = None

    def head_scores(self, model, tokenizer) -> torch.Tensor:
        """(layers, Hkv): higher = more in need of the whole cache."""
        raise NotImplementedError

    def prepare(self, model, tokenizer):
        self.scores = self.head_scores(model, tokenizer)

    def budgets(self, step):
        rows = []
        for length in step.row_length.tolist():
            n_full, window = split_budget(length, self.ratio, self.sinks + self.recent, self.scores.numel())
            whole = profile.full_heads(self.scores, n_full)[step.layer].to(step.index.device)
            rows.append(torch.where(whole, length, window))
        return torch.stack(rows)


@register
class DuoAttentionPress(WholeOrWindowPress):
    name = "duo_attention"
    paper = Paper("DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads", 2024,
                  "2410.10819")
    stages = ("prefill", "decode")
    summary = ("Retrieval heads keep the whole cache, streaming heads keep sinks + a recent window that slides "
               "while decoding. Head roles: needle-copy retrieval scores measured here on real text (not the "
               "paper's gate optimisation); the ratio sets how many heads stream. Defaults sinks 16, recent 64 "
               "(the paper's 64/256, scaled to 1-4k-token contexts).")
    params = KVPress.params + (nonneg_int("sinks", 16, "initial tokens streaming heads keep"),
                               positive_int("recent", 64, "recent window of streaming heads"))

    def head_scores(self, model, tokenizer):
        return profile.needle_copy_scores(model, tokenizer)


@register
class HeadRolesPress(WholeOrWindowPress):
    name = "head_roles"
    needs_tokenizer = True
    paper = Paper("Retrieval Head Mechanistically Explains Long-Context Factuality", 2024, "2404.15574")
    summary = ("Per-head budgets from attnzoo.heads' own retrieval probe (the copy-paste criterion on passkey "
               "questions over real prose), computed once per model and probe setting and cached on disk keyed by "
               "the model's weights: retrieval heads (highest scores, as many as the ratio allows) keep the whole "
               "cache, the others (streaming heads) sinks + a recent window. Any causal LM; needs its tokenizer.")
    params = KVPress.params + (nonneg_int("sinks", 4, "initial tokens streaming heads keep"),
                               positive_int("recent", 64, "recent window of streaming heads"),
                               positive_int("examples", 8, "passkey questions the probe reads"),
                               positive_int("context", 384, "tokens of each probe question"))

    def head_scores(self, model, tokenizer):
        return role_scores(model, tokenizer, self.examples, self.context)


def role_scores(model, tokenizer, examples: int = 8, context: int = 384) -> torch.Tensor:
    """(layers, Hkv) retrieval scores from attnzoo.heads (a KV head scores its best query head), cached
    on disk per model and probe setting (`profile.disk_cached`)."""
    if tokenizer is None:
        raise ValueError("head_roles probes the model with passkey questions: pass the tokenizer, press(model, "
                         "tokenizer)")
    from ..heads import retrieval_scores

    def compute():
        scores = retrieval_scores(model, tokenizer, examples, context, split="train", seed=0)
        return scores.view(scores.shape[0], model.config.num_key_value_heads, -1).amax(-1).float()

    return profile.disk_cached(model, "head_roles", role_config(examples, context), compute)


def role_config(examples: int, context: int) -> dict:
    """What a head_roles profile is keyed by, besides the model."""
    return {"probe": "retrieval", "examples": examples, "context": context}


def role_ratios(scores: torch.Tensor, length: int, ratio: float, window: int) -> torch.Tensor:
    """(layers, Hkv) ratios for `ScorePress.with_budgets` from head-role scores: the `split_budget`
    allocation at `length` tokens (retrieval heads remove nothing, the others keep `window` entries)."""
    n_full, keep = split_budget(length, ratio, window, scores.numel())
    whole = profile.full_heads(scores, n_full)
    return torch.where(whole, 0.0, 1.0 - keep / length).double()


@register
class RazorAttentionPress(WholeOrWindowPress):
    name = "razor"
    paper = Paper("RazorAttention: Efficient KV Cache Compression Through Retrieval Heads", 2024, "2407.15891")
    summary = ("Retrieval heads (induction and echo heads, found by showing real text twice) keep the whole "
               "cache; the others keep sinks + a recent window plus one compensation token per head: the mean "
               "of the dropped keys and values, weighted in attention as the number of tokens it stands for.")
    params = KVPress.params + (nonneg_int("sinks", 4, "initial tokens kept by non-retrieval heads"),
                               positive_int("recent", 64, "their recent window"))

    def head_scores(self, model, tokenizer):
        induction, echo = profile.repeat_scores(model, tokenizer)
        per_query = torch.maximum(induction / induction.max(), echo / echo.max())
        return per_query.view(per_query.shape[0], model.config.num_key_value_heads, -1).amax(-1)

    def window_keep(self, step, count):
        return super().window_keep(step, (count - 1).clamp(min=1))  # one entry goes to the compensation token

    def keep(self, step):
        keep = super().keep(step)
        dropped = step.valid & ~keep
        n = dropped.sum(-1, keepdim=True)  # (B, Hkv, 1)
        if not bool(n.any()):
            return keep
        weights = dropped.unsqueeze(-1).to(step.keys.dtype) / n.clamp(min=1).unsqueeze(-1)
        mean_k = (weights * step.keys).sum(2, keepdim=True)
        mean_v = (weights * step.values).sum(2, keepdim=True)
        bias = torch.where(n > 0, n.clamp(min=1).float().log(), -math.inf)
        return Selection(keep, mean_k, mean_v, bias)


@register
class MoAPress(HeadBudgetPress):
    name = "moa"
    paper = Paper("MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression", 2024,
                  "2406.14909")
    stages = ("prefill", "decode")
    summary = ("Per-head elastic sliding windows: each KV head keeps sinks + a window of a profiled fraction of "
               "the input length (windows scale with length). Fractions are chosen by profiling the attention "
               "mass each window size captures on real text, then a greedy allocation that maximises total "
               "captured mass under the ratio (the paper's search uses gradient-weighted influence).")
    params = KVPress.params + (nonneg_int("sinks", 4, "initial tokens every head keeps"),)
    FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)

    def __init__(self, ratio: float = 0.0, **params):
        super().__init__(ratio, **params)
        self.coverage: torch.Tensor | None = None
        self._plans: dict[int, torch.Tensor] = {}

    def prepare(self, model, tokenizer):
        self.coverage = profile.window_coverage(model, tokenizer, self.FRACTIONS, self.sinks)

    def plan(self, length: int) -> torch.Tensor:
        """(layers, Hkv) kept entries for rows of `length` tokens."""
        if length not in self._plans:
            cov = self.coverage.flatten(0, 1)  # (heads, fractions)
            cost = torch.tensor([min(length, self.sinks + max(1, round(f * length))) for f in self.FRACTIONS])
            budget = int(keep_count(torch.tensor(length), self.ratio)) * cov.shape[0]
            level = torch.zeros(cov.shape[0], dtype=torch.long)
            spent = int(cost[0]) * cov.shape[0]
            while True:  # greedy: upgrade the head with the best mass gained per entry that still fits
                up = (level + 1).clamp(max=len(self.FRACTIONS) - 1)
                extra = (cost[up] - cost[level]).float()
                gain = (cov.gather(1, up.view(-1, 1)) - cov.gather(1, level.view(-1, 1))).squeeze(1)
                value = torch.where((up > level) & (extra <= budget - spent) & (extra > 0), gain / extra.clamp(min=1),
                                    torch.tensor(-math.inf))
                best = int(value.argmax())
                if value[best] == -math.inf:
                    break
                spent += int(extra[best])
                level[best] = up[best]
            counts = cost[level]
            if spent > budget:  # even the smallest windows exceed the budget: keep the budget everywhere
                counts = torch.full_like(counts, budget // cov.shape[0])
            self._plans[length] = counts.view(self.coverage.shape[:2])
        return self._plans[length]

    def budgets(self, step):
        return torch.stack([self.plan(n)[step.layer] for n in step.row_length.tolist()]).to(step.index.device)


@register
class TaskKVPress(HeadBudgetPress):
    name = "task_kv"
    paper = Paper("Task-KV: Task-aware KV Cache Optimization via Semantic Differentiation of Attention Heads", 2025,
                  "2501.15113")
    summary = ("Per input: each head's output on the last prompt tokens, projected by the layer's o_proj, is its "
               "semantic vector; heads farthest from the layer's semantic centre (heterogeneous heads) keep the "
               "whole cache, the others keep sinks + recent tokens + 'middle activations' (the tokens the last "
               "prompt queries attend to most). The ratio sets how many heads are heterogeneous.")
    params = KVPress.params + (
        Param("window", 64, "entries a non-heterogeneous head keeps", (int,),
              lambda v: v >= HeadBudgetPress.sinks + 2, f"an int >= {HeadBudgetPress.sinks + 2} (sinks + 2)"),
        positive_int("queries", 16, "last prompt tokens probed"),
    )

    def keep(self, step):
        w = min(self.queries, step.query.shape[2])
        self._attn = step.attention(slice(-w, None))  # (B, Hq, w, S): shared by budgets and window_keep
        return super().keep(step)

    def budgets(self, step):
        b, hkv = step.index.shape[:2]
        n_heads = step.n_layers * hkv
        attn = self._attn
        n_q = step.query_valid[:, -attn.shape[2]:].sum(1).clamp(min=1).view(-1, 1, 1)
        vals = step.values.float().repeat_interleave(step.groups, dim=1)  # (B, Hq, S, Dv)
        head_out = (attn @ vals).sum(2) / n_q  # (B, Hq, Dv)
        weight = getattr(step.module, "o_proj", None)
        if weight is not None:  # each head's share of the layer output
            w = weight.weight.float().view(weight.weight.shape[0], head_out.shape[1], -1)  # (hidden, Hq, Dv)
            head_out = torch.einsum("bhd,ohd->bho", head_out, w)
        distance = (head_out - head_out.mean(1, keepdim=True)).norm(dim=-1)  # (B, Hq)
        distance = step.group_mean(distance)  # (B, Hkv)
        carry = step.session.shared.setdefault("task_kv_carry", torch.zeros(b))
        rows = []
        for i, length in enumerate(step.row_length.tolist()):
            n_full, window = split_budget(length, self.ratio, self.window, n_heads)
            want = n_full / step.n_layers + float(carry[i])  # spread whole heads evenly over layers
            here = min(hkv, int(want))
            carry[i] = want - here
            whole = topk_mask(distance[i:i + 1].unsqueeze(-1).transpose(1, 2), torch.tensor([here]))[0, 0]
            rows.append(torch.where(whole, length, window))
        return torch.stack(rows)

    def window_keep(self, step, count):
        sinks = count.clamp(max=self.sinks)
        recent_n = (count - sinks) // 2
        base = first_slots(step, sinks) | recent_slots(step, recent_n)
        middle = step.group_mean(self._attn.sum(2)).masked_fill(base | ~step.valid, -math.inf)
        return base | (topk_mask(middle, count - sinks - recent_n) & step.valid & ~base)
