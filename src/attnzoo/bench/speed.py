"""Speed and memory of one attention call, forward and forward+backward, on CPU or CUDA.

Time: the median of repeated calls after a warm-up (the first call, which compiles kernels and
builds block masks, is reported apart as `first_ms`). CUDA: CUDA events around each call; CPU:
time.perf_counter. Memory, read around the first timed call (counters reset before its clock
starts): CUDA: torch.cuda.max_memory_allocated above what was allocated before the call. CPU: the peak resident memory above the resident memory before the call, read
from VmHWM in /proc/self/status after resetting it through /proc/self/clear_refs, with
malloc_trim(0) first so pages freed by earlier calls are returned and cannot hide a new peak. It
counts everything the process touches, kernels' own buffers included (tracemalloc sees none of
torch's memory).

Work: `pairs` counts the (query, key) pairs the variant's mask allows, over batch and heads, so
TFLOP/s count only unmasked work: 2 (D + Dv) FLOPs a pair forward, 3.5 times that forward and
backward (FlashAttention's convention). Variants with no mask count all pairs under causality.

Paths (a row's `backend`): an attnzoo backend (`torch`, `sdpa`, `flex`; `torch` records which of its
paths ran, `fused` or `tiles`), `torch:tiles` (the torch backend forced onto its online-softmax
engine, to show what the fused path gains), and the anchors measured in the same run: `sdpa`
rows of `full` (PyTorch's exact attention, no mask tensor) and, per variant, `sdpa_mask`: what a
CPU user would otherwise write, `F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)` with
the variant's (Sq, Sk) boolean mask built before the timed calls (as a model reusing it across
layers would; its size is `mask_mib`).

Only torch and attnzoo are imported here, so benchmarks/gpu_bench.py runs on a bare GPU machine.
"""
from __future__ import annotations

import contextlib
import ctypes
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.api import get
from . import cases

MODES = ("fwd", "fwd+bwd")
TILES = "torch:tiles"  # the torch backend forced onto its online-softmax engine
SDPA_MASK = "sdpa_mask"  # F.scaled_dot_product_attention with the variant's dense boolean mask
PATH_ROWS = (TILES, SDPA_MASK)
BWD_FLOP_FACTOR = 3.5
# Anchors: PyTorch's own kernels computing exact (full) attention, measured in the same run.
SDPA_KERNELS = {"sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_flash": "FLASH_ATTENTION"}


@dataclass(frozen=True)
class Geometry:
    """Head layout of the timed calls: q (batch, q_heads, Sq, head_dim), k/v (batch, kv_heads, Sk, head_dim)."""

    batch: int = 1
    q_heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64


@dataclass
class Timing:
    repeats: int = 5
    min_repeats: int = 3
    max_seconds: float = 0.5  # stop repeating past this much timed work (after min_repeats)
    warmup: int = 1
    slow_ms: float | None = None  # a first call at least this slow: one timed call is enough


@dataclass
class Row:
    """One timed configuration; `backend` is an attnzoo backend or an SDPA_KERNELS anchor."""

    variant: str
    backend: str
    pattern: str
    length: int
    mode: str
    params: dict = field(default_factory=dict)
    keep_target: float | None = None  # the share of the keys `params` were chosen to keep (cases.budget_for)

    @property
    def key(self) -> tuple:
        return self.variant, self.backend, self.pattern, self.length, self.mode, tuple(sorted(self.params.items()))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, timing: Timing) -> tuple[float, list[float]]:
    """(first call ms, timed samples ms) of `fn` after `timing.warmup` untimed calls (the first timed apart)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(timing.warmup - 1):
        fn()
    samples: list[float] = []
    while len(samples) < timing.repeats:
        samples.append(_one_call_ms(fn, device))
        if len(samples) >= timing.min_repeats and sum(samples) > timing.max_seconds * 1e3:
            break
    return first, samples


def time_and_peak(fn, device: torch.device, timing: Timing) -> tuple[float, list[float], float | None]:
    """(first call ms, timed samples ms, extra peak MiB): `time_ms`, with the peak memory read around
    the first timed sample (after the warm-up, so nothing built once is counted) instead of in a call
    of its own; the peak counters are reset before that sample's clock starts."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(timing.warmup - 1):
        fn()
    samples: list[float] = []
    peak = None
    while len(samples) < max(timing.repeats, 1):
        if not samples:
            state = _peak_start(device)
            samples.append(_one_call_ms(fn, device))
            peak = _peak_end(device, state)
        else:
            samples.append(_one_call_ms(fn, device))
        enough = 1 if timing.slow_ms is not None and first >= timing.slow_ms else timing.min_repeats
        if len(samples) >= enough and sum(samples) > timing.max_seconds * 1e3:
            break
    return first, samples, peak


def _one_call_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# ---- memory -------------------------------------------------------------------------------------

CPU_MEMORY_METHOD = ("peak resident memory above the call's start (VmHWM reset through /proc/self/clear_refs, "
                     "malloc_trim(0) first)")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated above the memory allocated before the call"


def memory_method(device: torch.device) -> str:
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


def peak_mib(fn, device: torch.device) -> float | None:
    """Extra peak memory of one call of `fn`, MiB; None where it cannot be measured."""
    state = _peak_start(device)
    fn()
    return _peak_end(device, state)


def _peak_start(device: torch.device):
    """Reset the peak counters; the baseline to subtract (None: no measurement on this device)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if device.type != "cpu" or not _reset_peak_rss():
        return None
    return _status_kib("VmRSS")


def _peak_end(device: torch.device, base) -> float | None:
    if base is None:
        return None
    if device.type == "cuda":
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return max(0, _status_kib("VmHWM") - base) / 1024


def _reset_peak_rss() -> bool:
    # No gc.collect(): tensors are freed by reference counting, and a collection with a model
    # loaded costs ~0.1 s a row.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# ---- work counted ---------------------------------------------------------------------------------


_pairs_memo: dict = {}


def allowed_pairs(attn, geometry: Geometry, causal: bool, sq: int, sk: int, inputs: dict, device) -> tuple[int, str]:
    """(number of allowed (query, key) pairs over batch and heads, how it was counted).

    Remembered per configuration and shape: the bench's inputs are a function of the shape."""
    key = (attn.key, geometry, causal, sq, sk, str(device), tuple(sorted(inputs)))
    if key not in _pairs_memo:
        _pairs_memo[key] = _count_pairs(attn, geometry, causal, sq, sk, inputs, device)
    return _pairs_memo[key]


def _count_pairs(attn, geometry: Geometry, causal: bool, sq: int, sk: int, inputs: dict, device) -> tuple[int, str]:
    b, h = geometry.batch, geometry.q_heads
    full_mask = getattr(attn, "full_mask", None)
    if full_mask is None:
        return b * h * _causal_pairs(causal, sq, sk), "all pairs under causality (variant has no mask)"
    one = torch.empty(1, device=device)  # shapes alone matter: expanded views allocate nothing
    dummy_k = one.expand(b, geometry.kv_heads, sk, geometry.head_dim)
    call = attn.prepare(one.expand(b, h, sq, geometry.head_dim), dummy_k, dummy_k, causal, None, inputs)
    bi = torch.arange(b, device=device).view(-1, 1, 1, 1)
    hi = torch.arange(h, device=device).view(1, -1, 1, 1)
    kv = torch.arange(sk, device=device).view(1, 1, 1, -1)
    rows = max(1, (1 << 24) // max(sk * h * b, 1))
    total = 0
    for q0 in range(0, sq, rows):
        q_pos = (torch.arange(q0, min(q0 + rows, sq), device=device) + sk - sq).view(1, 1, -1, 1)
        m = full_mask(call, bi, hi, q_pos, kv)
        n = q_pos.shape[2]
        total += b * h * n * sk if m is None else int(torch.broadcast_to(m, (b, h, n, sk)).sum())
    return total, "pairs the mask allows"


def _causal_pairs(causal: bool, sq: int, sk: int) -> int:
    if not causal:
        return sq * sk
    off = sk - sq
    return sum(min(sk, i + off + 1) for i in range(sq))


def tflops(pairs: int, geometry: Geometry, mode: str, ms: float) -> float:
    flops = pairs * 2 * 2 * geometry.head_dim * (BWD_FLOP_FACTOR if mode == "fwd+bwd" else 1.0)
    return flops / (ms * 1e-3) / 1e12


# ---- one row --------------------------------------------------------------------------------------


def make_qkv(geometry: Geometry, sq: int, sk: int, dtype, device, generator: torch.Generator,
             captured: tuple | None = None) -> tuple[tuple, str]:
    """((q, k, v), source): slices of captured activations when they cover the shape, else Gaussian."""
    g = geometry
    if captured is not None:
        cq, ck, cv = captured
        if (cq.shape[0], cq.shape[1], ck.shape[1], cq.shape[3]) == (g.batch, g.q_heads, g.kv_heads, g.head_dim) \
                and ck.shape[2] >= sk:
            return tuple(t.to(device=device, dtype=dtype) for t in (cq[:, :, sk - sq:sk], ck[:, :, :sk], cv[:, :, :sk])), \
                "captured"
    shapes = ((g.batch, g.q_heads, sq, g.head_dim), (g.batch, g.kv_heads, sk, g.head_dim),
              (g.batch, g.kv_heads, sk, g.head_dim))
    return tuple(_randn(s, generator, device).to(dtype) for s in shapes), "gaussian"


def _randn(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Drawn where the generator lives, so long inputs on a GPU are not made on the CPU first."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _kernel_context(backend: str):
    if backend not in SDPA_KERNELS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_KERNELS[backend])])


def _context(backend: str):
    if backend == TILES:
        from ..backends.torch_blockwise import use_path

        return use_path("tiles")
    return _kernel_context(backend)


def dense_mask(attn, q, k, causal: bool, inputs: dict) -> torch.Tensor:
    """The variant's allowed pairs as one boolean tensor (B|1, Hq|1, Sq, Sk), from its mask function."""
    if not getattr(attn, "has_mask", False) or getattr(attn, "has_score", False) or getattr(attn, "carries", False) \
            or getattr(attn, "normalization", "softmax") != "softmax":
        raise cases.Unrunnable(f"{attn.info.name}: {SDPA_MASK} needs a softmax variant defined by a mask alone")
    call = attn.prepare(q, k, k, causal, None, inputs)
    s = call.shapes
    b = torch.arange(s.batch, device=q.device).view(-1, 1, 1, 1)
    h = torch.arange(s.q_heads, device=q.device).view(1, -1, 1, 1)
    q_pos = (torch.arange(s.sq, device=q.device) + s.offset).view(1, 1, -1, 1)
    m = attn.full_mask(call, b, h, q_pos, torch.arange(s.sk, device=q.device).view(1, 1, 1, -1))
    return m.expand(*m.shape[:2], s.sq, s.sk).contiguous()


def _runner(attn, backend: str, q, k, v, causal: bool, inputs: dict, mode: str, mask: torch.Tensor | None = None):
    """A no-argument function running one call (and its backward for fwd+bwd); `mask` for SDPA_MASK rows."""
    call_backend = "sdpa" if backend in SDPA_KERNELS else "torch" if backend == TILES else backend
    if backend == SDPA_MASK:
        import torch.nn.functional as F

        mask = dense_mask(attn, q, k, causal, inputs) if mask is None else mask
        group = q.shape[1] // k.shape[1]

        def call(q_, k_, v_):
            return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, enable_gqa=group > 1)
    else:
        def call(q_, k_, v_):
            return attn(q_, k_, v_, causal=causal, backend=call_backend, **inputs)

    if mode == "fwd":
        def fwd():
            with torch.no_grad(), _context(backend):
                call(q, k, v)

        return fwd
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    grad = _randn(q.shape[:3] + (v.shape[3],), torch.Generator(q.device).manual_seed(1), q.device).to(q.dtype)

    def fwd_bwd():
        with _context(backend):
            call(*leaves).backward(grad)
        for t in leaves:  # freed here, so the next call starts from the inputs alone
            t.grad = None

    return fwd_bwd


def path_of(attn, backend: str, q, k, v, causal: bool, inputs: dict) -> str | None:
    """Which code a row ran: for the torch backend its path (fused / tiles) or the variant's own."""
    if backend == TILES:
        return "tiles"
    if backend != "torch":
        return None
    from ..backends import torch_blockwise
    from ..core.variant import SoftmaxVariant

    if not isinstance(attn, SoftmaxVariant):
        return "own"  # the variant's own torch code (selection, linear, pooled heads)
    return torch_blockwise.path_for(attn, attn.prepare(q, k, v, causal, None, inputs), q)[0]


def measure(row: Row, geometry: Geometry, dtype: torch.dtype, device: torch.device, timing: Timing,
            captured: tuple | None = None, seed: int = 0) -> dict:
    """Everything measured for one row; failures are recorded in `error`, never raised."""
    out = {**row.__dict__, "batch": geometry.batch, "q_heads": geometry.q_heads, "kv_heads": geometry.kv_heads,
           "head_dim": geometry.head_dim, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
           "error": None}
    try:
        causal, sq, sk = cases.pattern_shape(row.pattern, row.length)
        attn = cases.configure(row.variant, sk, row.params) if row.backend not in SDPA_KERNELS else get("full")
        g = torch.Generator(device).manual_seed(seed)
        (q, k, v), source = make_qkv(geometry, sq, sk, dtype, device, g, captured)
        inputs = cases.make_inputs(attn, q, k, v, g)
        out["path"] = path_of(attn, row.backend, q, k, v, causal, inputs)
        mask = None
        if row.backend == SDPA_MASK:
            mask = dense_mask(attn, q, k, causal, inputs)
            out["mask_mib"] = mask.numel() / 2**20
        fn = _runner(attn, row.backend, q, k, v, causal, inputs, row.mode, mask)
        first, samples, peak = time_and_peak(fn, device, timing)
        median = statistics.median(samples)
        pairs, basis = allowed_pairs(attn, geometry, causal, sq, sk, inputs, device)
        out.update(sq=sq, sk=sk, inputs=source, first_ms=first, median_ms=median, samples_ms=samples,
                   peak_mib=peak, pairs=pairs, pairs_basis=basis,
                   tflops=tflops(pairs, geometry, row.mode, median))
    except Exception as e:  # recorded with its reason; the bench goes on
        out["error"] = f"{type(e).__name__}: {e}".strip()[:500]
    return out


ANCHORS = ("sdpa",) + tuple(SDPA_KERNELS)
# CPU peak memory is read in KiB pages; below this many MiB a ratio would divide noise by noise.
MEMORY_FLOOR_MIB = 0.25


def add_ratios(results: list[dict]) -> None:
    """Time and memory of each row as ratios to the anchors measured in the same run, same pattern,
    length and mode: `time_vs_<anchor>` for SDPA and its kernels (exact attention, no mask),
    `time_vs_sdpa_mask` / `memory_vs_sdpa_mask` to SDPA with the same configuration's dense boolean
    mask, `time_vs_tiles` to the same configuration on the torch engine's tiles, `time_vs_flex` to
    the same variant on compiled Flex, `time_vs_flex_full` to exact attention on compiled Flex,
    `memory_vs_sdpa`. None where the anchor is missing."""
    ok = [r for r in results if r["error"] is None]
    by_key = {(r["variant"], r["backend"], r["pattern"], r["length"], r["mode"], _frozen(r["params"])): r for r in ok}
    for r in results:
        shape = (r["pattern"], r["length"], r["mode"])
        mine_key = (*shape, _frozen(r["params"]))
        base = {a: by_key.get(("full", a, *shape, ())) for a in ANCHORS}
        base["sdpa_mask"] = by_key.get((r["variant"], SDPA_MASK, *mine_key))
        base["tiles"] = by_key.get((r["variant"], TILES, *mine_key))
        base["flex"] = by_key.get((r["variant"], "flex", *mine_key))
        base["flex_full"] = by_key.get(("full", "flex", *shape, ()))
        mine = r["error"] is None
        for name, anchor in base.items():
            r[f"time_vs_{name}"] = r["median_ms"] / anchor["median_ms"] if mine and anchor else None
        for name in ("sdpa", "sdpa_mask"):
            a = base[name]
            r[f"memory_vs_{name}"] = (max(r["peak_mib"], MEMORY_FLOOR_MIB) / max(a["peak_mib"], MEMORY_FLOOR_MIB)
                                      if mine and a and a["peak_mib"] is not None and r["peak_mib"] is not None
                                      else None)


def _frozen(params: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
