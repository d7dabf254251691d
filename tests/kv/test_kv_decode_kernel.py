"""The Triton decoding kernel over a ragged cache (`backends/triton/kv_decode.py`) equals its definition:
under Triton's CPU interpreter against float64 (full precision and int8/int4/int2 entries, uniform and
unequal budgets, an empty segment, additive biases, an empty tail, GQA, head dims that are no power of
two, segments split into parts); on CUDA by FlashAttention's rule and inside a decoding model; a
failing kernel falls back to the torch path with one warning."""
from __future__ import annotations

import pytest
import torch
from harness import run_under_triton_interpreter
from kv_tiny import greedy_logits, ids, tiny_llama

import attnzoo.kv as kv
from attnzoo.backends.triton import kv_decode
from attnzoo.kv import ragged

pytest.importorskip("triton")

CASES = """
import torch

CASES = [  # (batch, Hq, Hkv, D, S, tail, budgets, bias)
    (1, 9, 3, 64, 150, 5, "uniform", False),
    (2, 4, 2, 32, 77, 0, "unequal", True),
    (1, 2, 1, 12, 70, 3, "unequal", False),   # D 12: no power of two
    (1, 6, 2, 16, 3, 40, "empty", False),    # nothing kept at all: the tail alone
]


def inputs(b, hq, hkv, d, s, t, budgets, with_bias, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    k, v = torch.randn(b, hkv, s, d, **f64), torch.randn(b, hkv, s, d, **f64)
    if budgets == "uniform":
        keep = torch.zeros(b, hkv, s, dtype=torch.bool)
        keep[..., torch.randperm(s, generator=gen)[: s // 3]] = True
    elif budgets == "unequal":
        keep = torch.rand(b, hkv, s, generator=gen) < torch.rand(b, hkv, 1, generator=gen)
        keep[0, 0] = False  # one empty segment
    else:
        keep = torch.zeros(b, hkv, s, dtype=torch.bool)
    bias = torch.randn(b, hkv, s, **f64) if with_bias else None
    q = torch.randn(b, hq, 1, d, **f64)
    tk, tv = torch.randn(b, hkv, t, d, **f64), torch.randn(b, hkv, t, d, **f64)
    return q, k, v, keep, bias, tk, tv
"""

INTERPRETER_SCRIPT = CASES + """
import warnings
import torch
from attnzoo.backends.triton import kv_decode
from attnzoo.kv import ragged
from attnzoo.kv.ragged import pack, padded_attention, ragged_attention

worst = {}
for bits in (None, 8, 4, 2):
    for case in CASES:
        q, k, v, keep, bias, tk, tv = inputs(*case, bits)
        scale = case[3] ** -0.5
        for dt in (torch.float32, torch.float16):  # no bfloat16: the interpreter's dot runs on numpy
            packed = pack(k.to(dt), v.to(dt), keep, bias, bits)
            # the definition on the same stored entries (codes included), in float64 arithmetic
            want = padded_attention(q, packed, tk, tv, None, scale).double()
            got = kv_decode.decode(q.to(dt), packed, tk.to(dt), tv.to(dt), scale)
            # segments cut into parts of 16 positions (a part may end inside the entries or the tail, or be empty)
            split = kv_decode.decode(q.to(dt), packed, tk.to(dt), tv.to(dt), scale, split=16)
            assert (split.double() - got.double()).abs().max().item() <= (1e-6 if dt == torch.float32 else 2e-3)
            assert got.shape == want.shape and got.dtype == dt and torch.isfinite(got).all()
            err = (got.double() - want).abs().max().item()
            if dt == torch.float32:
                key = f"float32.{bits}"
            else:  # FlashAttention's rule against the torch path in float16
                base = (ragged._torch_ragged_attention(q.to(dt), packed, tk.to(dt), tv.to(dt), None, scale).double()
                        - want).abs().max().item()
                key = f"float16.{bits}"
                err = err / max(2 * base, 1e-3)
            worst[key] = max(worst.get(key, 0.0), err)
        if case[6] == "empty":
            assert (ragged_attention(q.float(), pack(k.float(), v.float(), keep), tk[..., :0, :].float(),
                                     tv[..., :0, :].float(), None, scale) == 0).all()  # nothing to see: zeros

# the dispatch: ragged_attention runs the kernel for one query per row, the torch path for more
q, k, v, keep, bias, tk, tv = inputs(*CASES[0], None)
packed = pack(k.float(), v.float(), keep)
calls = []
real = kv_decode.decode
kv_decode.decode = lambda *a: calls.append(1) or real(*a)
ragged_attention(q.float(), packed, tk.float(), tv.float(), None, 0.125)
assert calls == [1]
ragged_attention(q.float().expand(-1, -1, 2, -1), packed, tk.float(), tv.float(), None, 0.125)
assert calls == [1]

# a failing kernel: one warning, then the torch path's output
def boom(*a, **k):
    raise RuntimeError("simulated")
kv_decode.decode = boom
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = ragged_attention(q.float(), packed, tk.float(), tv.float(), None, 0.125)
    again = ragged_attention(q.float(), packed, tk.float(), tv.float(), None, 0.125)
assert len([w for w in caught if "ragged decoding kernel failed" in str(w.message)]) == 1, caught
want = padded_attention(q.float(), packed, tk.float(), tv.float(), None, 0.125)
torch.testing.assert_close(got, want), torch.testing.assert_close(again, want)
print("WORST", worst)
bad = {key: e for key, e in worst.items() if e > (1e-5 if key.startswith("float32") else 1.0)}
assert not bad, bad
"""


def test_kernel_under_the_triton_interpreter():
    out = run_under_triton_interpreter(INTERPRETER_SCRIPT)
    assert "float32.2" in out and "float16.None" in out


def test_why_not_names_what_the_kernel_does_not_serve(monkeypatch):
    if kv_decode.TRITON_ERROR is None:
        assert "CUDA" in kv_decode.why_not(torch.zeros(1, 4, 1, 16), None)
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # as if on CUDA
        assert kv_decode.why_not(torch.zeros(1, 4, 1, 16), None) is None
        assert "no backward" in kv_decode.why_not(torch.zeros(1, 4, 1, 16, requires_grad=True), None)
        with torch.no_grad():
            assert kv_decode.why_not(torch.zeros(1, 4, 1, 16, requires_grad=True), None) is None
    if torch.cuda.is_available():
        assert "one query per row" in kv_decode.why_not(torch.zeros(1, 4, 2, 16, device="cuda"), None)
        assert "padding" in kv_decode.why_not(torch.zeros(1, 4, 1, 16, device="cuda"), torch.ones(1, 3, dtype=bool))
        assert "float16, bfloat16 or float32" in kv_decode.why_not(torch.zeros(1, 4, 1, 16, device="cuda",
                                                                               dtype=torch.float64), None)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [None, 8, 4, 2])
def test_fa_rule_on_cuda(dtype, bits):
    namespace: dict = {}
    exec(CASES, namespace)
    for case in namespace["CASES"]:
        q, k, v, keep, bias, tk, tv = (x if x is None else x.cuda() for x in namespace["inputs"](*case, bits))
        scale = case[3] ** -0.5
        packed = ragged.pack(k.to(dtype), v.to(dtype), keep, bias, bits)
        want = ragged.padded_attention(q, packed, tk, tv, None, scale).double()
        got = kv_decode.decode(q.to(dtype), packed, tk.to(dtype), tv.to(dtype), scale)
        split = kv_decode.decode(q.to(dtype), packed, tk.to(dtype), tv.to(dtype), scale, split=16)
        base = ragged._torch_ragged_attention(q.to(dtype), packed, tk.to(dtype), tv.to(dtype), None, scale)
        err, split_err, base_err = ((x.double() - want).abs().max().item() for x in (got, split, base))
        assert max(err, split_err) <= 2 * base_err + 1e-3, (case, err, split_err, base_err)


@needs_cuda
@pytest.mark.parametrize("press", ["snapkv", "razor", "snapkv+int4"])
def test_decoding_with_the_kernel_equals_the_torch_path_on_cuda(press, monkeypatch):
    model = tiny_llama().cuda()
    x = ids(120).cuda()
    make = {"snapkv": lambda: kv.get("snapkv", ratio=0.5), "razor": lambda: kv.get("razor", ratio=0.5),
            "snapkv+int4": lambda: kv.get("snapkv", ratio=0.5) + kv.get("kv_quant", bits=4)}[press]
    calls = []
    real = kv_decode.decode
    monkeypatch.setattr(kv_decode, "decode", lambda *a: calls.append(1) or real(*a))
    fast = greedy_logits(model, x, steps=4, press=make(), layout="ragged")
    assert len(calls) == 4 * model.config.num_hidden_layers
    monkeypatch.setattr(kv_decode, "why_not", lambda *a: "forced off")
    slow = greedy_logits(model, x, steps=4, press=make(), layout="ragged")
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)

