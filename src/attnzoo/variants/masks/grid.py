"""Masks of tokens on a 1-3D grid (images, video): neighborhoods, Swin windows, halos, HiLo."""
from __future__ import annotations

import math

import torch

from ...core.info import CAUSAL_SELF, NONCAUSAL_SELF, Paper, Param, positive_int
from ...core.blocks import StackedIntervals, steps
from ...core.dispatch import run
from ...core.registry import register
from ...core.variant import Call, SoftmaxVariant, Variant
from .local import Full, _rows
from .per_head import MAX_INTERVALS, _is_int, _int_seq

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
    """Row-major grid coordinates of flat positions in [0, prod(grid)) (last dimension fastest; the first needs no
    wrap, an op fewer where kernel tables evaluate masks tile by tile)."""
    out = []
    for size in reversed(grid[1:]):
        out.append(pos % size)
        pos = pos // size
    out.append(pos)
    return out[::-1]


def _grid_intervals(first: list, count: list, grid, step: list, inside: bool = False) -> list | None:
    """Key intervals of a box of grid tokens: along dimension i the coordinates first[i] + step[i] * j for j in
    range(count[i]), kept where inside [0, grid[i]). Rows of the box along the last dimension are contiguous when
    its step is 1, so a box costs one interval per row; otherwise one per token. None past MAX_INTERVALS.
    All rows of the box at once (each dimension of the box on a leading axis), in row-major order of the box.
    `inside`: the caller knows every box lies inside the grid (nothing to cut)."""
    contiguous = step[-1] == 1
    lead = len(grid) - 1 if contiguous else len(grid)
    n = math.prod(count[:lead])
    if n > MAX_INTERVALS:
        return None
    rows, kept = None, None  # flat position of the box's row start (last dimension excluded when contiguous)
    for i in range(lead):
        j = steps(0, count[i] * step[i], step[i], first[i].device)
        c = first[i] + j.view(*(-1 if a == i else 1 for a in range(lead)), *(1,) * first[i].dim())
        if not inside:
            ok = (c >= 0) & (c < grid[i])
            kept = ok if kept is None else kept & ok
        rows = c if rows is None else rows * grid[i] + c
    if contiguous and inside:  # each row of the box: count[-1] keys from its start
        lo = first[-1] if rows is None else rows * grid[-1] + first[-1]
        hi = lo + count[-1]
    elif contiguous:
        lo, hi = first[-1].clamp(min=0), (first[-1] + count[-1]).clamp(max=grid[-1])
        if rows is not None:
            rows = rows * grid[-1]
            lo, hi = rows + lo, rows + hi
    else:
        lo, hi = rows, rows + 1
    if kept is not None:  # rows of the box outside the grid: empty intervals
        lo, hi = lo * kept, hi * kept
    shape = first[0].shape
    return StackedIntervals(lo.reshape(n, *shape), hi.reshape(n, *shape), count[-1] if contiguous else 1)


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
    if dilation == 1:  # one group, coordinates as they are: the same window in two ops (tables evaluate it per tile)
        return 0, (q - (kernel - 1) if causal else (q - kernel // 2).clamp(0, length - 1 - 2 * (kernel // 2)))
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
            if dilation == 1:
                axis = (k >= first) & (k < first + kernel)
            else:
                ki = k // dilation
                axis = (k % dilation == group) & (ki >= first) & (ki < first + kernel)
            m = axis if m is None else m & axis
        return m

    def kv_intervals(self, call, q_pos):
        grid = self.config["grid"]
        firsts, counts, dilations = [], [], []
        for q, (size, kernel, dilation, causal) in zip(_grid_coords(_rows(q_pos), grid), self._axes()):
            group, first = _natten_window(q, size, kernel, dilation, causal)
            firsts.append(first if dilation == 1 else group + dilation * first)  # back to grid coordinates
            counts.append(kernel)
            dilations.append(dilation)
        # windows of non-causal axes are shifted inward: inside the grid
        return _grid_intervals(firsts, counts, grid, dilations, inside=not any(self.dims("is_causal")))


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
        from ...core.reference import masked_softmax_attention, repeat_kv

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
    return run(variant, qp, kp, vp, variant.prepare(qp, kp, vp, False, call.scale, {}), "torch")
