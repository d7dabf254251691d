"""Masks of positions along one sequence: full, windows, sinks, documents, prefixes, blocks of a packed prompt."""
from __future__ import annotations


import torch

from ...core import blocks as _blocks
from ...core.info import ALL_PATTERNS, Input, Paper, Param, nonneg_int
from ...core.registry import register
from ...core.compose import or_masks
from ...core.variant import Call, SoftmaxVariant

STREAMING_LLM = Paper("Efficient Streaming Language Models with Attention Sinks", 2023, "2309.17453")


def _optional_nonneg(name: str, default, doc: str) -> Param:
    return Param(name, default, doc, (int, type(None)), lambda v: v is None or v >= 0, "a non-negative int or None")


def host_readable(device: torch.device) -> bool:
    """Reading a tensor's values on the host costs no device sync (a CPU tensor)."""
    return device.type == "cpu"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(Sq,) -> (1, 1, Sq) for kv_intervals."""
    return t.view(1, 1, -1)


@register
class Full(SoftmaxVariant):
    name = "full"
    summary = "Exact softmax attention, no mask beyond causality."
    paper = Paper("Attention Is All You Need", 2017, "1706.03762")
    cost = "O(Sq Sk D) time; O(S) memory on the torch path"


# window=w admits the query and the w keys before it, w + 1 in all: FlashAttention's window_size=(w, w)
# and attention-gym's sliding window. Hugging Face's causal sliding_window=w and most papers' "window w"
# count the query among the w keys (kv > q - w): that is window=w - 1 here.
WINDOW_CONVENTION = ("window=w admits w + 1 keys, the query and the w before it (FlashAttention's and "
                     "attention-gym's convention); Hugging Face's causal sliding_window=w and most papers' "
                     "'window w' admit w keys including the query: use window=w - 1")


class _Window(SoftmaxVariant):
    """Shared by the window variants: keys in [q - window, q + right] (FlashAttention's window_size)."""

    has_mask = True

    def _right(self) -> int:
        r = self.config.get("right")
        return self.config["window"] if r is None else r

    def window_mask(self, call, q_pos, kv_pos, window, right):
        """Keys in [q - window, q + right]; under causality the right end is the caller's (key <= query, applied
        by `full_mask`), so it is left out (fewer ops where the kernel tables evaluate the mask on every tile)."""
        left = kv_pos >= q_pos - window
        return left if call.causal else left & (kv_pos <= q_pos + right)

    def window_interval(self, q_pos, window, right):
        return q_pos - window, q_pos + (right + 1)


@register
class SlidingWindow(_Window):
    name = "sliding_window"
    summary = ("Each query sees itself, the `window` keys before it and the `right` keys after it. "
               + WINDOW_CONVENTION + ".")
    paper = Paper("MSWA: Refining Local Attention with Multi-ScaleWindow Attention", 2025, "2501.01039")
    params = (
        Param("window", 256, "keys visible before the query, besides the query itself: " + WINDOW_CONVENTION,
              (int,), lambda v: v >= 0, "a non-negative int (window=0: the query alone; window=w admits w + 1 "
                                         "keys, so Hugging Face's sliding_window=w is window=w - 1)"),
        _optional_nonneg("right", None, "keys visible after the query; None = same as window (two-sided); "
                                        "0 = one-sided. Ignored under causal=True"),
    )
    cost = "O(Sq (window + right) D) time: only tiles overlapping the band are computed"

    def mask(self, call, b, h, q_pos, kv_pos):
        return self.window_mask(call, q_pos, kv_pos, self.config["window"], self._right())

    def kv_intervals(self, call, q_pos):
        lo, hi = self.window_interval(q_pos, self.config["window"], self._right())
        return [(_rows(lo), _rows(hi))]


class Sinks(SoftmaxVariant):
    """The first `sinks` keys (a part for compositions such as sink_window; not a variant of its own)."""

    name = "sinks"
    summary = "Every query sees the first `sinks` keys."
    paper = STREAMING_LLM
    has_mask = True
    params = (nonneg_int("sinks", 4, "number of initial tokens every query sees (attention sinks)"),)

    def mask(self, call, b, h, q_pos, kv_pos):
        return kv_pos < self.config["sinks"]

    def kv_intervals(self, call, q_pos):
        return [(_rows(torch.zeros_like(q_pos)), _rows(torch.full_like(q_pos, self.config["sinks"])))]


@register
class SinkWindow(_Window):
    name = "sink_window"
    summary = ("StreamingLLM: the first `sinks` tokens plus a sliding window of the query and the `window` keys "
               "before it. " + WINDOW_CONVENTION + " (StreamingLLM's cache of n recent tokens, the query "
               "included, is window=n - 1).")
    paper = STREAMING_LLM
    params = (
        nonneg_int("sinks", 4, "number of initial tokens every query sees (attention sinks)"),
        Param("window", 1024, "keys visible before the query, besides the query itself (n recent tokens including "
                              "the query: window=n - 1)", (int,), lambda v: v >= 0,
              "a non-negative int (window=w admits the query and w keys before it)"),
        _optional_nonneg("right", None, "keys visible after the query; None = window; ignored under causal=True"),
    )
    cost = "O(Sq (sinks + window) D) time"

    # A composition: the attention sinks OR the sliding window (their intervals give the block structure).
    def validate_config(self) -> None:
        c = self.config
        self._parts = or_masks(Sinks(sinks=c["sinks"]), SlidingWindow(window=c["window"], right=c["right"]))

    def mask(self, call, b, h, q_pos, kv_pos):
        return self._parts.mask(call, b, h, q_pos, kv_pos)

    def kv_intervals(self, call, q_pos):
        return self._parts.kv_intervals(call, q_pos)


@register
class Document(SoftmaxVariant):
    name = "document"
    summary = "Packed sequences: a token attends only to tokens of its own document."
    paper = Paper("Flex Attention: A Programming Model for Generating Optimized Attention Kernels", 2024, "2412.05496")
    has_mask = True
    inputs = (
        Input("document_ids", "(B, Sk)", "document id of every key position (packed sequences)", dtype="long"),
        Input("q_document_ids", "(B, Sq)", "document id of every query; default: ids of the last Sq key positions",
              required=False, dtype="long"),
    )
    cost = "O(sum of squared document lengths); tiles across documents are skipped"

    def validate_call(self, call: Call) -> None:
        s = call.shapes
        if "q_document_ids" not in call.inputs:
            if s.sq > s.sk:
                raise ValueError(f"document: Sq={s.sq} > Sk={s.sk} needs q_document_ids (B, Sq)")
            call.inputs["q_document_ids"] = call.inputs["document_ids"][:, s.offset:]

    def mask(self, call, b, h, q_pos, kv_pos):
        qd = call.inputs["q_document_ids"]
        kd = call.inputs["document_ids"]
        off = call.shapes.offset
        return qd[b, q_pos - off if off else q_pos] == kd[b, kv_pos]

    # Sorted ids make each document one run of keys, found by binary search. Unsorted ids (a document in
    # several runs) on CPU fall back to evaluating the mask (exact tiles); on other devices asking would
    # cost a device sync on every call, so their rows get all keys as candidates and `block_structure`
    # marks no tile full: exact, with mask work on every tile.
    def _sorted(self, call) -> torch.Tensor:
        """bool (B,): each row's document ids are non-decreasing."""
        kd = call.inputs["document_ids"]
        return (kd[:, 1:] >= kd[:, :-1]).all(dim=1)

    def kv_intervals(self, call, q_pos):
        in_order = self._sorted(call)
        if host_readable(in_order.device) and not bool(in_order.all()):
            return None
        return self._runs(call, in_order)

    def _runs(self, call, in_order: torch.Tensor) -> list:
        """Each query's run of keys of its document (all keys in a row whose ids are not sorted)."""
        qd = call.inputs["q_document_ids"].contiguous()
        kd = call.inputs["document_ids"].contiguous()
        lo = torch.searchsorted(kd, qd, right=False)
        hi = torch.searchsorted(kd, qd, right=True)
        in_order = in_order.view(-1, 1)
        lo, hi = lo * in_order, torch.where(in_order, hi, kd.shape[1])
        return [(lo.unsqueeze(1), hi.unsqueeze(1))]

    def block_structure(self, call, q_block, kv_block):
        if host_readable(call.device):
            return super().block_structure(call, q_block, kv_block)
        in_order = self._sorted(call)  # read once for the intervals and the full tiles
        s = call.shapes
        end = s.query_positions(device=call.device) + 1 if call.causal else None
        struct = _blocks.from_intervals(self._runs(call, in_order), s.sq, s.sk, q_block, kv_block, end)
        struct.full = struct.full & in_order.view(-1, 1, 1, 1)
        return struct


@register
class PrefixLM(SoftmaxVariant):
    name = "prefix_lm"
    summary = "Prefix-LM: bidirectional over the first `prefix` tokens, causal after them (causality built in)."
    paper = Paper("Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", 2019,
                  "1910.10683")
    patterns = tuple(p for p in ALL_PATTERNS if p.startswith("noncausal"))
    has_mask = True
    params = (nonneg_int("prefix", 0, "length of the bidirectional prefix (overridden by prefix_lengths)"),)
    inputs = (Input("prefix_lengths", "(B,)", "per-sequence prefix length", required=False, dtype="long"),)
    cost = "O(Sq max(prefix, q) D) time"

    def _prefix(self, call, b):
        p = call.inputs.get("prefix_lengths")
        return self.config["prefix"] if p is None else p[b]

    def mask(self, call, b, h, q_pos, kv_pos):
        return (kv_pos <= q_pos) | (kv_pos < self._prefix(call, b))

    def kv_intervals(self, call, q_pos):
        p = call.inputs.get("prefix_lengths")
        if p is None:
            hi = (q_pos + 1).clamp(min=self.config["prefix"]).view(1, -1)
        else:  # per-sequence lengths stay on the device: no host copy
            hi = torch.maximum(p.view(-1, 1), q_pos.view(1, -1) + 1)
        return [(torch.zeros_like(hi).unsqueeze(1), hi.unsqueeze(1))]



# ---- blocks of a packed prompt -------------------------------------------------------------------


def _runs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) of the run of equal ids holding each position of (B, S) ids."""
    s = ids.shape[1]
    pos = torch.arange(s, device=ids.device).expand_as(ids)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, pos, 0).cummax(dim=1).values
    end = torch.where(last, pos + 1, s).flip(1).cummin(dim=1).values.flip(1)
    return start, end


@register
class BlockRAG(SoftmaxVariant):
    name = "block_rag"
    summary = ("Block-Attention: retrieved passages are blocks that attend only within themselves (so their KV can be "
               "cached and reused); the final block (the question) attends to everything. Causal within blocks with "
               "causal=True, as in the paper.")
    paper = Paper("Block-Attention for Efficient RAG", 2024, "2409.15355")
    has_mask = True
    inputs = (Input("block_ids", "(B, Sk)", "block label of every key position; blocks are the runs of equal labels, "
                                            "the last run is the final block", dtype="long"),)
    cost = "O(sum of squared block lengths + final block x Sk); tiles between passages are skipped"

    def validate_call(self, call: Call) -> None:
        s = call.shapes
        if s.sq > s.sk:
            raise ValueError(f"{self.name}: queries are the last Sq of the Sk positions labelled by block_ids, "
                             f"so Sq={s.sq} must be <= Sk={s.sk}")
        start, end = _runs(call.inputs["block_ids"])
        # a token of the final block (the run reaching the end) sees every key from 0
        call.inputs["block_lo"] = torch.where(end == s.sk, 0, start)
        call.inputs["block_hi"] = end

    def mask(self, call, b, h, q_pos, kv_pos):
        lo, hi = call.inputs["block_lo"][b, q_pos], call.inputs["block_hi"][b, q_pos]
        return (kv_pos >= lo) & (kv_pos < hi)

    def kv_intervals(self, call, q_pos):
        off = call.shapes.offset
        return [(call.inputs["block_lo"][:, off:].unsqueeze(1), call.inputs["block_hi"][:, off:].unsqueeze(1))]
