"""Run attnzoo inside Hugging Face models through transformers' public AttentionInterface.

One attention function, "attnzoo", is registered with transformers (with SDPA's mask builder);
each attention module of a model can then carry a stack of hooks. A hook is a callable

    hook(module, query, key, value, attention_mask, scaling, call_next) -> (B, Hq, Sq, Dv)

with query (B, Hq, Sq, D) after RoPE, key/value (B, Hkv, Sk, D) after the cache update, and
`call_next(query, key, value, attention_mask)` running the next hook down the stack (or the
model's own SDPA attention). This is how a variant replaces attention (`use`), how activations
are captured (`capture_qkv`), and how the kv and heads packages score or ablate heads, with the
model still running its normal SDPA path wherever nothing is hooked.
"""
from __future__ import annotations

from typing import Callable

import torch

ATTN_NAME = "attnzoo"
SUPPORTED_TRANSFORMERS = ">=4.56,<6"  # the range pyproject.toml declares; CI tests its newest release
_registered = False


class UnsupportedModel(ValueError):
    """The model does not route attention through transformers' AttentionInterface."""


def _require_transformers():
    try:
        import transformers
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"attnzoo.hf needs transformers {SUPPORTED_TRANSFORMERS} with AttentionInterface and "
            f"AttentionMaskInterface ({e}); install with: pip install 'transformers{SUPPORTED_TRANSFORMERS}'"
        ) from None
    from packaging.specifiers import SpecifierSet

    if transformers.__version__ not in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True):
        raise ImportError(f"attnzoo.hf supports transformers {SUPPORTED_TRANSFORMERS}; this is "
                          f"{transformers.__version__}: pip install 'transformers{SUPPORTED_TRANSFORMERS}'")
    return transformers


def _register() -> None:
    global _registered
    if _registered:
        return
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _dispatch)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def default_attention(module, query, key, value, attention_mask, scaling) -> torch.Tensor:
    """The model's own attention (transformers' SDPA path), returned as (B, Hq, Sq, Dv)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0)
    return out.transpose(1, 2)


def _dispatch(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    # transformers' own attention functions' signature: wrappers such as kvpress's attention patch pass
    # `dropout` positionally and `scaling` by name
    hooks = list(getattr(module, "_attnzoo_hooks", ()))
    # the layer's own sliding window, which transformers passes per call (None on full-attention layers);
    # written to the instance dict: nn.Module.__setattr__ costs microseconds on every layer of every step
    module.__dict__["_attnzoo_sliding_window"] = kwargs.get("sliding_window")

    def run(i, q, k, v, mask):
        if i < 0:
            return default_attention(module, q, k, v, mask, scaling)
        return hooks[i](module, q, k, v, mask, scaling, lambda q2, k2, v2, m2: run(i - 1, q2, k2, v2, m2))

    out = run(len(hooks) - 1, query, key, value, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def attention_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, attention module) of every self-attention layer, in layer order."""
    mods = [(m.layer_idx, m) for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and type(m).__name__.endswith("Attention")]
    if not mods:
        raise UnsupportedModel(
            f"{type(model).__name__} has no attention modules with a layer_idx routed through transformers' "
            "AttentionInterface; attnzoo supports models whose attention does (Llama, Qwen, Gemma, Mistral, ...)"
        )
    return sorted(mods, key=lambda t: t[0])


def layer_count(model) -> int:
    return len(attention_modules(model))


class HookHandle:
    """Hooks attached to a model; `remove()` detaches them. Also a context manager."""

    def __init__(self, model, hooks: dict[int, Callable], innermost: bool = False):
        _register()
        self.model = model
        self.entries = []
        mods = dict(attention_modules(model))
        bad = sorted(set(hooks) - set(mods))
        if bad:
            raise ValueError(f"layers {bad} do not exist; the model has attention layers 0..{max(mods)}")
        if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
            model._attnzoo_previous_attn = model.config._attn_implementation
            _set_impl(model, ATTN_NAME)
        for layer, hook in hooks.items():
            m = mods[layer]
            if not hasattr(m, "_attnzoo_hooks"):
                m._attnzoo_hooks = []
            m._attnzoo_hooks.insert(0 if innermost else len(m._attnzoo_hooks), hook)
            self.entries.append((m, hook))

    def remove(self) -> None:
        for m, hook in self.entries:
            if hook in m._attnzoo_hooks:
                m._attnzoo_hooks.remove(hook)
        self.entries = []
        if not any(getattr(m, "_attnzoo_hooks", None) for _, m in attention_modules(self.model)):
            prev = getattr(self.model, "_attnzoo_previous_attn", None)
            if prev is not None:
                _set_impl(self.model, prev)
                del self.model._attnzoo_previous_attn

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _set_impl(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def hook(model, hooks: dict[int, Callable] | Callable, layers=None, innermost: bool = False) -> HookHandle:
    """Attach `hooks` ({layer: hook}, or one hook for `layers`, default all layers). They go on top
    of the hooks already there, or with `innermost=True` below them, next to the model's attention:
    where an observer sees the q/k/v that attention really gets after the other hooks' edits."""
    if callable(hooks):
        idx = [i for i, _ in attention_modules(model)] if layers is None else list(layers)
        hooks = {i: hooks for i in idx}
    return HookHandle(model, hooks, innermost)


# ---- any attnzoo variant inside a pretrained model -------------------------------------------


def model_window(module, causal: bool) -> dict | None:
    """The layer's own sliding window as attnzoo sliding_window parameters, or None.

    Hugging Face's sliding_window=w admits, causally, the w keys kv > q - w (the query and w - 1 before
    it: window=w - 1 here, since attnzoo's window=w admits w + 1 keys); bidirectionally the keys with
    |q - kv| <= w (window=w, right=w)."""
    w = getattr(module, "_attnzoo_sliding_window", None)
    if w is None:
        return None
    return {"window": max(int(w) - 1, 0), "right": 0} if causal else {"window": int(w), "right": int(w)}


def variant_hook(variant: str, backend: str = "auto", inputs=None, **params) -> Callable:
    """A hook that replaces the layer's attention by `variant` (causal, bottom-right aligned).

    `inputs`: the extra tensors a variant declares in `info.inputs` (document ids, gates...), as a
    dict, or as a function (query, key) -> dict called at every attention call.

    On layers where the model has its own sliding window (Mistral, Qwen2's sliding layers...), `full`
    runs that window exactly (the model's own attention) and `sliding_window` without a `window` takes
    it (see `model_window`); other variants replace the layer's attention as configured.
    """
    from .core.api import get

    from .core.recurrent import RecurrentVariant

    attn = get(variant, **params)
    if isinstance(attn, RecurrentVariant):
        raise ValueError(f"{variant} is a recurrent (linear-attention) variant: untrained, it cannot stand in for "
                         "a pretrained model's softmax attention; train it in attnzoo.nn.MultiheadAttention")

    def run(module, query, key, value, attention_mask, scaling, call_next):
        causal = bool(getattr(module, "is_causal", True))
        own = model_window(module, causal)
        runner = attn
        if own is not None and variant == "full":
            runner = get("sliding_window", **own)
        elif own is not None and variant == "sliding_window" and "window" not in params:
            runner = get("sliding_window", **{**own, **params})
        if attention_mask is not None:
            m = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e30
            sq, sk = query.shape[2], key.shape[2]
            plain = torch.ones(sq, sk, dtype=torch.bool, device=m.device)
            if causal:
                plain = torch.tril(plain, diagonal=sk - sq)
            if own is not None:  # the model's window is part of its mask, not padding
                plain = plain & get("sliding_window", **own).dense_mask(sq, sk, causal=causal, device=m.device)
            if not torch.equal(m.expand(m.shape[0], 1, sq, sk), plain.expand(m.shape[0], 1, sq, sk)):
                raise ValueError(
                    f"attnzoo.hf.use({variant!r}) got a padded or custom attention mask; run unpadded sequences "
                    "(batch size 1 or equal lengths) or use variant='full'")
        extra = inputs(query, key) if callable(inputs) else (inputs or {})
        return runner(query, key, value, causal=causal, scale=scaling, backend=backend, **extra)

    return run


def use(model, variant: str, *, layers=None, backend: str = "auto", inputs=None, **params) -> HookHandle:
    """Run `model` with `variant` as its attention (all layers, or `layers`). Permanent until
    `.remove()`, or scoped: `with attnzoo.hf.use(model, "sliding_window", window=64): ...`.
    `inputs` feeds variants that need extra tensors (see `variant_hook`)."""
    return hook(model, variant_hook(variant, backend=backend, inputs=inputs, **params), layers)


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor, layers=None) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Post-RoPE (q, k, v) of the chosen layers on `input_ids`, in SDPA layout, on the CPU."""
    out: dict[int, tuple] = {}

    def make(layer):
        def grab(module, query, key, value, attention_mask, scaling, call_next):
            out[layer] = (query.detach().cpu(), key.detach().cpu(), value.detach().cpu())
            return call_next(query, key, value, attention_mask)

        return grab

    idx = [i for i, _ in attention_modules(model)] if layers is None else list(layers)
    with HookHandle(model, {i: make(i) for i in idx}):
        model(input_ids=input_ids, use_cache=False)
    return out
