"""The built-in backends, each registered with the core's backend registry (core/dispatch.py).

`sdpa`:  PyTorch's fused kernels, where they express the variant exactly without a mask tensor.
`flex`:  compiled FlexAttention with cached kernels and block masks; picked by `auto` on CUDA.
`torch`: exact blockwise online softmax (mask and score variants) or the variant's own eager path
         (recurrent, selection and composite variants); any device, forward and backward.
"""
from __future__ import annotations

from ..core.dispatch import Backend, register_backend
from ..core.variant import SoftmaxVariant, Variant
from . import flex as _flex
from . import sdpa as _sdpa
from .torch_blockwise import softmax_blockwise


def _declared(name: str):
    """The variant class declares a `name` path (`_class_backends`)."""
    return lambda cls: name in cls._class_backends()


def _no_path(name: str, variant) -> str | None:
    if name not in variant.backends():
        return f"{variant.name} has no {name!r} path (its backends: {list(variant.backends())})"
    return None


def _run_torch(variant, q, k, v, call):
    if isinstance(variant, SoftmaxVariant) and type(variant).forward_torch is Variant.forward_torch:
        return softmax_blockwise(variant, q, k, v, call)
    return variant.forward_torch(q, k, v, call)


def _flex_why_not(variant, call, q):
    return _no_path("flex", variant) or _flex.can_run(variant, call, q)


def _flex_auto(variant, call, q):
    if q.device.type != "cuda":
        return "auto takes compiled Flex on CUDA only: on CPU it compiles per shape and the torch path is faster"
    return None


register_backend(Backend(
    "sdpa", 30, lambda variant, call, q: _no_path("sdpa", variant) or _sdpa.can_run(variant, call), _sdpa.sdpa,
    serves=_declared("sdpa"), doc="torch.nn.functional.scaled_dot_product_attention, no mask tensor"), replace=True)
register_backend(Backend(
    "flex", 20, _flex_why_not, _flex.flex, serves=_declared("flex"), auto_why_not=_flex_auto,
    doc="compiled FlexAttention, block masks from the variant's structure"), replace=True)
register_backend(Backend(
    "torch", 0, lambda variant, call, q: _no_path("torch", variant), _run_torch, serves=_declared("torch"),
    doc="exact blockwise online softmax, or the variant's eager path"), replace=True)
try:  # context parallelism over torch.distributed (attnzoo.distributed); a torch build without it lacks it
    from . import distributed as _distributed  # noqa: F401
except ImportError:
    pass
try:  # attnzoo's own Triton kernels (the `triton` backend); a machine without triton lacks it
    from . import triton as _triton  # noqa: F401
except ImportError:
    pass
