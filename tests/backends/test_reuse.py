"""Per-call host work: block structures are reused while a call's inputs are unchanged, and building them
reads no device values (no GPU -> CPU sync); the benchmarks' FLOP convention."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from harness import qkv

import attnzoo as az
from attnzoo.backends import flex
from attnzoo.backends.reuse import InputsKey
from attnzoo.variants.masks import local


def _ids(*lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).view(1, -1)


def test_inputs_key_sees_identity_and_in_place_changes():
    attn = az.get("document")
    ids = _ids(5, 7)
    key = InputsKey(attn, {"document_ids": ids})
    assert key == InputsKey(attn, {"document_ids": ids})
    assert key == InputsKey(attn, {"document_ids": ids[:, :]})  # a view of the same memory and version
    assert key != InputsKey(attn, {"document_ids": ids.clone()})
    ids[0, 3] = 1
    assert key != InputsKey(attn, {"document_ids": ids}), "an in-place change must invalidate the key"
    assert key.held[0] is ids  # kept alive: its memory cannot be handed to a new tensor


@pytest.mark.flex
def test_flex_reuses_the_block_mask_until_the_ids_change():
    attn = az.get("document")
    q, k, v = qkv(1, 2, 2, 200, 200, 16, dtype=torch.float32)
    ids = _ids(90, 110)

    def check():
        out = attn(q, k, v, causal=True, document_ids=ids, backend="flex")
        ref = attn.reference(q.double(), k.double(), v.double(), causal=True, document_ids=ids)
        assert (out.double() - ref).abs().max() < 2e-5

    check()
    built = flex.stats["block_masks_built"]
    check()  # another layer, same ids
    assert flex.stats["block_masks_built"] == built, "unchanged ids rebuilt the block mask"
    ids[0, 40:90] = 1  # in place: documents of 40 and 160
    check()
    assert flex.stats["block_masks_built"] == built + 1, "changed ids must rebuild the block mask"


STRUCTURED = [
    ("sliding_window", {"window": 16}, {}),
    ("sink_window", {"sinks": 4, "window": 16}, {}),
    ("prefix_lm", {"prefix": 30}, {}),
    ("document", {}, {"document_ids": _ids(40, 60, 28)}),
    ("document", {}, {"document_ids": torch.tensor([[0] * 50 + [1] * 30 + [0] * 48])}),  # unsorted
    ("block_rag", {}, {"block_ids": _ids(40, 60, 28)}),
    ("dilated_window", {"window": 8, "dilation": 3, "offsets": "cyclic"}, {}),
    ("multi_scale_window", {"window": 24}, {}),
    ("neighborhood", {"grid": (8, 16), "kernel_size": 5}, {}),
]


@pytest.mark.parametrize("name,params,inputs", STRUCTURED)
def test_block_structure_reads_no_device_values(name, params, inputs):
    """On the meta device every read of a value (bool(t), t.item(), .tolist()) raises, as a GPU tensor's
    would force a sync: building the structure there proves the hot path has none."""
    attn = az.get(name, **params)
    q = torch.empty(1, 4, 128, 16, device="meta")
    call = attn.prepare(q, q, q, name != "prefix_lm", None, {n: t.to("meta") for n, t in inputs.items()})
    struct = attn.block_structure(call, 32, 32)
    assert struct.any.device.type == "meta" and struct.any.shape[-2:] == (4, 4)


def test_unsorted_documents_off_the_host_are_exact(monkeypatch):
    """Where ids cannot be read without a sync, a document split over several runs makes every tile a
    candidate and none full: the torch path over that structure still equals the reference."""
    monkeypatch.setattr(local, "host_readable", lambda device: False)
    attn = az.get("document")
    ids = torch.tensor([[0] * 50 + [1] * 30 + [0] * 48, [0] * 60 + [1] * 68])
    q, k, v = qkv(2, 2, 1, 128, 128, 8)
    call = attn.prepare(q, k, v, True, None, {"document_ids": ids})
    struct = attn.block_structure(call, 32, 32)
    assert not struct.full[0].any() and struct.full[1].any()  # only the unsorted row loses its full tiles
    out = attn(q, k, v, causal=True, document_ids=ids, backend="torch")
    ref = attn.reference(q, k, v, causal=True, document_ids=ids)
    assert (out - ref).abs().max() < 1e-10


def test_gpu_scripts_count_backward_as_2_5_forwards():
    """FlashAttention's convention: forward+backward = 3.5x the forward FLOPs (backward 2.5x)."""
    path = Path(__file__).parents[2] / "benchmarks" / "gpu_structured.py"
    spec = importlib.util.spec_from_file_location("gpu_structured", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fwd = mod.useful_tflops(pairs=1000, batch_heads=2, d=64, dv=64, ms=1.0, mode="fwd")
    assert fwd == pytest.approx(2 * 1000 * 2 * (64 + 64) / 1e-3 / 1e12)
    assert mod.useful_tflops(1000, 2, 64, 64, 1.0, "fwd+bwd") == pytest.approx(3.5 * fwd)
    for script in path.parent.glob("gpu_*.py"):
        assert "2.5)" not in script.read_text(), f"{script.name} counts backward with another factor"
