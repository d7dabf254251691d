"""attnzoo: the attention mechanisms of recent research behind one API, each proven against its
exact dense definition. `az.attention(q, k, v, variant=..., **params)`, `az.get(name, **params)`,
`az.variants(...)`."""
from __future__ import annotations

import importlib

# The family package (its __init__ is light; the family modules load on the first registry lookup).
# Importing it binds the name `variants` here; unbind it, so az.variants is the function below.
from . import variants as _families  # noqa: F401

del variants  # noqa: F821

__version__ = "0.1.0"

# The public API, loaded on first use (PEP 562): `import attnzoo` and `attnzoo --help` import no
# torch; `az.attention` and the rest import it when first touched. name -> defining module.
_API = {
    "attention": ".core.api", "get": ".core.api", "variants": ".core.api",
    "ALL_PATTERNS": ".core.info", "Input": ".core.info", "Paper": ".core.info", "Param": ".core.info",
    "VariantInfo": ".core.info",
    "register": ".core.registry",
    "Call": ".core.variant", "SoftmaxVariant": ".core.variant", "Variant": ".core.variant",
    "RecurrentVariant": ".core.recurrent", "Selection": ".core.selection", "SelectionVariant": ".core.selection",
    "and_masks": ".core.compose", "or_masks": ".core.compose", "inside_documents": ".core.compose",
}

__all__ = [
    "ALL_PATTERNS", "Call", "Input", "Paper", "Param", "RecurrentVariant", "Selection", "SelectionVariant",
    "SoftmaxVariant", "Variant", "VariantInfo", "and_masks", "attention", "get", "inside_documents", "or_masks",
    "distributed", "nn", "register", "variants", "__version__",
]


def __getattr__(name: str):
    if name in ("nn", "distributed"):  # submodules: az.nn.MultiheadAttention, az.distributed.context_parallel
        return importlib.import_module(f".{name}", __name__)
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'attnzoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
