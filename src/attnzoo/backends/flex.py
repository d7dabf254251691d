"""The `flex` backend: compiled FlexAttention with cached kernels and block masks.

FlexAttention recompiles for every new mask/score function object and every new shape, and past
its recompile limit silently falls back to an unfused path that builds Sq x Sk. So for each
(variant configuration, shapes, causal, dtype, device) this module makes the mask_mod and
score_mod function objects once and keeps them, together with one `Call` they read; per-call
input tensors (document ids, ...) are copied into that entry's own buffers, so the functions see
the same objects on every call and new values of the same shape reuse the compiled kernel. Block
masks are built from the variant's block structure (O(blocks) for interval masks, no mask_mod
evaluation per block pair) and kept with the entry; a variant with per-call inputs rebuilds its
block mask (and copies the inputs) only when they changed (`reuse.InputsKey`), so the layers of a
model called with the same document ids share one build, as users of Flex share one block mask.
"""
from __future__ import annotations

import threading
import types
from dataclasses import dataclass

import torch

from ..core.variant import Call, SoftmaxVariant
from .reuse import InputsKey

BLOCK = 128
# Past dynamo's recompile limit Flex silently runs an unfused path that builds Sq x Sk. Each cache
# entry has its own compiled function (see compiled_flex_attention); the limit is raised for our
# calls anyway (new block-mask shapes of input-dependent masks) and hitting it is an error.
RECOMPILE_LIMIT = 256
_lock = threading.Lock()
_entries: dict = {}
stats = {"entries": 0, "block_masks_built": 0}


def compiled_flex_attention():
    """A compiled flex_attention with its own code object, so its dynamo cache is its own.

    Dynamo keeps compiled graphs and recompile counts per code object. If every configuration
    shared torch's flex_attention code, code elsewhere in the process (a user's own compiled Flex)
    could exhaust the recompile limit, after which dynamo runs that code eagerly, unfused and
    Sq x Sk, for everyone; and one configuration's guards would be evaluated against another's
    closures. One copy per cache entry isolates both.
    """
    from torch.nn.attention.flex_attention import flex_attention

    code = flex_attention.__code__.replace()
    fn = types.FunctionType(code, flex_attention.__globals__, flex_attention.__name__, flex_attention.__defaults__,
                            flex_attention.__closure__)
    fn.__kwdefaults__ = flex_attention.__kwdefaults__
    fn.__doc__ = flex_attention.__doc__
    return torch.compile(fn, dynamic=False)


def available() -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the torch build
        return f"FlexAttention is not available in this torch build: {e}"
    return None


def can_run(variant, call: Call, q: torch.Tensor) -> str | None:
    why = available()
    if why:
        return why
    if not isinstance(variant, SoftmaxVariant) or "flex" not in variant.backends():
        return f"{variant.name} is not a mask/score-modifier variant FlexAttention can express"
    if q.device.type == "cpu":
        if q.dtype == torch.float64:
            return "flex on CPU has kernels for float32/float16/bfloat16 only, got float64"
        if torch.is_grad_enabled() and q.requires_grad:
            return "flex on CPU is inference-only (no backward); use backend='torch' for training on CPU"
    return None


@dataclass
class _Entry:
    call: Call
    buffers: dict
    mask_mod: object
    score_mod: object
    compiled: object = None
    block_mask: object = None
    built_for: InputsKey | None = None  # the inputs block_mask (and the buffers) hold


def _pads_inputs(q: torch.Tensor) -> bool:
    # torch's CPU Flex kernel returns wrong rows for some lengths that are not multiples of its
    # tile (seen with torch 2.13: Sk = 40 or 200 against SDPA); on CPU we pad Sq and Sk to BLOCK.
    return q.device.type == "cpu"


def _entry(variant: SoftmaxVariant, q, call: Call) -> _Entry:
    s = call.shapes
    key = (variant.key, s, call.causal, q.dtype, q.device, tuple(sorted(call.inputs)))
    with _lock:
        e = _entries.get(key)
        if e is None:
            buffers = {n: t.detach().clone() for n, t in call.inputs.items()}
            stable = Call(call.shapes, call.scale, call.causal, dict(buffers), call.device)
            offset, sq, sk = s.offset, s.sq, s.sk
            padded = _pads_inputs(q)

            def positions(q_idx, kv_idx):
                if padded:  # keep indices inside the real lengths for variants that index inputs
                    q_idx, kv_idx = torch.clamp(q_idx, max=sq - 1), torch.clamp(kv_idx, max=sk - 1)
                return q_idx + offset, kv_idx

            def mask_mod(b, h, q_idx, kv_idx):
                q_pos, kv_pos = positions(q_idx, kv_idx)
                m = variant.full_mask(stable, b, h, q_pos, kv_pos)
                inside = kv_idx < sk
                return inside if m is None else m & inside

            score_mod = None
            if variant.has_score:

                def score_mod(score, b, h, q_idx, kv_idx):
                    q_pos, kv_pos = positions(q_idx, kv_idx)
                    return variant.score(stable, score, b, h, q_pos, kv_pos)

            e = _entries[key] = _Entry(stable, buffers, mask_mod, score_mod, compiled_flex_attention())
            stats["entries"] += 1
    return e


def block_mask_from_structure(struct, mask_mod, padded: bool = False):
    """A FlexAttention BlockMask from precomputed tile flags, without evaluating mask_mod per tile.

    With `padded`, the kernel sees lengths rounded up to whole tiles; the last key tile then holds
    padding, so it is never `full` (its mask_mod hides the padded keys).
    """
    from torch.nn.attention.flex_attention import BlockMask

    full = struct.full & struct.any
    seq_lengths = (struct.sq, struct.sk)
    if padded:
        seq_lengths = (struct.nq * struct.q_block, struct.nk * struct.kv_block)
        if struct.sk % struct.kv_block:
            full = full.clone()
            full[..., -1] = False
    partial = struct.any & ~full

    def lists(flags):
        num = flags.sum(-1).to(torch.int32)
        idx = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.contiguous(), idx.contiguous()

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    stats["block_masks_built"] += 1
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(struct.q_block, struct.kv_block), mask_mod=mask_mod,
        seq_lengths=seq_lengths,
    )


def flex(variant: SoftmaxVariant, q, k, v, call: Call) -> torch.Tensor:
    e = _entry(variant, q, call)
    for name, t in call.inputs.items():
        if t.requires_grad:  # gradients must reach the caller's tensor: no copy (may recompile)
            e.call.inputs[name] = t
    s = call.shapes
    padded = _pads_inputs(q)
    given = InputsKey(variant, call.inputs)
    if e.block_mask is None or e.built_for != given:
        for name, t in call.inputs.items():
            if not t.requires_grad:
                e.buffers[name].copy_(t)
                e.call.inputs[name] = e.buffers[name]
        struct = variant.block_structure(call, BLOCK, BLOCK)
        e.block_mask = block_mask_from_structure(struct, e.mask_mod, padded)
        e.built_for = given
    if padded:
        q, k, v = (_pad_rows(t, BLOCK) for t in (q, k, v))
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        out = e.compiled(q, k, v, score_mod=e.score_mod, block_mask=e.block_mask, scale=call.scale,
                         enable_gqa=s.group > 1, kernel_options=kernel_options(s.d, s.dv, q))
    return out[:, :, : s.sq] if padded else out


def _pad_rows(t: torch.Tensor, block: int) -> torch.Tensor:
    pad = -t.shape[2] % block
    return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t


def kernel_options(d: int, dv: int, q: torch.Tensor) -> dict | None:
    """Smaller tiles for large head dims, so the kernel fits shared memory (D > 128)."""
    if q.device.type == "cuda" and max(d, dv) > 128:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1}
    return None

