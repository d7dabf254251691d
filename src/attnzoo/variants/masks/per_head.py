"""Masks that differ between query heads: multi-scale and dilated windows, shifted chunks, strided shards, HEPOS."""
from __future__ import annotations


import torch

from ...core import blocks as _blocks
from ...core.info import Paper, Param, nonneg_int, positive_int
from ...core.registry import register
from ...core.variant import Call, SoftmaxVariant
from .local import WINDOW_CONVENTION, _optional_nonneg, _rows, _Window

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
        on_host = self.head_value(call, torch.arange(call.shapes.q_heads))  # compared on the CPU: no device sync
        same = bool((on_host == on_host[0]).all())
        values = self.head_value(call, torch.arange(1 if same else call.shapes.q_heads, device=call.device))
        return values.view(1, -1, 1)


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
        return self.window_mask(call, q_pos, kv_pos, window, right)

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
        # t is the key's distance from the query on the head's shifted lattice. Under causality (key <= query, applied
        # by full_mask) a lattice key has t <= 0: the right end adds nothing (fewer ops where tables evaluate tiles)
        d = self.config["dilation"]
        t = kv_pos - q_pos
        if self.config["offsets"] is not None:
            t = t + self.head_value(call, h)
        m = (t % d == 0) & (t >= -self.config["window"] * d)
        return m if call.causal else m & (t <= self._right() * d)

    def block_structure(self, call, q_block, kv_block):
        """The lattice of the head's keys, in one pass (as intervals it would take window + right + 1 passes)."""
        d = self.config["dilation"]
        q_pos = call.shapes.query_positions(device=call.device).view(1, 1, -1)
        shifted = self.config["offsets"] is not None
        base = q_pos - self.head_rows(call) if shifted else q_pos
        lo = base - self.config["window"] * d
        if call.causal and not shifted:
            hi = q_pos + 1  # the window's right part lies past the query
        else:
            hi = base + (self._right() * d + 1)
            if call.causal:
                hi = torch.minimum(hi, q_pos + 1)
        return _blocks.from_lattice(lo, hi, base, d, call.shapes.sq, call.shapes.sk, q_block, kv_block)

    def kv_intervals(self, call, q_pos):
        steps = range(-self.config["window"], self._right() + 1)
        if len(steps) > MAX_INTERVALS:
            return None
        base = _rows(q_pos) - self.head_rows(call)
        return [(base + i * self.config["dilation"], base + i * self.config["dilation"] + 1) for i in steps]

    def lattice(self, call):
        """The mask as `dilation` independent bands, one per residue class of the query positions, or None (one
        class, or heads on different lattices). Queries at positions = rho (mod d) see only keys at positions =
        rho - offset (mod d), so class a of the query indices (a, a + d, ...) with its key class r (r, r + d, ...)
        is a band on the two subsequences, `LatticeBand(lo, hi)`: query i sees key j iff lo <= j - i <= hi.
        Kernels that run each class on its subsequences compute only allowed pairs' tiles (the whole lattice's
        tiles are 1/d allowed). Returns (d, [(a, r, band), ...]) over the classes that hold queries."""
        d, s = self.config["dilation"], call.shapes
        offsets = set(self.head_values(s))
        if d == 1 or len(offsets) != 1:
            return None
        off = offsets.pop()
        hi_steps = 0 if call.causal else self._right()  # causality (key <= query) is t <= off < d: no step right
        classes = []
        for a in range(min(d, s.sq)):
            r = (a + s.offset - off) % d
            # query i of class a sits at a + d i + offset, key j of class r at r + d j: t = key - query + off
            # = d (j - i + e), and the mask is -window <= j - i + e <= right
            e = (r - a - s.offset + off) // d
            classes.append((a, r, LatticeBand(lo=-self.config["window"] - e, hi=hi_steps - e)))
        return d, classes


class LatticeBand(SoftmaxVariant):
    """One residue class of a dilated window (`DilatedWindow.lattice`), as kernels run it on the class's query and
    key subsequences: query i sees key j iff lo <= j - i <= hi. Internal: not registered."""

    name = "lattice_band"
    family = "masks"
    has_mask = True
    params = (Param("lo", 0, "smallest j - i allowed", (int,)), Param("hi", 0, "largest j - i allowed", (int,)))

    def mask(self, call, b, h, q_pos, kv_pos):
        rel = kv_pos - (q_pos - call.shapes.offset)
        return (rel >= self.config["lo"]) & (rel <= self.config["hi"])

    def kv_intervals(self, call, q_pos):
        i = _rows(q_pos) - call.shapes.offset
        return [(i + self.config["lo"], i + self.config["hi"] + 1)]


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
        relative = self.relative(call)
        # Relative shards are counted from each query's band; queries before key 0 (Sq > Sk, non-causal)
        # sit up to Sq - Sk positions further from the keys.
        span = sk + (max(0, call.shapes.sq - sk) + bs if relative else 0)
        n_shard_blocks = -(-span // (bs * stride))
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
