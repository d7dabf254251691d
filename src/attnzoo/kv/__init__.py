"""KV-cache compression for Hugging Face causal LMs: `press = attnzoo.kv.get("snapkv", ratio=0.75)`,
`with press(model): model.generate(...)`; `attnzoo.kv.methods()` lists every method."""
from . import gate, headwise, quant, retrieval, scorers  # noqa: F401  (registers the presses)
from .base import (SUPPORTED_TRANSFORMERS, KVPress, PressSession, Selection, Step, UnsupportedTransformers, get,
                   methods, register)
from .compose import Pipeline, compose
from .ragged import ragged_cache

__all__ = ["SUPPORTED_TRANSFORMERS", "KVPress", "Pipeline", "PressSession", "Selection", "Step",
           "UnsupportedTransformers", "compose", "get", "methods", "ragged_cache", "register"]
