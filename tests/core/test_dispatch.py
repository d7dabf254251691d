"""The backend registry: the core imports no backend; a backend registered from outside is used by
`auto` and explained; explicit choices that cannot run are refused with the reason."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from harness import qkv

import attnzoo as az
from attnzoo.core.dispatch import Backend, backends, register_backend, unregister_backend


def test_importing_the_core_imports_no_backend_and_no_family():
    code = ("import sys, attnzoo.core.variant, attnzoo.core.dispatch, attnzoo.core.recurrent, attnzoo.core.selection, "
            "attnzoo.core.compose, attnzoo.core.api; "
            "bad = [m for m in sys.modules if m.startswith(('attnzoo.backends', 'attnzoo.variants.'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_builtin_backends_register_themselves_in_priority_order():
    names = [b.name for b in backends()]  # optional backends (triton where installed) may sit among them
    builtin = [n for n in names if n in ("sdpa", "flex", "torch")]
    assert builtin == ["sdpa", "flex", "torch"] and names[-1] == "torch"
    assert [b for b in az.get("full").info.backends if b in builtin] == ["sdpa", "flex", "torch"]
    assert az.get("gla").info.backends[-1] == "torch" and "sdpa" not in az.get("gla").info.backends


def test_a_backend_registered_from_outside_is_chosen_by_auto_and_explained():
    calls = []

    def run(variant, q, k, v, call):
        calls.append(variant.name)
        return torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)

    toy = Backend("toy", 100, lambda variant, call, q: None if variant.name == "sliding_window" else "toy: windows only",
                  run, serves=lambda cls: cls.name == "sliding_window")
    register_backend(toy)
    try:
        q, k, v = qkv(1, 2, 1, 20, 20, 8)
        assert torch.equal(az.attention(q, k, v, variant="sliding_window", window=3, causal=True),
                           torch.zeros(1, 2, 20, 8, dtype=q.dtype))
        assert calls == ["sliding_window"]
        rows = az.get("full").explain(q, k, v, causal=True)
        assert [r["backend"] for r in rows][0] == "toy" and rows[0]["reason"] == "toy: windows only"
        assert next(r for r in rows if r["chosen"])["backend"] == "sdpa"
        assert az.variants(family="masks")[0].backends  # listing still works with the extra backend
        assert "toy" in next(i for i in az.variants() if i.name == "sliding_window").backends
        with pytest.raises(ValueError, match="already registered"):
            register_backend(toy)
    finally:
        unregister_backend("toy")
    assert "toy" not in [b.name for b in backends()]


def test_explicit_backends_that_cannot_run_say_why():
    q, k, v = qkv(1, 2, 1, 16, 16, 8)
    with pytest.raises(ValueError, match="backend='sdpa' cannot serve this call: sliding_window has no 'sdpa' path"):
        az.attention(q, k, v, variant="sliding_window", window=3, backend="sdpa")
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', .*'torch'\], got 'cuda'"):
        az.attention(q, k, v, backend="cuda")
    rows = az.get("sliding_window", window=3).explain(q.float(), k.float(), v.float(), causal=True)
    flex = next(r for r in rows if r["backend"] == "flex")
    assert flex["runs"] and not flex["chosen"] and "CUDA only" in flex["reason"]
    with pytest.raises(ValueError, match="name other than 'auto'"):
        register_backend(Backend("auto", 1, lambda *a: None, lambda *a: None))
