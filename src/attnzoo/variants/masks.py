"""The mask family: exact softmax attention under a structured mask.

Each variant is one small class: its mask as a pure function of absolute positions (FlexAttention
style), and, where its rows are unions of key intervals, those intervals, from which block
structures are built in O(Sq x key blocks) without evaluating the mask on every tile. Masks that
differ per head read a per-head table with the query-head index `h`; grid masks (images, video)
see tokens laid out row-major on a 1-3D grid. HiLo is the one member that is not a mask over the
given keys (half its heads attend to pooled keys): it composes two masked variants.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch

from ..core.info import ALL_PATTERNS, CAUSAL_SELF, NONCAUSAL_SELF, Input, Paper, Param, nonneg_int, positive_int
from ..core.registry import register
from ..core.variant import Call, SoftmaxVariant, Variant

STREAMING_LLM = Paper("Efficient Streaming Language Models with Attention Sinks", 2023, "2309.17453")


def _optional_nonneg(name: str, default, doc: str) -> Param:
    return Param(name, default, doc, (int, type(None)), lambda v: v is None or v >= 0, "a non-negative int or None")


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

    def window_mask(self, q_pos, kv_pos, window, right):
        return (kv_pos >= q_pos - window) & (kv_pos <= q_pos + right)

    def window_interval(self, q_pos, window, right):
        return q_pos - window, q_pos + right + 1


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
        return self.window_mask(q_pos, kv_pos, self.config["window"], self._right())

    def kv_intervals(self, call, q_pos):
        lo, hi = self.window_interval(q_pos, self.config["window"], self._right())
        return [(_rows(lo), _rows(hi))]


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

    def mask(self, call, b, h, q_pos, kv_pos):
        return (kv_pos < self.config["sinks"]) | self.window_mask(q_pos, kv_pos, self.config["window"], self._right())

    def kv_intervals(self, call, q_pos):
        lo, hi = self.window_interval(q_pos, self.config["window"], self._right())
        sinks = torch.full_like(q_pos, self.config["sinks"])
        return [(_rows(torch.zeros_like(q_pos)), _rows(sinks)), (_rows(lo), _rows(hi))]


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
        return qd[b, q_pos - call.shapes.offset] == kd[b, kv_pos]

    def kv_intervals(self, call, q_pos):
        kd = call.inputs["document_ids"]
        if kd.shape[1] > 1 and not bool((kd[:, 1:] >= kd[:, :-1]).all()):
            return None  # documents not contiguous: fall back to evaluating the mask
        qd = call.inputs["q_document_ids"].contiguous()
        kd = kd.contiguous()
        lo = torch.searchsorted(kd, qd, right=False)
        hi = torch.searchsorted(kd, qd, right=True)
        return [(lo.unsqueeze(1), hi.unsqueeze(1))]


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
        p = torch.tensor([self.config["prefix"]], device=q_pos.device) if p is None else p
        hi = torch.maximum(p.view(-1, 1), q_pos.view(1, -1) + 1)
        return [(torch.zeros_like(hi).unsqueeze(1), hi.unsqueeze(1))]


# ---- per-head masks ----------------------------------------------------------------------------

MAX_INTERVALS = 256  # past this many key intervals per row, evaluating the mask per query block is cheaper


def _is_int(v, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _int_seq(v, minimum: int = 0, max_len: int | None = None) -> bool:
    return (isinstance(v, (tuple, list)) and 0 < len(v) <= (max_len or len(v))
            and all(_is_int(x, minimum) for x in v))


def _int_list(name: str, doc: str, minimum: int = 0) -> Param:
    """An optional list of ints, one per query head."""
    return Param(name, None, doc, (tuple, list, type(None)), lambda v: v is None or _int_seq(v, minimum),
                 f"None or a non-empty list of ints >= {minimum}, one per query head")


def _check_per_head(variant: str, name: str, values, heads: int) -> list[int]:
    if len(values) != heads:
        raise ValueError(f"{variant}: parameter {name!r} has {len(values)} entries (one per query head), "
                         f"but this call has Hq={heads} query heads")
    return list(values)


class _PerHead(SoftmaxVariant):
    """Masks that differ between query heads through one int per query head, read with `h`.

    `head_value(call, h)` gives the values for an index tensor `h`: from an explicit per-head list
    parameter (`head_list`, which then defines the heads), or else from a table of
    `head_values(shapes)`, which depends on the call's head counts. Tables are built eagerly in
    `validate_call` (so compiled Flex kernels only index them), on the device of `h` for mask
    functions handed to users, and kept per (Hq, Hkv, device).
    """

    has_mask = True

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._tables: dict = {}

    def head_values(self, shapes) -> list[int]:
        raise NotImplementedError

    def head_list(self) -> list[int] | None:
        """Per-head values given explicitly as a parameter, or None."""
        return None

    def mask_depends_on(self) -> frozenset:
        return frozenset() if self.head_list() is not None else frozenset({"heads"})

    def validate_call(self, call: Call) -> None:
        self.head_values(call.shapes)  # checks per-head lists against Hq
        self.head_value(call, torch.arange(call.shapes.q_heads, device=call.device))

    def _table(self, key, values, device) -> torch.Tensor:
        key = (*key, device.type, device.index)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = torch.tensor(values(), dtype=torch.long, device=device)
        return table

    def head_value(self, call: Call, h: torch.Tensor) -> torch.Tensor:
        given = self.head_list()
        if given is not None:
            return self._table(("list",), lambda: list(given), h.device)[h]
        s = call.shapes
        return self._table((s.q_heads, s.kv_heads), lambda: self.head_values(s), h.device)[h]

    def head_rows(self, call: Call) -> torch.Tensor:
        """The values as (1, H, 1) to broadcast against kv_intervals rows; (1, 1, 1) when every head
        agrees, so the block structure is built once for all heads."""
        values = self.head_value(call, torch.arange(call.shapes.q_heads, device=call.device))
        return values[:1].view(1, 1, 1) if bool((values == values[0]).all()) else values.view(1, -1, 1)


MSWA = Paper("MSWA: Refining Local Attention with Multi-ScaleWindow Attention", 2025, "2501.01039")
# MSWA splits the heads of a layer, and the layers of a model, into four groups that get w/4, w/2,
# w and 2w; the two allocations multiply (about 7/8 of SWA's budget when both are used).
MSWA_SCALES = ((1, 4), (1, 2), (1, 1), (2, 1))


def mswa_windows(window: int, heads: int, layer: int | None = None, num_layers: int | None = None) -> list[int]:
    """MSWA's per-head windows: head h is in group 4h // heads, layer l in group 4l // num_layers."""
    ln, ld = (1, 1) if layer is None else MSWA_SCALES[4 * layer // num_layers]
    out = []
    for h in range(heads):
        hn, hd = MSWA_SCALES[4 * h // heads]
        out.append(window * ln * hn // (ld * hd))
    return out


@register
class MultiScaleWindow(_Window, _PerHead):
    name = "multi_scale_window"
    summary = ("MSWA: a sliding window per head (w/4, w/2, w, 2w across head groups) whose base grows from "
               "shallow to deep layers; or any explicit window per head. Windows follow sliding_window: "
               + WINDOW_CONVENTION + ".")
    paper = MSWA
    params = (
        Param("window", 256, "base window w: keys visible before the query besides itself, as sliding_window "
                             "(w + 1 keys; MSWA's and Hugging Face's window w is w - 1 here)", (int,),
              lambda v: v >= 0, "a non-negative int (window=w admits the query and w keys before it)"),
        _int_list("windows", "explicit window per query head (each admits itself + 1 keys, as `window`); overrides "
                             "MSWA's allocation from `window`"),
        _optional_nonneg("right", None, "keys visible after the query; None = each head's window (two-sided); "
                                        "ignored under causal=True"),
        _optional_nonneg("layer", None, "this layer's index, for MSWA's layer allocation (needs num_layers)"),
        positive_int("num_layers", None, "number of layers: layer group 4 * layer // num_layers scales w by "
                                         "1/4, 1/2, 1 or 2", allow_none=True),
    )
    cost = "O(Sq mean(window_h + right) D) time: each head computes only tiles its band touches"

    def validate_config(self) -> None:
        c = self.config
        if (c["layer"] is None) != (c["num_layers"] is None):
            raise ValueError(f"{self.name}: parameters 'layer' and 'num_layers' go together, got layer={c['layer']}, "
                             f"num_layers={c['num_layers']}")
        if c["layer"] is not None and c["layer"] >= c["num_layers"]:
            raise ValueError(f"{self.name}: parameter 'layer' must be < num_layers={c['num_layers']}, got {c['layer']}")
        if c["windows"] is not None and c["layer"] is not None:
            raise ValueError(f"{self.name}: give explicit 'windows' or MSWA's allocation ('window', 'layer', "
                             "'num_layers'), not both")

    def head_values(self, shapes) -> list[int]:
        c = self.config
        if c["windows"] is not None:
            return _check_per_head(self.name, "windows", c["windows"], shapes.q_heads)
        return mswa_windows(c["window"], shapes.q_heads, c["layer"], c["num_layers"])

    def head_list(self):
        return self.config["windows"]

    def mask(self, call, b, h, q_pos, kv_pos):
        window = self.head_value(call, h)
        right = window if self.config["right"] is None else self.config["right"]
        return self.window_mask(q_pos, kv_pos, window, right)

    def kv_intervals(self, call, q_pos):
        window = self.head_rows(call)
        right = window if self.config["right"] is None else self.config["right"]
        return [self.window_interval(_rows(q_pos), window, right)]


@register
class DilatedWindow(_PerHead):
    name = "dilated_window"
    summary = ("Dilated sliding window (Longformer): keys at q - i*dilation for i in 0..window (and q + i*dilation "
               "for i in 1..right); per-head offsets shift each head's lattice (SCCA's shifted dilated attention).")
    paper = Paper("Longformer: The Long-Document Transformer", 2020, "2004.05150")
    params = (
        nonneg_int("window", 64, "number of dilated steps visible before the query, besides the query itself "
                                 "(window + 1 keys, as sliding_window's window)"),
        positive_int("dilation", 2, "gap between visible keys (1 = sliding_window)"),
        _optional_nonneg("right", None, "dilated steps visible after the query; None = window; ignored under causal"),
        Param("offsets", None, "per-head lattice offsets: None (all 0), 'cyclic' (head h uses h % dilation, so "
                               "the heads together cover every key of the span), or one int in [0, dilation) per "
                               "query head",
              (tuple, list, str, type(None)), lambda v: v is None or v == "cyclic" or _int_seq(v),
              "None, 'cyclic' or a list of non-negative ints (one per query head)"),
    )
    cost = "O(Sq (window + right) D) time, but tiles are computed whole: dilation does not skip work inside a tile"

    def validate_config(self) -> None:
        offsets = self.config["offsets"]
        if isinstance(offsets, (tuple, list)) and max(offsets) >= self.config["dilation"]:
            raise ValueError(f"{self.name}: parameter 'offsets' must lie in [0, dilation={self.config['dilation']}), "
                             f"got {offsets}")

    def head_values(self, shapes) -> list[int]:
        offsets = self.config["offsets"]
        if offsets is None:
            return [0] * shapes.q_heads
        if offsets == "cyclic":
            return [h % self.config["dilation"] for h in range(shapes.q_heads)]
        return _check_per_head(self.name, "offsets", offsets, shapes.q_heads)

    def head_list(self):
        offsets = self.config["offsets"]
        return offsets if isinstance(offsets, (tuple, list)) else None

    def mask_depends_on(self) -> frozenset:
        return frozenset()  # None and 'cyclic' are functions of h alone; a list defines the heads

    def head_value(self, call, h):
        offsets = self.config["offsets"]
        if offsets is None:
            return h * 0
        if offsets == "cyclic":
            return h % self.config["dilation"]
        return super().head_value(call, h)

    def _right(self) -> int:
        r = self.config["right"]
        return self.config["window"] if r is None else r

    def mask(self, call, b, h, q_pos, kv_pos):
        # t is the key's distance from the query on the head's shifted lattice
        d = self.config["dilation"]
        t = kv_pos - q_pos + self.head_value(call, h)
        return (t % d == 0) & (t >= -self.config["window"] * d) & (t <= self._right() * d)

    def kv_intervals(self, call, q_pos):
        steps = range(-self.config["window"], self._right() + 1)
        if len(steps) > MAX_INTERVALS:
            return None
        base = _rows(q_pos) - self.head_rows(call)
        return [(base + i * self.config["dilation"], base + i * self.config["dilation"] + 1) for i in steps]


@register
class ShiftedCrossChunk(_PerHead):
    name = "shifted_cross_chunk"
    summary = ("SCCA: chunked attention whose chunks are shifted back by a per-head amount, so shifted heads see "
               "across the unshifted chunk borders. A query reads the shifted chunk that holds it (LongLoRA's "
               "S2-Attn shift of q, k and v together, which SCCA's KV shift builds on), so it always sees itself, "
               "also under causal=True.")
    paper = Paper("SCCA: Shifted Cross Chunk Attention for long contextual semantic expansion", 2023, "2312.07305")
    params = (
        positive_int("chunk", 1024, "chunk size w; a head shifted by s cuts chunks at key positions -s + n w"),
        Param("pattern", "fixed", "'fixed' (SCCA_fixed): the first Hq // 2 heads are unshifted, the others shifted "
                                  "by w // 2; 'flow' (SCCA_flow): head h shifted by h * w // Hq",
              (str,), lambda v: v in ("fixed", "flow"), "'fixed' or 'flow'"),
    )
    budget_param = "chunk"
    cost = "O(Sq chunk D) time per head; at most two key tiles per chunk are touched"

    def head_values(self, shapes) -> list[int]:
        w, hq = self.config["chunk"], shapes.q_heads
        if self.config["pattern"] == "fixed":
            return [0 if h < hq // 2 else w // 2 for h in range(hq)]
        return [h * w // hq for h in range(hq)]

    # A literal KV-only shift (queries keep their chunk, keys shifted back by s) would leave the last
    # s queries of every chunk outside their own window: under causality they could not see themselves
    # (chunk 8, shift 4: query 15 would read keys 4-11). Shifting the chunk borders for queries and keys
    # alike keeps each query inside its chunk; the first w - s queries of a chunk read the same keys either way.
    def _start(self, q_pos, shift):
        """First key of the shifted chunk holding the query: chunks of this head start at -shift + n w."""
        w = self.config["chunk"]
        return ((q_pos + shift) // w) * w - shift

    def mask(self, call, b, h, q_pos, kv_pos):
        start = self._start(q_pos, self.head_value(call, h))
        return (kv_pos >= start) & (kv_pos < start + self.config["chunk"])

    def kv_intervals(self, call, q_pos):
        start = self._start(_rows(q_pos), self.head_rows(call))
        return [(start, start + self.config["chunk"])]


S2_ATTENTION = Paper("Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention Heads",
                     2024, "2407.17678")


@register
class StridedShards(_PerHead):
    name = "strided_shards"
    summary = ("S2-Attention: key blocks of size block_size; every head sees its local_blocks nearest blocks plus "
               "every vert_stride-th block beyond them; optional dense heads. As DKernel by default: causal calls "
               "count those blocks from key position 0 (absolute: shards rotated across kv heads, so together they "
               "cover the context and the KV cache of a shard can be dropped), non-causal calls count them outward "
               "from the edges of the local band (relative, the same for every head).")
    paper = S2_ATTENTION
    params = (
        positive_int("block_size", 64, "block size of the pattern, in tokens (blocks start at key position 0)"),
        positive_int("local_blocks", 4, "query block b sees key blocks within local_blocks - 1 of b"),
        positive_int("vert_stride", 4, "every vert_stride-th key block is in a head's shard"),
        Param("homo_head", False, "True: every head uses the same shard (absolute positions only)", (bool,)),
        nonneg_int("head_offset", 0, "added to every head's shard offset (DKernel's head_sliding_offset; absolute "
                                     "positions only)"),
        nonneg_int("dense_heads", 0, "the last dense_heads kv heads attend densely (hybrid sparse-dense layer)"),
        Param("vert_position", None, "DKernel's vert_position_type: 'absolute' (block j is in the shard when "
                                     "(j + shard) % vert_stride == 0), 'relative' (the vert_stride-th blocks counted "
                                     "from the local band's edges, every head alike), or None: absolute for causal "
                                     "calls, relative for non-causal ones (DKernel's default)",
              (str, type(None)), lambda v: v in (None, "absolute", "relative"), "None, 'absolute' or 'relative'"),
    )
    budget_param = "local_blocks"
    cost = "O(Sq (local_blocks + Sk / vert_stride) block_size D) time per head"

    def validate_call(self, call: Call) -> None:
        if self.config["dense_heads"] > call.shapes.kv_heads:
            raise ValueError(f"{self.name}: parameter 'dense_heads' must be <= Hkv={call.shapes.kv_heads}, "
                             f"got {self.config['dense_heads']}")
        super().validate_call(call)

    def mask_depends_on(self) -> frozenset:
        c = self.config
        needs = set() if c["vert_position"] else {"causal"}
        # query heads are grouped onto kv heads, which carry the shard offsets and the dense heads
        if c["dense_heads"] or (not c["homo_head"] and c["vert_position"] != "relative"):
            needs |= {"heads", "kv_heads"}
        return frozenset(needs)

    def head_value(self, call, h):
        c = self.config
        if not c["dense_heads"] and (c["homo_head"] or c["vert_position"] == "relative"):
            # one shard for all heads (relative positions read only the dense flag): any head count
            return h * 0 + c["head_offset"] % c["vert_stride"]
        return super().head_value(call, h)

    def relative(self, call) -> bool:
        position = self.config["vert_position"]
        return (not call.causal) if position is None else position == "relative"

    def head_values(self, shapes) -> list[int]:
        """Per query head: its kv head's shard offset, or -1 for a dense head (DKernel's layout)."""
        c = self.config
        step = max(1, c["vert_stride"] // shapes.q_heads)
        sparse_kv_heads = shapes.kv_heads - c["dense_heads"]
        out = []
        for h in range(shapes.q_heads):
            kv_head = h // shapes.group
            shard = c["head_offset"] + (0 if c["homo_head"] else kv_head * step)
            out.append(shard % c["vert_stride"] if kv_head < sparse_kv_heads else -1)
        return out

    def mask(self, call, b, h, q_pos, kv_pos):
        c = self.config
        qb, kb = q_pos // c["block_size"], kv_pos // c["block_size"]
        local = (qb - kb < c["local_blocks"]) & (kb - qb < c["local_blocks"])
        shard = self.head_value(call, h)
        if self.relative(call):
            # blocks past the band's edge, counted from 0 at the edge: every vert_stride-th one
            beyond = (qb - kb - c["local_blocks"] + 1).clamp(min=0) + (kb - qb - c["local_blocks"] + 1).clamp(min=0)
            vertical = beyond % c["vert_stride"] == 0
        else:
            vertical = (kb + shard) % c["vert_stride"] == 0
        return local | vertical | (shard < 0)

    def kv_intervals(self, call, q_pos):
        c = self.config
        bs, stride, sk, local = c["block_size"], c["vert_stride"], call.shapes.sk, c["local_blocks"]
        n_shard_blocks = -(-sk // (bs * stride))
        relative = self.relative(call)
        if (2 if relative else 1) * n_shard_blocks + 2 > MAX_INTERVALS:
            return None
        qb = _rows(q_pos) // bs
        out = [((qb - local + 1) * bs, (qb + local) * bs)]
        shard = self.head_rows(call).expand(1, -1, q_pos.numel())
        dense = shard < 0
        if relative:
            starts = [qb - local + 1 - i * stride for i in range(1, n_shard_blocks + 1)]
            starts += [qb + local - 1 + i * stride for i in range(1, n_shard_blocks + 1)]
            starts = [j.expand_as(shard) * bs for j in starts]
        else:
            first = (-shard) % stride  # first key block j with (j + shard) % stride == 0
            starts = [(first + i * stride) * bs for i in range(n_shard_blocks)]
        for lo in starts:
            out.append((torch.where(dense, 0, lo), torch.where(dense, 0, lo + bs)))
        out.append((torch.zeros_like(shard), torch.where(dense, sk, 0)))
        return out


@register
class Hepos(SoftmaxVariant):
    name = "hepos"
    summary = ("Hepos: head-wise positional strides; head h attends only to keys at positions p with "
               "p % stride == h % stride, so the heads together cover the source once.")
    paper = Paper("Efficient Attentions for Long Document Summarization", 2021, "2104.02112")
    has_mask = True
    params = (positive_int("stride", 4, "positional stride s; head h reads keys p with p % s == h % s"),)
    cost = "O(Sq Sk D / stride) useful work; tiles are computed whole (the mask is evaluated per query block)"

    def mask(self, call, b, h, q_pos, kv_pos):
        stride = self.config["stride"]
        return kv_pos % stride == h % stride  # a function of h alone: serves any number of heads


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


# ---- tokens on a grid (images, video) ----------------------------------------------------------

SELF_PATTERNS = (CAUSAL_SELF, NONCAUSAL_SELF)


def _grid_param(default: tuple[int, ...]) -> Param:
    return Param("grid", default, "token grid, row-major (last dimension fastest): (S,), (H, W) or (T, H, W); "
                                  "its product must equal the sequence length (default: a ViT's patch grid)",
                 (tuple, list), lambda v: _int_seq(v, 1, max_len=3), "a tuple of 1 to 3 positive ints")


def _per_dim(name: str, default, doc: str, minimum: int, odd: bool = False) -> Param:
    """An int for every grid dimension, or one int per dimension."""
    def check(v):
        values = (v,) if isinstance(v, int) else v
        return (_is_int(v, minimum) or _int_seq(v, minimum, max_len=3)) and (not odd or all(x % 2 for x in values))

    what = f"an int >= {minimum}" + (" (odd)" if odd else "") + " or a tuple of them, one per grid dimension"
    return Param(name, default, doc, (int, tuple, list), check, what)


def _grid_coords(pos, grid) -> list:
    """Row-major grid coordinates of flat positions (last dimension fastest)."""
    out = []
    for size in reversed(grid):
        out.append(pos % size)
        pos = pos // size
    return out[::-1]


def _grid_flat(coords, grid):
    pos = coords[0]
    for c, size in zip(coords[1:], grid[1:]):
        pos = pos * size + c
    return pos


def _grid_intervals(first: list, count: list, grid, step: list) -> list | None:
    """Key intervals of a box of grid tokens: along dimension i the coordinates first[i] + step[i] * j for j in
    range(count[i]), kept where inside [0, grid[i]). Rows of the box along the last dimension are contiguous when
    its step is 1, so a box costs one interval per row; otherwise one per token. None past MAX_INTERVALS."""
    contiguous = step[-1] == 1
    lead = len(grid) - 1 if contiguous else len(grid)
    if math.prod(count[:lead]) > MAX_INTERVALS:
        return None
    out = []
    for offsets in itertools.product(*(range(n) for n in count[:lead])):
        coords = [first[i] + step[i] * j for i, j in enumerate(offsets)]
        inside = functools.reduce(torch.logical_and, [(c >= 0) & (c < size) for c, size in zip(coords, grid)],
                                  torch.ones_like(first[0], dtype=torch.bool))
        if contiguous:
            lo = _grid_flat(coords + [first[-1].clamp(min=0)], grid)
            hi = _grid_flat(coords + [(first[-1] + count[-1]).clamp(max=grid[-1]) - 1], grid) + 1
        else:
            lo = _grid_flat(coords, grid)
            hi = lo + 1
        out.append((torch.where(inside, lo, 0), torch.where(inside, hi, 0)))
    return out


class _Grid(SoftmaxVariant):
    """Tokens laid out row-major on a 1-3D grid: self-attention only, Sq == Sk == prod(grid).

    causal=True adds causality in the flattened (row-major) token order on top of the grid mask.
    """

    patterns = SELF_PATTERNS
    has_mask = True
    per_dim: tuple[str, ...] = ()

    def validate_config(self) -> None:
        grid = self.config["grid"]
        for name in self.per_dim:
            v = self.config[name]
            if isinstance(v, (tuple, list)) and len(v) != len(grid):
                raise ValueError(f"{self.name}: parameter {name!r} has {len(v)} entries but grid {tuple(grid)} has "
                                 f"{len(grid)} dimensions; give one per dimension or a single value")

    def validate_call(self, call: Call) -> None:
        _check_grid(self.name, self.config["grid"], call.shapes)

    def dims(self, name: str) -> tuple:
        """A per-dimension parameter as one value per grid dimension."""
        v = self.config[name]
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * len(self.config["grid"])


def _check_grid(variant: str, grid, shapes) -> None:
    s = math.prod(grid)
    if shapes.sq != s or shapes.sk != s:
        raise ValueError(f"{variant}: grid {tuple(grid)} holds {s} tokens, but Sq={shapes.sq}, Sk={shapes.sk}; "
                         "the grid's product must equal the sequence length S")


def _natten_window(q, length: int, kernel: int, dilation: int, causal: bool):
    """NATTEN's window along one axis for query coordinate q: its dilation group, and the first in-group index
    of its window, which spans [first, first + kernel) in the group's own coordinates (index // dilation)."""
    group = q % dilation
    qi = q // dilation
    if causal:
        return group, qi - kernel + 1  # ends at the query; cut (not shifted) at the start
    group_len = (length - group + dilation - 1) // dilation
    # centred on the query, shifted inward near the borders so it always holds `kernel` tokens
    centre = torch.minimum(qi.clamp(min=kernel // 2), group_len - 1 - kernel // 2)
    return group, centre - kernel // 2


@register
class Neighborhood(_Grid):
    name = "neighborhood"
    summary = ("Neighborhood attention (NATTEN): each token sees the kernel_size nearest tokens of its dilation group "
               "along every grid axis; windows near borders are shifted inward, never truncated (causal axes end at "
               "the query).")
    paper = Paper("Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
                  2024, "2403.04690")
    params = (
        _grid_param((14, 14)),
        _per_dim("kernel_size", 7, "window size per grid axis (odd); kernel_size * dilation must be <= the axis", 1,
                 odd=True),
        _per_dim("dilation", 1, "dilation per axis: a token sees only tokens at its own index mod dilation", 1),
        Param("is_causal", False, "causal masking per axis (NATTEN's is_causal): the window ends at the query",
              (bool, tuple, list), lambda v: isinstance(v, bool) or (
                  isinstance(v, (tuple, list)) and 0 < len(v) <= 3 and all(isinstance(x, bool) for x in v)),
              "a bool or a tuple of bools, one per grid dimension"),
    )
    per_dim = ("kernel_size", "dilation", "is_causal")
    cost = "O(S prod(kernel_size) D) useful work; tiles holding no neighbour are skipped"

    def validate_config(self) -> None:
        super().validate_config()
        for size, k, d in zip(self.config["grid"], self.dims("kernel_size"), self.dims("dilation")):
            if k * d > size:
                raise ValueError(f"{self.name}: kernel_size * dilation must be <= the grid along every axis, got "
                                 f"kernel_size={self.config['kernel_size']}, dilation={self.config['dilation']}, "
                                 f"grid={tuple(self.config['grid'])}")

    def _axes(self):
        return zip(self.config["grid"], self.dims("kernel_size"), self.dims("dilation"), self.dims("is_causal"))

    def mask(self, call, b, h, q_pos, kv_pos):
        grid = self.config["grid"]
        m = None
        for q, k, (size, kernel, dilation, causal) in zip(_grid_coords(q_pos, grid), _grid_coords(kv_pos, grid),
                                                          self._axes()):
            group, first = _natten_window(q, size, kernel, dilation, causal)
            ki = k // dilation
            axis = (k % dilation == group) & (ki >= first) & (ki < first + kernel)
            m = axis if m is None else m & axis
        return m

    def kv_intervals(self, call, q_pos):
        grid = self.config["grid"]
        firsts, counts, steps = [], [], []
        for q, (size, kernel, dilation, causal) in zip(_grid_coords(_rows(q_pos), grid), self._axes()):
            group, first = _natten_window(q, size, kernel, dilation, causal)
            firsts.append(group + dilation * first)  # back to grid coordinates
            counts.append(kernel)
            steps.append(dilation)
        return _grid_intervals(firsts, counts, grid, steps)


@register
class SwinWindow(_Grid):
    name = "swin_window"
    summary = ("Swin Transformer's (shifted) window attention on the original token order: tokens attend within "
               "their window of the grid cyclically shifted by `shift`, and tokens wrapped around by the shift never "
               "attend to the tokens they land next to.")
    paper = Paper("Flash Window Attention: speedup the attention computation for Swin Transformer", 2025,
                  "2501.06480")
    params = (
        _grid_param((14, 14)),
        _per_dim("window", 7, "window size per grid axis; must divide the grid", 1),
        _per_dim("shift", 0, "cyclic shift per axis, 0 <= shift < window (Swin's shifted blocks use window // 2)", 0),
    )
    per_dim = ("window", "shift")
    cost = "O(S prod(window) D) time: only tiles overlapping a window are computed"

    def validate_config(self) -> None:
        super().validate_config()
        grid = tuple(self.config["grid"])
        for size, w, s in zip(grid, self.dims("window"), self.dims("shift")):
            if size % w:
                raise ValueError(f"{self.name}: parameter 'window' must divide the grid along every axis, "
                                 f"got window={self.config['window']}, grid={grid}")
            if s >= w:
                raise ValueError(f"{self.name}: parameter 'shift' must be < window along every axis, "
                                 f"got shift={self.config['shift']}, window={self.config['window']}")

    # Rolling the grid back by s and cutting windows of w, then masking pairs from different pre-roll regions
    # (Swin's attn_mask), groups coordinate x by floor((x - s) / w): the wrapped tokens x < s form group -1.
    def mask(self, call, b, h, q_pos, kv_pos):
        grid = self.config["grid"]
        m = None
        for q, k, w, s in zip(_grid_coords(q_pos, grid), _grid_coords(kv_pos, grid), self.dims("window"),
                              self.dims("shift")):
            axis = (q - s) // w == (k - s) // w
            m = axis if m is None else m & axis
        return m

    def kv_intervals(self, call, q_pos):
        grid = self.config["grid"]
        windows, shifts = self.dims("window"), self.dims("shift")
        firsts = [((q - s) // w) * w + s for q, w, s in zip(_grid_coords(_rows(q_pos), grid), windows, shifts)]
        return _grid_intervals(firsts, list(windows), grid, [1] * len(grid))


@register
class Halo(_Grid):
    name = "halo"
    summary = ("Blocked local attention with a halo (HaloNet; 1-D: TKL's overlapping windows): queries in each "
               "non-overlapping block see the block grown by `halo` on every side, cut at the grid border.")
    paper = Paper("Scaling Local Self-Attention for Parameter Efficient Visual Backbones", 2021, "2103.12731")
    params = (
        _grid_param((16, 16)),
        _per_dim("block", 8, "query block size per grid axis; must divide the grid", 1),
        _per_dim("halo", 3, "halo width per axis: extra keys on each side of the block", 0),
    )
    per_dim = ("block", "halo")
    budget_param = "halo"
    cost = "O(S prod(block + 2 halo) D) time"

    def validate_config(self) -> None:
        super().validate_config()
        grid = tuple(self.config["grid"])
        if any(size % b for size, b in zip(grid, self.dims("block"))):
            raise ValueError(f"{self.name}: parameter 'block' must divide the grid along every axis, "
                             f"got block={self.config['block']}, grid={grid}")

    def mask(self, call, b, h, q_pos, kv_pos):
        grid = self.config["grid"]
        m = None
        for q, k, blk, halo in zip(_grid_coords(q_pos, grid), _grid_coords(kv_pos, grid), self.dims("block"),
                                   self.dims("halo")):
            start = (q // blk) * blk - halo
            axis = (k >= start) & (k < start + blk + 2 * halo)
            m = axis if m is None else m & axis
        return m

    def kv_intervals(self, call, q_pos):
        grid = self.config["grid"]
        blocks, halos = self.dims("block"), self.dims("halo")
        firsts = [(q // blk) * blk - halo for q, blk, halo in zip(_grid_coords(_rows(q_pos), grid), blocks, halos)]
        return _grid_intervals(firsts, [blk + 2 * halo for blk, halo in zip(blocks, halos)], grid, [1] * len(grid))


def _window_pool(x: torch.Tensor, grid, window: int) -> torch.Tensor:
    """Average-pool (B, H, S, D) tokens of a row-major grid over non-overlapping windows -> (B, H, S / window^n, D)."""
    b, h, _, d = x.shape
    split = [n for size in grid for n in (size // window, window)]
    x = x.reshape(b, h, *split, d)
    x = x.mean(dim=tuple(3 + 2 * i for i in range(len(grid))))
    return x.reshape(b, h, -1, d)


def _kv_heads_for(t: torch.Tensor, h0: int, h1: int, group: int) -> torch.Tensor:
    """The kv heads read by query heads [h0, h1): a slice keeping GQA when the range is whole groups."""
    if h0 % group == 0 and h1 % group == 0:
        return t[:, h0 // group:h1 // group]
    return t[:, torch.arange(h0, h1, device=t.device) // group]


@register
class HiLo(Variant):
    name = "hilo"
    family = "masks"
    summary = ("HiLo (LITv2): the first heads (Hi-Fi) attend within non-overlapping window x window blocks of the "
               "grid; the last int(H * alpha) heads (Lo-Fi) attend to keys/values average-pooled over those windows.")
    paper = Paper("Fast Vision Transformers with HiLo Attention", 2022, "2205.13213")
    patterns = (NONCAUSAL_SELF,)
    params = (
        _grid_param((14, 14)),
        positive_int("window", 2, "s: Hi-Fi window and Lo-Fi pooling size along every axis (must divide the grid); "
                                  "1 makes every head Lo-Fi, i.e. full attention, as in LITv2"),
        Param("alpha", 0.5, "share of Lo-Fi heads: the last int(Hq * alpha) query heads", (int, float),
              lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    )
    cost = "Hi-Fi: O(S window^n D); Lo-Fi: O(S^2 D / window^n); no S x S tensor"

    def __init__(self, **params) -> None:
        super().__init__(**params)
        c = self.config
        self._local = SwinWindow(grid=tuple(c["grid"]), window=c["window"])
        self._full = Full()

    def validate_config(self) -> None:
        grid = tuple(self.config["grid"])
        if any(size % self.config["window"] for size in grid):
            raise ValueError(f"{self.name}: parameter 'window' must divide the grid along every axis, "
                             f"got window={self.config['window']}, grid={grid}")

    def validate_call(self, call: Call) -> None:
        _check_grid(self.name, self.config["grid"], call.shapes)

    def hifi_heads(self, heads: int) -> int:
        if self.config["window"] == 1:
            return 0
        return heads - int(heads * self.config["alpha"])

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return _window_pool(x, self.config["grid"], self.config["window"])

    def _reference(self, q, k, v, call: Call) -> torch.Tensor:
        from ..core.reference import masked_softmax_attention, repeat_kv

        heads = call.shapes.q_heads
        hi = self.hifi_heads(heads)
        k, v = repeat_kv(k, heads), repeat_kv(v, heads)
        s = call.shapes.sq
        outs = []
        if hi:
            window_mask = self._local.dense_mask(s, s, device=q.device)
            outs.append(masked_softmax_attention(q[:, :hi], k[:, :hi], v[:, :hi], call.scale, window_mask))
        if hi < heads:
            outs.append(masked_softmax_attention(q[:, hi:], self.pool(k[:, hi:]), self.pool(v[:, hi:]), call.scale))
        return torch.cat(outs, dim=1)

    def forward_torch(self, q, k, v, call: Call) -> torch.Tensor:
        heads = call.shapes.q_heads
        hi = self.hifi_heads(heads)
        outs = []
        if hi:
            outs.append(_heads_through(self._local, q, k, v, 0, hi, call))
        if hi < heads:
            outs.append(_heads_through(self._full, q, self.pool(k), self.pool(v), hi, heads, call))
        return torch.cat(outs, dim=1)


def _heads_through(variant: SoftmaxVariant, q, k, v, h0: int, h1: int, call: Call) -> torch.Tensor:
    """Query heads [h0, h1), with the kv heads they read, through `variant`'s torch path (non-causal)."""
    group = call.shapes.group
    qp, kp, vp = q[:, h0:h1], _kv_heads_for(k, h0, h1, group), _kv_heads_for(v, h0, h1, group)
    return variant.forward_torch(qp, kp, vp, variant.prepare(qp, kp, vp, False, call.scale, {}))
