"""When a block structure built for one call can serve the next: the call's declared inputs are unchanged.

A variant with per-call inputs (document ids, block labels) has a mask that depends on them, so its
block structure (a Flex BlockMask, the Triton kernel's tile lists) must be rebuilt when they change,
but a model calls every layer with the same ids: rebuilding per layer is host work (and, for ids on
the GPU, device syncs) that users of Flex avoid by building one block mask per step. An input is
the same when it is the same memory at the same version: `Tensor._version` counts in-place changes
made through torch, through any view. The entry keeps the tensors it was built from alive, so their
memory cannot be freed and reused by a new tensor that would carry the same address and version.
Changes that bypass torch (writing through `.numpy()` on CPU) are not seen.

Inputs a variant derives in `validate_call` (block_rag's run bounds) are functions of the declared
ones and are not keyed: they are fresh tensors on every call.
"""
from __future__ import annotations

import torch


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device,
            t._version)


class InputsKey:
    """Identity and version of a call's declared input tensors; `==` says the inputs are unchanged."""

    __slots__ = ("held", "key")

    def __init__(self, variant, inputs: dict) -> None:
        names = sorted(i.name for i in variant.inputs if i.name in inputs)
        self.held = tuple(inputs[n] for n in names)  # alive, so their memory cannot be reused
        self.key = tuple((n, _tensor_key(t)) for n, t in zip(names, self.held))

    def __eq__(self, other) -> bool:
        return isinstance(other, InputsKey) and self.key == other.key

    __hash__ = None
