"""kvpress's presses in attnzoo's evaluation: same samples, same model, same table (`attnzoo kv
--compare kvpress`). kvpress is optional: when it is absent, declares a transformers range this
installation is outside of, or fails to import, `kvpress_presses` says why and returns none.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as metadata
import importlib.util

import torch

from .. import hf
from .base import cache_bytes

# attnzoo name -> kvpress class, for the methods both have
KVPRESS_CLASSES = {"snapkv": "SnapKVPress", "tova": "TOVAPress", "streaming_llm": "StreamingLLMPress",
                   "knorm": "KnormPress", "expected_attention": "ExpectedAttentionPress",
                   "pyramidkv": "PyramidKVPress", "random": "RandomPress", "kvzip": "KVzipPress"}
# kvpress presses that score the prefilled context with forwards of their own when their context manager exits
COMPRESS_ON_EXIT = ("KVzipPress",)


def kvpress_module():
    """(the kvpress module, "") or (None, why it cannot run here)."""
    try:
        version = metadata.version("kvpress")
    except metadata.PackageNotFoundError:
        return None, "kvpress is not installed (pip install kvpress)"
    import transformers
    from packaging.requirements import Requirement

    for text in metadata.requires("kvpress") or []:
        req = Requirement(text)
        if req.name == "transformers" and not req.marker and transformers.__version__ not in req.specifier:
            return None, (f"kvpress {version} declares transformers{req.specifier}; this is transformers "
                          f"{transformers.__version__}")
    try:
        return importlib.import_module("kvpress"), ""
    except Exception as e:  # any import-time failure of the optional package is a reason to skip, not to crash
        return None, f"kvpress {version} does not import here: {type(e).__name__}: {e}"


def quantized_cache_note() -> str:
    """Whether transformers' own QuantizedCache (to combine with kvpress's presses) has a backend here."""
    backends = [m for m in ("optimum.quanto", "hqq") if _installed(m)]
    if backends:
        return f"transformers' QuantizedCache backends installed: {', '.join(backends)}"
    return "transformers' QuantizedCache needs optimum-quanto or hqq, neither is installed: kvpress runs unquantized"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def kvpress_presses(methods: list[str], ratios: list[float]) -> tuple[list["KVPressAdapter"], str]:
    """Adapters for kvpress's versions of `methods` at `ratios` (methods kvpress lacks are left out), and
    a note: why none run, or which methods kvpress does not have."""
    module, why = kvpress_module()
    if module is None:
        return [], why
    out, missing = [], []
    for name in methods:
        cls = getattr(module, KVPRESS_CLASSES.get(name, ""), None)
        if cls is None:
            missing.append(name)
            continue
        out += [KVPressAdapter(cls(compression_ratio=r), name, r) for r in ratios]
    return out, (f"kvpress has no {', '.join(missing)}" if missing else "")


class KVPressAdapter:
    """A kvpress press as attnzoo's evaluation runs a press: `adapter(model, tokenizer)` is a context
    manager applying it, whose `stats()` measures the cache the model was given."""

    kind = "evict"
    stages = ("prefill",)

    def __init__(self, press, name: str, ratio: float):
        self.press, self.base_name, self.ratio = press, name, float(ratio)

    @property
    def name(self) -> str:
        return f"kvpress:{self.base_name}"

    @property
    def label(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"KVPressAdapter({self.press!r})"

    def __call__(self, model, tokenizer=None, layout=None) -> "KVPressSession":
        return KVPressSession(self.press, model)


class KVPressSession:
    """kvpress's context manager, plus a forward pre-hook that notes the cache and the tokens seen and,
    as kvpress's own pipeline does, gives forwards after the compression the positions that follow the
    tokens seen: left to the model, positions would restart from the compressed cache's length and RoPE
    would put the new queries hundreds of tokens away from where the kept keys were rotated."""

    replays_prefill = False  # kvpress compresses inside its own hooks: its prefill always runs

    def __init__(self, press, model):
        self.press, self.model = press, model
        self.cache, self.tokens = None, 0
        self._stack = contextlib.ExitStack()
        self._press_stack = contextlib.ExitStack()
        # KVzipPress compresses when its context exits, as kvpress's pipeline exits it after the prefill:
        # here that is at the forward after the prefill (its own scoring forwards pass through `_note` untouched)
        self._on_exit = type(press).__name__ in COMPRESS_ON_EXIT
        self._closing = False

    def __enter__(self):
        self._stack.callback(self._clear_masks)  # runs last
        self._press_stack.enter_context(self.press(self.model))
        self._stack.callback(self._press_stack.close)
        handle = self.model.register_forward_pre_hook(self._note, with_kwargs=True)
        self._stack.callback(handle.remove)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def _clear_masks(self):
        """kvpress leaves its masked entries on the attention modules (`masked_key_indices`) until a later
        prefill resets them inside its attention patch; a forward whose attention bypasses that patch (an
        uncompressed run that captures its prefill) would be masked by them: clear them once the run is done."""
        for _, m in hf.attention_modules(self.model):
            if getattr(m, "masked_key_indices", None) is not None:
                m.masked_key_indices = None

    def _note(self, module, args, kwargs):
        if self._closing:
            return args, kwargs
        if self._on_exit and self.tokens:
            self._closing = True
            try:
                self._press_stack.close()
            finally:
                self._closing = False
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache is not self.cache:
            self.cache, self.tokens = cache, 0
        ids = kwargs.get("input_ids", args[0] if args else None)
        length = int(ids.shape[-1]) if ids is not None else 0
        if length and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(self.tokens, self.tokens + length, device=ids.device).unsqueeze(0)
        self.tokens += length
        return args, kwargs

    def stats(self) -> dict:
        layers = [l for l in self.cache.layers if getattr(l, "is_initialized", False)] if self.cache else []
        held = sum(l.keys.shape[0] * l.keys.shape[1] * l.keys.shape[2] for l in layers if l.keys is not None)
        heads = layers[0].keys.shape[1] if layers else 0
        tokens = self.tokens * len(layers) * heads
        # presses that mask entries instead of removing them (KVzipPress, AdaKV-style) hold them all: the
        # bytes stay, the masked entries count as removed
        masked = [getattr(m, "masked_key_indices", None) for _, m in hf.attention_modules(self.model)]
        kept = held - sum(len(m[0]) for m in masked if m is not None)
        return {"bytes": cache_bytes(self.cache) if self.cache else 0, "slots": held, "entries": kept,
                "tokens": tokens, "removed": 1 - kept / tokens if tokens else 0.0, "read_fraction": None}
