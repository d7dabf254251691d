"""Token-eviction presses that rank entries by a score: every KV head keeps its highest-scoring entries."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.info import Paper, Param, nonneg_int, positive_int
from .base import KVPress, Step, keep_count, register, topk_mask


def first_slots(step: Step, n) -> torch.Tensor:
    """(B, Hkv, S) bool: the `n` earliest valid tokens of each row and head (the attention sinks)."""
    order = (-step.index.double()).masked_fill(~step.valid, -math.inf)
    return topk_mask(order, n) & step.valid


def recent_slots(step: Step, n) -> torch.Tensor:
    """(B, Hkv, S) bool: the `n` most recent valid tokens of each row and head."""
    order = step.index.double().masked_fill(~step.valid, -math.inf)
    return topk_mask(order, n) & step.valid


class ScorePress(KVPress):
    """Keeps the `n_keep(ratio)` highest scores of each row and KV head at prefill; decode-stage
    subclasses evict the lowest scores again whenever a head holds more than its prefill budget.
    `with_budgets` gives each layer, or each layer and KV head, its own ratio."""

    budgets: torch.Tensor | None = None  # (layers,) or (layers, kv heads) ratios, from with_budgets

    def with_budgets(self, ratios) -> "ScorePress":
        """Use per-layer `(layers,)` or per-layer-and-KV-head `(layers, kv_heads)` ratios (fractions removed)
        instead of the single ratio, which becomes their mean; returns the press. Shapes are checked
        against the model at its first forward."""
        if type(self).count is not ScorePress.count:
            raise ValueError(f"{self.name} sets its own per-layer budgets; with_budgets applies to score-based "
                             "presses with one ratio (snapkv, h2o, tova, knorm, streaming_llm, random)")
        budgets = torch.as_tensor(ratios, dtype=torch.float64)
        if budgets.dim() not in (1, 2) or budgets.numel() == 0:
            raise ValueError(f"budgets: expected a (layers,) or (layers, kv_heads) array of ratios, got shape "
                             f"{tuple(budgets.shape)}")
        if not bool(((budgets >= 0) & (budgets < 1)).all()):
            raise ValueError("budgets: every ratio must be in [0, 1), the fraction of KV entries removed")
        self.budgets, self.ratio = budgets, float(budgets.mean())
        return self

    def score(self, step: Step) -> torch.Tensor:
        """(B, Hkv, S) importance of each slot; higher is kept."""
        raise NotImplementedError

    def count(self, step: Step) -> torch.Tensor:
        """Entries to keep: (B,) or (B, Hkv)."""
        if not step.prefill:
            return step.budget
        if self.budgets is None:
            return step.n_keep(self.ratio)
        hkv = step.keys.shape[1]
        if self.budgets.shape[0] != step.n_layers or (self.budgets.dim() == 2 and self.budgets.shape[1] != hkv):
            raise ValueError(f"budgets: expected ({step.n_layers},) or ({step.n_layers}, {hkv}) ratios for this "
                             f"model's layers and KV heads, got {tuple(self.budgets.shape)}")
        ratio = self.budgets[step.layer].to(step.row_length.device)
        length = step.row_length.view(-1, 1) if ratio.dim() == 1 else step.row_length
        return keep_count(length, ratio)

    def keep(self, step: Step):
        count = self.count(step)
        held = step.valid.sum(-1)
        if bool((held <= (count if count.dim() == 2 else count.view(-1, 1))).all()):
            return None
        return topk_mask(self.score(step).float().masked_fill(~step.valid, -math.inf), count)


@register
class RandomPress(ScorePress):
    name = "random"
    summary = "Baseline: keeps a uniformly random subset of the prompt's entries."
    params = KVPress.params + (Param("seed", 0, "random seed"),)

    def score(self, step):
        gen = torch.Generator().manual_seed(self.seed + step.layer)
        return torch.rand(step.index.shape, generator=gen).to(step.index.device)


@register
class KnormPress(ScorePress):
    name = "knorm"
    paper = Paper("A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", 2024, "2406.11430")
    summary = "Keeps the keys of lowest L2 norm (they draw the most attention); query-free."

    def score(self, step):
        return -step.keys.float().norm(dim=-1)


@register
class StreamingLLMPress(ScorePress):
    name = "streaming_llm"
    paper = Paper("Efficient Streaming Language Models with Attention Sinks", 2023, "2309.17453")
    stages = ("prefill", "decode")
    summary = "Attention sinks (the first tokens) plus a window of the most recent tokens; keys are not re-rotated."
    params = KVPress.params + (nonneg_int("sinks", 4, "initial tokens always kept (kvpress: 4)"),)

    def score(self, step):
        return step.index.double().masked_fill(first_slots(step, self.sinks), math.inf)


@register
class H2OPress(ScorePress):
    name = "h2o"
    paper = Paper("H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", 2023,
                  "2306.14048")
    stages = ("prefill", "decode")
    summary = ("Heavy hitters by accumulated attention (summed over every query so far and the query heads of "
               "a KV group) plus a recent window; half of the budget each, as in the paper.")
    params = KVPress.params + (Param("recent_share", 0.5, "share of the budget given to the most recent tokens",
                                     (int, float), lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),)
    QUERY_CHUNK = 256

    def keep(self, step):
        received = torch.zeros_like(step.bias)
        for start in range(0, step.query.shape[2], self.QUERY_CHUNK):
            rows = slice(start, start + self.QUERY_CHUNK)
            received += step.attention(rows).sum(2).view(*step.bias.shape[:2], step.groups, -1).sum(2)
        step.extra["h2o"] = step.extra.get("h2o", torch.zeros_like(received)) + received
        return super().keep(step)

    def score(self, step):
        count = self.count(step)
        recent = recent_slots(step, (count.float() * self.recent_share).long())
        return step.extra["h2o"].masked_fill(recent, math.inf)


@register
class TOVAPress(ScorePress):
    name = "tova"
    paper = Paper("Transformers are Multi-State RNNs", 2024, "2401.06104")
    stages = ("prefill", "decode")
    summary = ("Token Omission Via Attention: evicts the entries the current query attends to least, averaged "
               "over all heads of the layer (one kept set per layer); the newest token is always kept.")

    def score(self, step):
        last = step.attention(slice(-1, None))[:, :, 0].mean(1, keepdim=True)  # (B, 1, S)
        newest = recent_slots(step, 1)
        return last.expand_as(step.bias).masked_fill(newest, math.inf)


@register
class SnapKVPress(ScorePress):
    name = "snapkv"
    paper = Paper("SnapKV: LLM Knows What You are Looking for Before Generation", 2024, "2404.14469")
    summary = ("Attention of the last `window` prompt queries (the observation window), averaged over them, "
               "smoothed by average pooling and averaged over the query heads of each KV group; the window "
               "itself is always kept (kvpress's defaults: window 64, kernel 5).")
    params = KVPress.params + (
        positive_int("window", 64, "observation window (last prompt queries)"),
        Param("kernel", 5, "average-pooling kernel", (int,), lambda v: v >= 1 and v % 2 == 1, "an odd int >= 1"),
    )

    def score(self, step):
        w = max(1, min(self.window, step.query.shape[2] - 1))
        attn = step.attention(slice(-w, None))  # (B, Hq, w, S)
        n_valid = step.query_valid[:, -w:].sum(1).clamp(min=1).view(-1, 1, 1)
        scores = attn.sum(2) / n_valid
        in_window = step.index >= int(step.query_index[-w])
        head = scores[..., : scores.shape[-1] - w]  # the window is the last w slots at prefill
        b, hq, s = head.shape
        pooled = F.avg_pool1d(head.reshape(b * hq, 1, s), self.kernel, stride=1, padding=self.kernel // 2)
        scores = torch.cat([pooled.view(b, hq, s), scores[..., s:]], dim=-1)
        return step.group_mean(scores).masked_fill(in_window, math.inf)


@register
class PyramidKVPress(SnapKVPress):
    name = "pyramidkv"
    paper = Paper("PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling", 2024,
                  "2406.02069")
    summary = ("SnapKV scores with layer budgets that shrink linearly with depth (lower layers keep more), "
               "averaging to the same ratio; kvpress's schedule with beta 20, except that it is kept whenever it "
               "fits the prompt (kvpress falls back to SnapKV unless the top layer's budget exceeds the window, "
               "i.e. below ~5k tokens at ratio 0.75).")
    params = SnapKVPress.params + (positive_int("beta", 20, "pyramid steepness (kvpress: 20)"),)

    def count(self, step):
        if not step.prefill:
            return step.budget
        return torch.tensor([self.layer_budget(int(n), step.layer, step.n_layers) for n in step.row_length],
                            device=step.row_length.device)

    def layer_budget(self, length: int, layer: int, n_layers: int) -> int:
        """kvpress's PyramidKV schedule: budgets fall linearly from the bottom layer to the top one and
        average to `length * (1 - ratio)`; the uniform budget when the pyramid does not fit the prompt."""
        uniform = max(1, length - round(length * self.ratio))
        capacity = self.window + length * (1 - self.ratio)
        low = (capacity - self.window) / self.beta
        high = (capacity - self.window) * 2 - low
        if high >= length - self.window:
            high = length - self.window
            low = (capacity - self.window) * 2 - high
        if n_layers < 2 or not (length >= high >= low >= 1):
            return uniform
        return max(1, round(high - layer * (high - low) / (n_layers - 1)))


@register
class PromptDistillPress(KVPress):
    name = "promptdistill"
    paper = Paper("PromptDistill: Query-based Selective Token Retention in Intermediate Layers for Efficient "
                  "Large Language Model Inference", 2025, "2503.23274")
    summary = ("At an intermediate layer the last `window` prompt queries pick the tokens to retain (attention "
               "averaged over heads); from the next layer on, during prefill, only those tokens are attended "
               "to, as if the others' hidden states were dropped, and only their entries are cached. Layers up "
               "to the selection layer keep everything, so later layers evict more to meet the ratio.")
    params = KVPress.params + (
        Param("select_layer", 0.4, "selection layer as a fraction of depth", (int, float), lambda v: 0.0 <= v < 1.0,
              "a number in [0, 1)"),
        positive_int("window", 8, "query tokens that select"),
    )

    def plan(self, length: int, n_layers: int) -> tuple[int, int]:
        """(selection layer, tokens kept after it) for a row of `length`: the deepest selection layer at or
        below `select_layer` whose later layers can meet the ratio while keeping at least the window."""
        total = (length - round(length * self.ratio)) * n_layers
        for s in range(min(int(self.select_layer * n_layers), n_layers - 1), -1, -1):
            rest = n_layers - s - 1
            if rest and (total - (s + 1) * length) / rest >= self.window + 1:
                return s, int((total - (s + 1) * length) // rest)
        return -1, max(1, length - round(length * self.ratio))  # all layers keep the selected set

    def _selection_layer(self, step) -> int:
        return max(0, self.plan(int(step.row_length.max()), step.n_layers)[0])

    def read(self, step):
        chosen = step.session.shared.get("promptdistill")
        if not step.prefill or chosen is None or step.layer <= self._selection_layer(step):
            return None
        return chosen.unsqueeze(2).expand(-1, -1, step.query.shape[2], -1)

    def keep(self, step):
        s = self._selection_layer(step)
        if not step.prefill or step.layer < s:
            return None
        if step.layer == s:
            w = min(self.window, step.query.shape[2])
            attn = step.attention(slice(-w, None)).sum(2).mean(1, keepdim=True)  # (B, 1, S)
            attn = attn.expand_as(step.bias).masked_fill(step.index >= int(step.query_index[-w]), math.inf)
            counts = torch.tensor([self.plan(int(n), step.n_layers)[1] for n in step.row_length],
                                  device=attn.device)
            step.session.shared["promptdistill"] = topk_mask(attn.masked_fill(~step.valid, -math.inf), counts)
        chosen = step.session.shared["promptdistill"]
        all_layers = self.plan(int(step.row_length.max()), step.n_layers)[0] < 0
        return chosen if (step.layer > s or all_layers) else None


@register
class ExpectedAttentionPress(ScorePress):
    name = "expected_attention"
    paper = Paper("Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution",
                  2025, "2510.00636")
    summary = ("Query-agnostic: the queries to come are modelled as a Gaussian with the mean and covariance of the "
               "prompt's own queries (un-rotated, then carried by RoPE averaged over the next `future` positions); "
               "each key scores its expected attention, E[exp(q.k * scale)] = exp(scale mu.k + scale^2 k'Sigma k / "
               "2), normalised per head, averaged over each KV group and weighted by the value's norm; the first "
               "`sinks` tokens are always kept. Needs RoPE.")
    params = KVPress.params + (
        positive_int("future", 512, "future positions the rotation is averaged over (kvpress: 512)"),
        nonneg_int("sinks", 4, "initial tokens always kept (kvpress: 4)"),
        Param("covariance", True, "include the queries' covariance term", (bool,)),
    )

    def score(self, step):
        from .retrieval import rotary_module, rotate

        rotary = rotary_module(step.session.model)
        dt = torch.promote_types(step.query.dtype, torch.float32)
        valid = step.query_valid.view(step.query.shape[0], 1, -1, 1).to(dt)
        n = valid.sum(2).clamp(min=1)
        plain = rotate(rotary, step.query.to(dt), -step.query_position)  # the queries before RoPE
        mean = (plain * valid).sum(2) / n  # (B, Hq, D)
        # RoPE averaged over the next positions: v -> v * mean cos + rotate_half(v) * mean sin
        ahead = step.query_position[:, -1:] + torch.arange(1, self.future + 1, device=step.query.device)
        cos, sin = rotary(plain, ahead)
        cos, sin = cos.to(dt).mean(1).unsqueeze(1), sin.to(dt).mean(1).unsqueeze(1)  # (B, 1, D)
        half = plain.shape[-1] // 2
        carry = lambda x: x * cos.unsqueeze(-2) + torch.cat([-x[..., half:], x[..., :half]], -1) * sin.unsqueeze(-2)
        keys = step.keys.to(dt).repeat_interleave(step.groups, dim=1)  # (B, Hq, S, D)
        mu = carry(mean.unsqueeze(2)).squeeze(2)
        logits = (keys @ mu.unsqueeze(-1)).squeeze(-1) * step.scaling
        if self.covariance:
            centred = (plain - mean.unsqueeze(2)) * valid
            cov = centred.transpose(-1, -2) @ centred / n.unsqueeze(-1)  # (B, Hq, D, D)
            cov = carry(carry(cov).transpose(-1, -2))  # R Sigma R^T with R the averaged rotation
            logits = logits + 0.5 * step.scaling ** 2 * ((keys @ cov) * keys).sum(-1)
        logits = logits.masked_fill(~step.valid.repeat_interleave(step.groups, dim=1), -math.inf)
        expected = step.group_mean(torch.softmax(logits, dim=-1).nan_to_num(0.0))
        return (expected * step.values.to(dt).norm(dim=-1)).masked_fill(first_slots(step, self.sinks), math.inf)


def chat_turn(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids (before, after) of a user turn's content in `tokenizer`'s chat template, the assistant's
    turn opened after it; ([], ids of a newline) without a template."""
    marker = "\x00CONTENT\x00"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
        before, after = text.split(marker)
    else:
        before, after = "", "\n"
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []
    return enc(before), enc(after)


@register
class KVzipPress(ScorePress):
    name = "kvzip"
    paper = Paper("KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", 2025, "2505.23416")
    summary = ("Query-agnostic: the prefill also runs the model on a request to repeat the context, then the context "
               "itself (teacher-forced, in the same forward, never kept). An entry scores the largest attention any "
               "of those reconstruction queries of its KV group gives it (softmax over the context and the "
               "reconstruction so far). Each layer keeps its best entries over all its KV heads together (per-head "
               "budgets: the ragged layout saves their bytes), the first `sinks` tokens always. Costs a second "
               "prefill of the context.")
    layout = "ragged"
    needs_tokenizer = True
    params = KVPress.params + (
        nonneg_int("sinks", 4, "initial tokens always kept (KVzip: 4)"),
        Param("head_budgets", True, "rank a layer's KV heads together, so each head keeps as many entries as its "
              "scores earn (KVzip's non-uniform heads); False: every head keeps the same number", (bool,)),
        Param("request", "\n\nRepeat the previous context exactly.", "what the model is asked before it repeats the "
              "context (KVzip's wording); closed by the chat template's end of turn", (str,), lambda v: bool(v.strip()),
              "a non-empty string"),
    )
    # reconstruction queries are scored in blocks of about this many (query head, slot) logits: a block's
    # float32 temporaries stay within a few hundred MB on the CPU, a few GB on a GPU (fewer, larger launches)
    block_logits = {"cpu": 1 << 24, "cuda": 1 << 27}

    def prepare(self, model, tokenizer):
        if tokenizer is None:
            raise ValueError("kvzip asks the model to repeat its context, which needs the model's tokenizer: "
                             "press(model, tokenizer)")
        before, after = chat_turn(tokenizer)
        self._template_head = torch.tensor(before, dtype=torch.long)
        self._request = torch.tensor(tokenizer(self.request, add_special_tokens=False)["input_ids"] + after,
                                     dtype=torch.long)

    def probe_ids(self, input_ids, valid):
        """Per row: the request, then the row's real context tokens without the chat template's opening; rows
        padded on the right (after every real token, so each row sees its probe as it would alone)."""
        head = self._template_head.tolist()
        rows = []
        for ids, ok in zip(input_ids.tolist(), valid.tolist()):
            real = [t for t, v in zip(ids, ok) if v]
            rows.append(self._request.tolist() + (real[len(head):] if real[:len(head)] == head else real))
        n = max(len(r) for r in rows)
        probe = torch.zeros(len(rows), n, dtype=torch.long)
        probe_valid = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):
            probe[i, :len(r)], probe_valid[i, :len(r)] = torch.tensor(r), True
        return probe.to(input_ids.device), probe_valid

    def score(self, step):
        if step.probe is None:
            raise RuntimeError("kvzip scores entries by the attention of its reconstruction tokens, which only a "
                               "session's prefill runs (with press(model, tokenizer): ...)")
        b, hkv, s = step.bias.shape
        hq, r = step.query.shape[1], step.probe.query.shape[2]
        rows = max(16, self.block_logits.get(step.bias.device.type, 1 << 24) // (b * hq * (s + r)))
        best = torch.full((b, hkv, s), -math.inf, device=step.bias.device)
        for start in range(0, r, rows):
            logp = step.probe_log_attention(slice(start, start + rows))  # (B, Hq, rows, S)
            best = torch.maximum(best, logp.amax(2).view(b, hkv, step.groups, s).amax(2))
        return best.exp().masked_fill(first_slots(step, self.sinks), math.inf)

    def keep(self, step):
        if not self.head_budgets or self.budgets is not None:
            return super().keep(step)
        count = self.count(step)  # (B,): per head on average; the layer's heads share count * Hkv
        b, hkv, s = step.bias.shape
        if bool((step.valid.sum(-1) <= count.view(-1, 1)).all()):
            return None
        scores = self.score(step).float().masked_fill(~step.valid, -math.inf)
        return topk_mask(scores.reshape(b, 1, hkv * s), count * hkv).view(b, hkv, s)
