"""The torch backend: tiles skipped, memory linear in S (measured), no Sq x Sk tensor, its two paths."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import attnzoo as az
from attnzoo.backends import torch_blockwise as tb
from attnzoo.core import blocks
from harness import qkv

PEAK_SCRIPT = r"""
import json, sys, torch
import attnzoo as az

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MiB

s, mode = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
q = torch.randn(1, 1, s, 64); k = torch.randn(1, 1, s, 64); v = torch.randn(1, 1, s, 64)
az.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], "full", causal=True, backend="torch")  # warm-up
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
base = status("VmRSS")
if mode == "torch":
    o = az.attention(q, k, v, "full", causal=True, backend="torch")
else:
    o = az.get("full").reference(q, k, v, causal=True)
print(json.dumps({"extra_mib": status("VmHWM") - base}))
"""


def _peak(s: int, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(s), mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def test_memory_stays_linear_at_16k():
    """At S=16384 one dense score matrix alone is 1 GiB in float32; the torch path needs a few MiB."""
    torch_peak = _peak(16384, "torch")
    dense_peak = _peak(4096, "dense")  # dense at 16k would need > 3 GiB; 4k already shows the S^2 growth
    assert torch_peak < 64, f"torch path used {torch_peak:.0f} MiB extra at 16k"
    assert dense_peak > 4096 * 4096 * 4 / 2**20, dense_peak  # at least one S x S float32 matrix


def test_tiles_outside_the_band_are_skipped():
    call = az.get("sliding_window", window=64).prepare(*qkv(1, 1, 1, 4096, 4096, 8), True, None, {})
    st = az.get("sliding_window", window=64).block_structure(call, 128, 128)
    assert st.any.shape == (1, 1, 32, 32)
    # each query block touches its own tile and the one before it
    assert st.any.sum().item() == 32 + 31
    assert st.density() < 0.07
    full_call = az.get("full").prepare(*qkv(1, 1, 1, 4096, 4096, 8), True, None, {})
    assert az.get("full").block_structure(full_call, 128, 128).any.sum().item() == 32 * 33 // 2


def test_interval_and_evaluated_structures_agree():
    """The O(blocks) interval path gives the same tiles as evaluating the mask."""
    for name, params in [("sliding_window", {"window": 37, "right": 5}), ("sink_window", {"sinks": 3, "window": 20}),
                         ("prefix_lm", {"prefix": 50})]:
        attn = az.get(name, **params)
        for causal, sq, sk in [(True, 200, 200), (False, 130, 211), (True, 61, 203)]:
            if name == "prefix_lm":
                causal = False
            call = attn.prepare(*qkv(1, 1, 1, sq, sk, 8), causal, None, {})
            fast = attn.block_structure(call, 32, 16)
            dense = attn.dense_mask(sq, sk, causal=causal)
            slow = blocks.from_mask_rows(lambda a, b: dense[a:b].view(1, 1, b - a, sk), sq, sk, 32, 16)
            assert torch.equal(fast.any.expand_as(slow.any), slow.any), (name, causal, sq, sk)
            assert not (fast.full & ~slow.full).any()  # full is never claimed wrongly


def test_no_sq_by_sk_tensor_is_built(monkeypatch):
    """The tiles path: every matmul is at most one tile wide."""
    seen = []
    orig = torch.matmul

    def spy(a, b):
        seen.append(tuple(a.shape[-2:]) + tuple(b.shape[-1:]))
        return orig(a, b)

    monkeypatch.setattr(torch, "matmul", spy)
    q, k, v = qkv(1, 2, 1, 1500, 1500, 8, dtype=torch.float32)
    with tb.use_path("tiles"):
        az.attention(q, k, v, "full", causal=True, backend="torch")
    assert seen and all(m <= tb.Q_BLOCK and n <= max(tb.KV_BLOCK, 8) for m, _, n in seen)


def _spy_kernel(monkeypatch):
    """Every call of the CPU flash kernel (forward and backward): (query rows, key run, mask shape or None)."""
    calls = []
    fwd, bwd = tb._FLASH_CPU, tb._FLASH_CPU_BWD

    def spy_fwd(q, k, v, *args, attn_mask=None, **kw):
        calls.append(("fwd", q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return fwd(q, k, v, *args, attn_mask=attn_mask, **kw)

    def spy_bwd(g, q, k, v, *args, attn_mask=None, **kw):
        calls.append(("bwd", q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return bwd(g, q, k, v, *args, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(tb, "_FLASH_CPU", spy_fwd)
    monkeypatch.setattr(tb, "_FLASH_CPU_BWD", spy_bwd)
    return calls


@pytest.mark.parametrize("name,params,causal,sq,sk,inputs", [
    ("sliding_window", {"window": 700}, True, 1500, 1500, None),
    ("sink_window", {"sinks": 4, "window": 800}, True, 400, 1500, None),
    ("document", {}, True, 1500, 1500, "docs"),
    ("prefix_lm", {"prefix": 700}, False, 1500, 1500, None),
    ("full", {}, True, 1500, 1500, None),
])
def test_fused_path_masks_only_partial_runs_and_never_sq_by_sk(monkeypatch, name, params, causal, sq, sk, inputs):
    """The fused path: one kernel call per run of tiles, masks only on partial runs (rows x at most
    MASK_SPAN keys), every key range inside what the block needs; forward and backward exact."""
    extra = {"document_ids": torch.arange(sk).div(sk / 5, rounding_mode="floor").long().view(1, -1)} if inputs else {}
    attn = az.get(name, **params)
    q, k, v = qkv(1, 6, 2, sq, sk, 16, requires_grad=True)
    calls = _spy_kernel(monkeypatch)
    out = attn(q, k, v, causal=causal, backend="torch", **extra)
    ref = attn.reference(q, k, v, causal=causal, **extra)
    assert (out - ref).abs().max() < 1e-10
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(grads, ref_grads))
    assert calls and {c[0] for c in calls} == {"fwd", "bwd"}
    for _, rows, keys, mask in calls:
        assert rows <= tb.Q_BLOCK
        if mask is not None:
            assert mask[-2:] == (rows, keys) and keys <= tb.MASK_SPAN
    masked = sum(c[2] for c in calls if c[3] is not None and c[0] == "fwd")
    computed = sum(c[2] for c in calls if c[0] == "fwd")
    assert masked < computed or name == "document"  # runs of full tiles go without a mask
    if name == "full":
        assert all(c[3] is None for c in calls)  # the diagonal uses the kernel's causal flag


def test_path_choice_and_forcing():
    q, k, v = qkv(1, 2, 1, 64, 64, 8, dtype=torch.float32)
    window = az.get("sliding_window", window=8)
    call = window.prepare(q, k, v, True, None, {})
    assert tb.path_for(window, call, q)[0] == "fused"
    softcap = az.get("softcap")
    path, why = tb.path_for(softcap, softcap.prepare(q, k, v, True, None, {}), q)
    assert path == "tiles" and "modifies scores" in why
    with tb.use_path("tiles"):
        assert tb.path_for(window, call, q)[0] == "tiles"
        tiles = window(q, k, v, causal=True, backend="torch")
    assert tb.PATH == "auto"
    with tb.use_path("fused"):
        with pytest.raises(ValueError, match="fused torch path cannot serve"):
            softcap(q, k, v, causal=True, backend="torch")
    fused = window(q, k, v, causal=True, backend="torch")
    assert (fused - tiles).abs().max() < 1e-5
    with pytest.raises(ValueError, match="path must be one of"):
        with tb.use_path("fast"):
            pass


@pytest.mark.parametrize("name,params", [("sliding_window", {"window": 9}), ("sink_window", {"sinks": 3, "window": 7}),
                                         ("strided_shards", {"block_size": 4, "local_blocks": 2, "vert_stride": 3})])
def test_tiles_path_still_exact_for_masks(small_blocks, name, params):
    """Mask variants take the fused path by default; the tiles engine stays exact for them too."""
    attn = az.get(name, **params)
    q, k, v = qkv(2, 6, 2, 77, 77, 16, dv=24, requires_grad=True)
    with tb.use_path("tiles"):
        out = attn(q, k, v, causal=True, backend="torch")
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = attn.reference(q, k, v, causal=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert (out - ref).abs().max() < 1e-10
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_low_precision_accumulates_in_float32(dtype):
    attn = az.get("sliding_window", window=100)
    q, k, v = qkv(1, 4, 2, 700, 700, 32, seed=3)
    ref = attn.reference(q, k, v, causal=True)
    out = attn(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, backend="torch")
    assert out.dtype == dtype
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.to(dtype), k.repeat_interleave(2, 1).to(dtype), v.repeat_interleave(2, 1).to(dtype),
        attn_mask=attn.dense_mask(700, 700, causal=True))
    assert (out.double() - ref).abs().max() <= 2 * (sdpa.double() - ref).abs().max() + 1e-6


def test_sdpa_backend_bottom_right_causal_on_cpu_builds_no_mask(monkeypatch):
    """Causal cross-attention (decode, chunked prefill) on the sdpa backend: two kernel calls per query
    block (keys before the block unmasked, the block's own keys with the causal flag), no Sq x Sk mask."""
    calls = _spy_kernel(monkeypatch)
    q, k, v = qkv(2, 6, 2, 19, 1000, 16, requires_grad=True)
    out = az.attention(q, k, v, "full", causal=True, backend="sdpa")
    ref = az.get("full").reference(q, k, v, causal=True)
    assert (out - ref).abs().max() < 1e-10
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(grads, ref_grads))
    assert [c[1:] for c in calls if c[0] == "fwd"] == [(19, 981, None), (19, 19, None)]
