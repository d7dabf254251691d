"""The kernel tables' build (backends/triton/tables.py, vectorised to few torch ops) against a plain build written
here from the dense mask: every field of the Layout identical (torch.equal, dtypes and contiguity too), for every
structured variant, pattern, GQA, batch-dependent inputs, per-head masks, lengths off the tile grid, Sq != Sk, and
the forward and backward tile shapes. Also: the structure helpers of core/blocks.py against their plain per-interval
definition, and a build's one device sync."""
from __future__ import annotations

import pytest
import torch
from harness import qkv
from torch.utils._python_dispatch import TorchDispatchMode

import attnzoo as az
from attnzoo.backends.triton import blocksparse as bs
from attnzoo.core import blocks

FIELDS = ("full_num", "full_idx", "part_num", "part_idx", "part_tile", "bits", "t_full_num", "t_full_idx",
          "t_part_num", "t_part_idx", "t_part_tile")


def _ids(b, s, cuts):
    ids = torch.zeros(b, s, dtype=torch.long)
    for c in cuts:
        ids[:, c:] += 1
    return ids


def _plain_lists(full, part, tile_id):
    """Per row (..., n): the count, the ascending indices of the set flags (zeros after), and the ids of the
    partial tiles there (after the count: the id of the row's first tile), one row at a time."""
    n = full.shape[-1]
    full, part, tile_id = full.reshape(-1, n), part.reshape(-1, n), tile_id.reshape(-1, n)
    out = {k: torch.zeros(full.shape[0], *([n] if k != "num" else []), dtype=torch.int32)
           for k in ("full_num", "full_idx", "part_num", "part_idx", "part_tile")}
    for r in range(full.shape[0]):
        f, p = full[r].nonzero().flatten(), part[r].nonzero().flatten()
        out["full_num"][r], out["part_num"][r] = len(f), len(p)
        out["full_idx"][r, :len(f)], out["part_idx"][r, :len(p)] = f, p
        out["part_tile"][r] = tile_id[r, 0]
        out["part_tile"][r, :len(p)] = tile_id[r, p]
    for k in ("full_num", "part_num"):
        out[k] = out[k][:, 0]
    return out


def plain_layout(attn, call, given: dict, block_m: int, block_n: int) -> dict:
    """The Layout's fields from the variant's block structure and its dense mask, tile by tile."""
    s = call.shapes
    struct = attn.block_structure(call, block_m, block_n)
    bp, hp, nq, nk = struct.any.shape
    full = (struct.full & struct.any).clone()
    if s.sk % block_n:
        full[..., -1] = False
    part = struct.any & ~full
    dense = attn.dense_mask(s.sq, s.sk, causal=call.causal, heads=s.q_heads, kv_heads=s.kv_heads, batch=s.batch,
                            **given).expand(s.batch, s.q_heads, s.sq, s.sk)
    padded = torch.zeros(s.batch, s.q_heads, nq * block_m, nk * block_n, dtype=torch.bool)
    padded[..., :s.sq, :s.sk] = dense
    tiles = part.nonzero().tolist()
    bits = torch.zeros(len(tiles), block_m, block_n // 32, dtype=torch.int32)
    for t, (b, h, i, j) in enumerate(tiles):
        tile = padded[b, h, i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n]
        for w in range(block_n // 32):
            word = sum(tile[:, 32 * w + c].long() << c for c in range(32))
            bits[t, :, w] = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    tile_id = (part.flatten().cumsum(0) - 1).view(part.shape)
    fwd = _plain_lists(full, part, tile_id)
    t = _plain_lists(full.transpose(-1, -2), part.transpose(-1, -2), tile_id.transpose(-1, -2))
    return {**fwd, "bits": bits, **{"t_" + k: v for k, v in t.items()},
            "b_step": hp * nq if bp > 1 else 0, "h_step": nq if hp > 1 else 0,
            "t_b_step": hp * nk if bp > 1 else 0, "t_h_step": nk if hp > 1 else 0}


# name, params, inputs(b, sq, sk), (hq, hkv), patterns (causal, sq, sk)
SELF_AND_CROSS = [(True, 301, 301), (False, 301, 301), (True, 131, 301), (False, 131, 301), (True, 256, 256)]
CASES = [
    ("sliding_window", {"window": 70}, lambda b, sq, sk: {}, (4, 2), SELF_AND_CROSS),
    ("sliding_window", {"window": 512}, lambda b, sq, sk: {}, (2, 2), [(False, 256, 256)]),  # no partial tile
    ("sink_window", {"sinks": 3, "window": 60}, lambda b, sq, sk: {}, (2, 1), SELF_AND_CROSS),
    ("prefix_lm", {"prefix": 77}, lambda b, sq, sk: {}, (2, 2), [(False, 301, 301), (False, 131, 301)]),
    ("document", {}, lambda b, sq, sk: {"document_ids": _ids(b, sk, (23, 160, 161))}, (2, 1), SELF_AND_CROSS),
    ("document", {}, lambda b, sq, sk: {"document_ids": torch.stack([_ids(1, sk, (90,))[0],
                                                                      _ids(1, sk, (30, 200))[0]])}, (2, 2),
     [(True, 301, 301), (False, 256, 256)]),
    ("document", {}, lambda b, sq, sk: {"document_ids": _ids(b, sk, (140,)) % 2 * torch.arange(sk).lt(250)}, (2, 2),
     [(True, 301, 301)]),  # unsorted ids: every key a candidate
    ("block_rag", {}, lambda b, sq, sk: {"block_ids": _ids(b, sk, (100, 170, 250))}, (2, 1),
     [(True, 301, 301), (False, 131, 301)]),
    ("dilated_window", {"window": 30, "dilation": 3, "offsets": "cyclic"}, lambda b, sq, sk: {}, (3, 1),
     SELF_AND_CROSS),
    ("dilated_window", {"window": 20, "dilation": 4, "offsets": [3, 0, 1, 2]}, lambda b, sq, sk: {}, (4, 2),
     SELF_AND_CROSS),
    ("dilated_window", {"window": 40, "dilation": 4}, lambda b, sq, sk: {}, (2, 2), SELF_AND_CROSS),
    ("multi_scale_window", {"window": 90}, lambda b, sq, sk: {}, (4, 2), SELF_AND_CROSS),
    ("strided_shards", {"block_size": 16, "local_blocks": 2, "vert_stride": 3}, lambda b, sq, sk: {}, (4, 2),
     SELF_AND_CROSS),
    ("neighborhood", {"grid": (301,), "kernel_size": 61}, lambda b, sq, sk: {}, (2, 2),
     [(False, 301, 301), (True, 301, 301)]),
    ("neighborhood", {"grid": (16, 24), "kernel_size": 7}, lambda b, sq, sk: {}, (2, 1),
     [(False, 384, 384), (True, 384, 384)]),
    ("neighborhood", {"grid": (14, 21), "kernel_size": (5, 7), "dilation": (1, 2)}, lambda b, sq, sk: {}, (2, 2),
     [(False, 294, 294)]),
    ("neighborhood", {"grid": (4, 6, 10), "kernel_size": 3, "is_causal": (True, False, False)},
     lambda b, sq, sk: {}, (1, 1), [(False, 240, 240)]),
]
TILES = [(128, 64), (64, 128), (32, 32)]


@pytest.mark.parametrize("name,params,inputs,heads,patterns", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_build_equals_the_plain_build(name, params, inputs, heads, patterns):
    attn = az.get(name, **params)
    hq, hkv = heads
    for causal, sq, sk in patterns:
        given = inputs(2, sq, sk)
        if name == "document" and sq != sk:
            given["q_document_ids"] = given["document_ids"][:, -sq:].clone()
        q, k, v = qkv(2, hq, hkv, sq, sk, 8)
        call = attn.prepare(q, k, v, causal, None, dict(given))
        for tiles in TILES:
            lay = bs.build_layout(attn, call, *tiles)
            want = plain_layout(attn, call, given, *tiles)
            for field, value in want.items():
                got = getattr(lay, field)
                if isinstance(value, int):
                    assert got == value, (field, causal, sq, sk, tiles)
                    continue
                assert got.dtype == value.dtype and got.is_contiguous(), (field, causal, sq, sk, tiles)
                assert torch.equal(got, value), (field, causal, sq, sk, tiles)


@pytest.mark.parametrize("case", [CASES[4], CASES[9], CASES[14]], ids=["document", "dilated", "2d"])
def test_one_direction_of_lists(case):
    """lists="forward" / "transposed" (what the forward and dQ kernels / the dK/dV kernel read): those fields and
    the bits as in the full build, the other direction's lists empty."""
    name, params, inputs, heads, patterns = case
    attn = az.get(name, **params)
    causal, sq, sk = patterns[-1]
    q, k, v = qkv(2, *heads, sq, sk, 8)
    call = attn.prepare(q, k, v, causal, None, inputs(2, sq, sk))
    for tiles in TILES[:2]:
        both = bs.build_layout(attn, call, *tiles)
        for lists, kept in (("forward", FIELDS[:6]), ("transposed", FIELDS[5:])):
            lay = bs.build_layout(attn, call, *tiles, lists=lists)
            for f in FIELDS:
                want = getattr(both, f) if f in kept else torch.empty(0, 1, dtype=torch.int32)
                assert torch.equal(getattr(lay, f), want), (lists, f, tiles)


def test_masks_evaluated_in_chunks(monkeypatch):
    """Partial tiles past the chunk size (here 3 tiles a chunk) are evaluated a chunk at a time: same tables."""
    from attnzoo.backends.triton import tables

    monkeypatch.setattr(tables, "MASK_ELEMENTS", 3 * 32 * 32)
    for name, params, inputs, heads, patterns in (CASES[4], CASES[8], CASES[15]):  # document, dilated, 2d
        attn = az.get(name, **params)
        causal, sq, sk = patterns[-1]
        given = inputs(2, sq, sk)
        q, k, v = qkv(2, *heads, sq, sk, 8)
        call = attn.prepare(q, k, v, causal, None, dict(given))
        lay, want = bs.build_layout(attn, call, 32, 32), plain_layout(attn, call, given, 32, 32)
        assert lay.bits.shape[0] > 3 and all(torch.equal(getattr(lay, f), want[f]) for f in FIELDS), name


@pytest.mark.parametrize("ids", [_ids(2, 301, (23, 160, 161)), _ids(2, 301, (140,)) % 2 * torch.arange(301).lt(250)],
                         ids=["sorted", "unsorted"])
def test_document_as_on_a_gpu(monkeypatch, ids):
    """Where reading the ids would cost a device sync, documents take another path (unsorted rows: every key a
    candidate, no tile full): forced here on the CPU, the tables still encode the mask and equal the plain build."""
    from attnzoo.variants.masks import local

    monkeypatch.setattr(local, "host_readable", lambda device: False)
    attn = az.get("document")
    for causal, sq in [(True, 301), (False, 131)]:
        given = {"document_ids": ids, "q_document_ids": ids[:, -sq:].clone()}
        q, k, v = qkv(2, 2, 1, sq, 301, 8)
        call = attn.prepare(q, k, v, causal, None, dict(given))
        for tiles in TILES[:2]:
            lay = bs.build_layout(attn, call, *tiles)
            want = plain_layout(attn, call, given, *tiles)
            assert all(torch.equal(getattr(lay, f), want[f]) for f in FIELDS), (causal, sq, tiles)
            dense = attn.dense_mask(sq, 301, causal=causal, heads=2, kv_heads=1, batch=2, **given)
            assert torch.equal(lay.dense(sq, 301, 2, 2), dense.expand(2, 2, sq, 301)), (causal, sq, tiles)


def _plain_from_intervals(intervals, sq, sk, q_block, kv_block, end=None):
    """core.blocks.from_intervals as defined: per row, a tile is touched by an interval overlapping it and full
    when one interval covers it; reduced over each query block's rows (any / all, rows past Sq left out)."""
    nq, nk = blocks.n_blocks(sq, q_block), blocks.n_blocks(sk, kv_block)
    lead = torch.broadcast_shapes(*(t.shape[:-1] for iv in intervals for t in iv))
    any_ = torch.zeros(*lead, nq, nk, dtype=torch.bool)
    full = torch.zeros(*lead, nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            k0, k1 = j * kv_block, min((j + 1) * kv_block, sk)
            rows = slice(i * q_block, min((i + 1) * q_block, sq))
            touch = torch.zeros(*lead, rows.stop - rows.start, dtype=torch.bool)
            cover = torch.zeros_like(touch)
            for lo, hi in intervals:
                hi = hi if end is None else torch.minimum(hi, end)
                lo, hi = lo.expand(*lead, sq)[..., rows].clamp(0, sk), hi.expand(*lead, sq)[..., rows].clamp(0, sk)
                touch |= (torch.maximum(lo, torch.tensor(k0)) < torch.minimum(hi, torch.tensor(k1)))
                cover |= (lo <= k0) & (hi >= k1)
            any_[..., i, j], full[..., i, j] = touch.any(-1), cover.all(-1)
    return any_, full


@pytest.mark.parametrize("form", ["list", "stacked"])
@pytest.mark.parametrize("max_elements", [1 << 25, 1], ids=["at once", "one at a time"])
@pytest.mark.parametrize("n_intervals,longest", [(1, 40), (2, 40), (5, 40), (5, 5)])
def test_from_intervals_equals_its_definition(n_intervals, longest, max_elements, form):
    """Lists and StackedIntervals (longest 5: shorter than every key block, the last one 6 keys), with and
    without an end, compared at once or one at a time."""
    g = torch.Generator().manual_seed(n_intervals)
    sq, sk = 53, 70
    intervals = []
    for _ in range(n_intervals):
        lo = torch.randint(-20, 80, (2, 1, sq), generator=g)
        intervals.append((lo, lo + torch.randint(-5, longest, (1, 3, sq), generator=g)))
    given = intervals
    if form == "stacked":
        lo, hi = (torch.stack(torch.broadcast_tensors(*(iv[i] for iv in intervals))) for i in (0, 1))
        given = blocks.StackedIntervals(lo, hi, longest)
    for end in (None, torch.randint(-5, 75, (1, 1, sq), generator=g)):
        got = blocks.from_intervals(given, sq, sk, 8, 16, end, max_elements=max_elements)
        want_any, want_full = _plain_from_intervals(intervals, sq, sk, 8, 16, end)
        assert torch.equal(got.any, want_any) and torch.equal(got.full, want_full)


class _MetaNonzero(TorchDispatchMode):
    """Counts `nonzero` and answers it on the meta device (with 5 rows), where it has no answer of its own."""

    def __init__(self):
        super().__init__()
        self.nonzero = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "nonzero":
            self.nonzero += 1
            return torch.zeros(5, args[0].dim(), dtype=torch.long, device=args[0].device)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,params,inputs,heads,patterns", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_a_build_reads_the_device_once(name, params, inputs, heads, patterns):
    """On the meta device (standing in for a GPU: reading any value raises) a build reads one device value, the
    number of partial tiles (`nonzero`), and nothing else."""
    attn = az.get(name, **params)
    causal, sq, sk = patterns[0]
    q = torch.empty(2, heads[0], sq, 8, device="meta")
    k = torch.empty(2, heads[1], sk, 8, device="meta")
    call = attn.prepare(q, k, k, causal, None, {n: t.to("meta") for n, t in inputs(2, sq, sk).items()})
    for tiles in TILES[:2]:
        mode = _MetaNonzero()
        with mode:
            lay = bs.build_layout(attn, call, *tiles)
        assert mode.nonzero == 1 and lay.bits.shape == (5, *tiles[:1], tiles[1] // 32)
