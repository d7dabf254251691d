"""KV-cache compression for Hugging Face causal LMs: one base class, one small subclass per method.

    press = attnzoo.kv.get("snapkv", ratio=0.75)
    with press(model):
        out = model.generate(input_ids, max_new_tokens=20)

How it works (transformers' own mechanisms only):
- `attnzoo.hf` hooks every attention layer, so a press sees the queries, keys and values the model
  really uses (after RoPE and after any q/k norm), with the model still running its SDPA path.
- A forward pre-hook on the model takes the cache the caller or `generate` passes (as `cache` or
  `past_key_values`), hands it on under the name this transformers reads, records each forward's
  padding mask and supplies `position_ids` when the caller gives none (after eviction the cache is shorter than the sequence, so the
  model's own default, `arange + cache length`, would be wrong).
- Eviction writes the kept entries back into the layers of transformers' `DynamicCache`
  (`cache.layers[i].keys / .values`, its public layer API).
- Every layer checks that the keys it attends to are the ones the press's cache holds, and raises
  `CacheNotRead` otherwise: a change in how transformers routes its cache can never turn a press
  into a silent no-op.

Definitions every method shares:
- `ratio` is always the fraction of KV entries removed (0 = nothing removed), counted per row over
  the row's real (non-padding) prompt tokens: a row of L tokens keeps `L - round(ratio * L)` entries
  per layer and KV head on average. Read-sparse methods (`kind == "read"`) remove nothing from
  memory: for them `ratio` is the fraction of entries left unread at each decoding step. kv_quant
  removes no entries at all (`kind == "quantize"`). Measured bytes are reported next to the ratio.
- Per-head selection: every KV head keeps its own tokens. In the default "rectangular" layout the
  cache tensors stay transformers' own: a layer holds as many slots as its fullest head needs; heads
  (or padded rows) with smaller budgets carry empty slots masked with -inf, so per-head *budgets*
  (duo_attention, razor, moa, task_kv) save fewer bytes than entries. In the "ragged" layout
  (`press(model, layout="ragged")`, and every `compose`d press) each KV head holds only its own
  entries (ragged.py) and bytes follow entries. Both numbers are reported.
- `stages`: when a method compresses: "prefill" (once, after the first forward of a sequence) and/or
  "decode" (every later forward, holding the budget fixed at what prefill kept).
- With `ratio=0` every method leaves the model's computation untouched: logits are bit-identical.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from .. import hf
from ..core.info import Configurable, Paper, Param
from ..core.registry import Registry

SUPPORTED_TRANSFORMERS = hf.SUPPORTED_TRANSFORMERS
STAGES = ("prefill", "decode")
LAYOUTS = ("rectangular", "ragged")
KINDS = ("evict", "read", "quantize")


class UnsupportedTransformers(ImportError):
    """The installed transformers lacks the public cache API attnzoo.kv relies on."""


def require_cache_api():
    """(DynamicCache, DynamicLayer) from transformers, or a clear error naming the supported range."""
    try:
        import transformers
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError as e:
        raise UnsupportedTransformers(
            f"attnzoo.kv needs transformers {SUPPORTED_TRANSFORMERS} with transformers.cache_utils.DynamicCache "
            f"and DynamicLayer ({e}); install with: pip install 'transformers{SUPPORTED_TRANSFORMERS}'") from None
    if not ("layers" in vars(DynamicCache()) and all(hasattr(DynamicLayer, a) for a in ("update", "get_seq_length"))):
        raise UnsupportedTransformers(
            f"transformers {transformers.__version__} has no DynamicCache.layers / DynamicLayer.update API; attnzoo.kv "
            f"supports transformers {SUPPORTED_TRANSFORMERS}")
    return DynamicCache, DynamicLayer


def cache_argument(model) -> str:
    """The keyword under which `model.forward` takes its cache: `cache` (transformers >= 5.24, where
    `generate` passes it so) or `past_key_values` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    """`model(**inputs, **with_cache(model, cache))`: the cache under the name this transformers reads."""
    return {cache_argument(model): cache}


def output_cache(output):
    """The cache a forward returned (`output.cache` on transformers >= 5.24, `past_key_values` before)."""
    cache = getattr(output, "cache", None) if "cache" in getattr(output, "__dataclass_fields__", {}) else None
    return cache if cache is not None else output.past_key_values


class CacheNotRead(RuntimeError):
    """A press compressed a cache that the model did not read (an API change in transformers)."""


# ---- one attention call, as a press sees it ----------------------------------------------------


@dataclass
class Probe:
    """Tokens a press appended to the prefill forward (`KVPress.probe_ids`) to score the context by: their
    queries and keys at one layer. They attend to every context slot and causally to each other; their
    own entries are never kept."""

    query: torch.Tensor  # (B, Hq, R, D)
    keys: torch.Tensor   # (B, Hkv, R, D)
    valid: torch.Tensor  # (B, R) bool: real (non-padding) probe tokens


@dataclass
class Step:
    """One layer's attention call inside a forward, with the layer's whole cache (this forward's tokens included)."""

    layer: int
    n_layers: int
    module: torch.nn.Module
    query: torch.Tensor        # (B, Hq, Sq, D): this forward's queries, exactly as the model uses them
    keys: torch.Tensor         # (B, Hkv, S, D): every slot of the layer's cache
    values: torch.Tensor       # (B, Hkv, S, Dv)
    index: torch.Tensor        # (B, Hkv, S) long: token index of each slot in the sequence (-1: synthetic slot)
    bias: torch.Tensor         # (B, Hkv, S): 0 attendable, -inf empty/padding, else an additive logit
    extra: dict                # per-slot method state, (B, Hkv, S) each, kept aligned with the slots
    query_index: torch.Tensor  # (Sq,) long: token index of each query
    query_valid: torch.Tensor  # (B, Sq) bool: real (non-padding) queries
    query_position: torch.Tensor  # (B, Sq) long: the position ids the model rotates this forward's queries by
    row_length: torch.Tensor   # (B,) long: real tokens seen per row, this forward's included
    budget: torch.Tensor | None  # (B, Hkv) long: valid slots kept per head by prefill (None during prefill)
    scaling: float
    prefill: bool
    session: "PressSession"
    probe: Probe | None = None  # the press's probe tokens of this prefill (see KVPress.probe_ids), else None

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.keys.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        return self.bias > -math.inf

    @property
    def new(self) -> torch.Tensor:
        """(B, Hkv, S) bool: slots added by this forward."""
        return self.index >= int(self.query_index[0])

    def group_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hq, ...) -> (B, Hkv, ...): mean over the query heads that share each KV head."""
        return x.view(x.shape[0], self.keys.shape[1], self.groups, *x.shape[2:]).mean(2)

    def attention(self, rows: slice = slice(None)) -> torch.Tensor:
        """(B, Hq, q, S) float32 attention probabilities of this forward's queries `rows` over every slot,
        with the slots' masks, causality and biases; rows of padding queries are zero."""
        q = self.query[:, :, rows]
        b, hq, nq, d = q.shape
        hk, s = self.keys.shape[1], self.keys.shape[2]
        logits = (q.float().reshape(b, hk, self.groups * nq, d) @ self.keys.float().transpose(-1, -2)) * self.scaling
        logits = logits.view(b, hk, self.groups, nq, s)
        allowed = slot_bias(self.index, self.bias, self.query_index[rows])  # (B, Hkv, q, S)
        p = torch.softmax(logits + allowed.unsqueeze(2), dim=-1).nan_to_num(0.0)
        p = p * self.query_valid[:, rows].view(b, 1, 1, nq, 1)
        return p.view(b, hq, nq, s)

    def probe_log_attention(self, rows: slice = slice(None)) -> torch.Tensor:
        """(B, Hq, r, S) float32 log attention probabilities of the probe's queries `rows` over every slot: one
        softmax over the slots (with their masks and biases; all precede the probe) and, causally, the
        probe's own keys, whose share is left out; -inf for masked slots and padding probe tokens."""
        probe = self.probe
        q = probe.query[:, :, rows]
        b, hq, nq, d = q.shape
        hk, s, r = self.keys.shape[1], self.keys.shape[2], probe.keys.shape[2]
        q = q.float().reshape(b, hk, self.groups * nq, d)
        to_slots = torch.baddbmm(self.bias.float().reshape(b * hk, 1, s), q.reshape(b * hk, -1, d),
                                 self.keys.float().reshape(b * hk, s, d).transpose(-1, -2),
                                 alpha=self.scaling).view(b, hk, self.groups, nq, s)
        own = torch.arange(r, device=q.device)[rows]
        r = int(own[-1]) + 1  # causal: probe keys after the rows' last one are never visible to them
        visible = (torch.arange(r, device=q.device) <= own.view(-1, 1)).unsqueeze(0) & probe.valid[:, :r].unsqueeze(1)
        to_probe = (q @ probe.keys[:, :, :r].float().transpose(-1, -2)).view(b, hk, self.groups, nq, r) * self.scaling
        to_probe = to_probe.masked_fill(~visible.view(b, 1, 1, nq, r), -math.inf)
        # the normaliser without concatenating the two parts (the rows are long)
        lse = torch.logaddexp(torch.logsumexp(to_slots, -1), torch.logsumexp(to_probe, -1)).unsqueeze(-1)
        real = probe.valid[:, rows].view(b, 1, 1, nq, 1) & (lse > -math.inf)
        return (to_slots - lse).masked_fill(~real, -math.inf).reshape(b, hq, nq, s)

    def context(self, n_probe: int) -> "Step":
        """This step without the last `n_probe` queries and slots (the probe this forward appended), which
        become its `probe`."""
        c = self.keys.shape[2] - n_probe
        cut = lambda t: t[..., :c]
        probe = Probe(self.query[:, :, -n_probe:], self.keys[:, :, c:], self.query_valid[:, -n_probe:])
        return dataclasses.replace(
            self, query=self.query[:, :, :-n_probe], keys=self.keys[:, :, :c], values=self.values[:, :, :c],
            index=cut(self.index), bias=cut(self.bias), extra={k: cut(t) for k, t in self.extra.items()},
            query_index=self.query_index[:-n_probe], query_valid=self.query_valid[:, :-n_probe],
            query_position=self.query_position[:, :-n_probe], probe=probe)

    def n_keep(self, ratio: float) -> torch.Tensor:
        """(B,) entries each row keeps at `ratio`."""
        return keep_count(self.row_length, ratio)


def keep_count(length: torch.Tensor, ratio: float) -> torch.Tensor:
    """Entries kept out of `length` when the fraction `ratio` is removed (at least one)."""
    return (length - torch.round(length.double() * ratio).long()).clamp(min=1)


def slot_bias(index: torch.Tensor, bias: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, Sq, S) additive mask: each slot's bias where the slot is causally visible, else -inf."""
    visible = index.unsqueeze(2) <= query_index.view(1, 1, -1, 1)
    return torch.where(visible, bias.unsqueeze(2), -math.inf)


def topk_mask(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bool mask of the `count` highest scores along the last axis; `count` broadcasts from the left
    over the leading axes (e.g. scores (B, Hkv, S) with count (B,) or (B, Hkv)). Ties go to the earlier
    slot, so results do not depend on the batch layout."""
    count = torch.as_tensor(count, device=scores.device)
    count = count.view(*count.shape, *[1] * (scores.dim() - 1 - count.dim())).expand(scores.shape[:-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=order.device)
                                            .expand_as(order))
    return rank < count.unsqueeze(-1)


@dataclass
class Selection:
    """What a press keeps: a slot mask, plus optional synthetic slots appended to the layer (razor's
    compensation tokens), each with its additive attention bias."""

    keep: torch.Tensor  # (B, Hkv, S) bool
    extra_keys: torch.Tensor | None = None    # (B, Hkv, n, D)
    extra_values: torch.Tensor | None = None  # (B, Hkv, n, Dv)
    extra_bias: torch.Tensor | None = None    # (B, Hkv, n)


# ---- the base class --------------------------------------------------------------------------------


def _is_ratio(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value < 1.0


# Any type is taken and `check` alone decides, so every bad ratio (a str, None, True...) is a ValueError.
RATIO = Param("ratio", 0.0, "fraction of KV entries removed (read-sparse methods: left unread); 0 = nothing removed",
              None, _is_ratio, "a number in [0, 1), the fraction of KV entries removed (0 = nothing removed)")


class KVPress(Configurable):
    """A KV-cache compression method. Subclasses set the class attributes and override `keep` (what
    to keep after prefill and, for decode-stage methods, after each later forward) and/or `read`
    (which slots each query may read, for read-sparse methods)."""

    name: ClassVar[str] = ""
    paper: ClassVar[Paper | None] = None
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    kind: ClassVar[str] = "evict"
    summary: ClassVar[str] = ""
    # How a session stores the cache: "rectangular" (transformers' tensors, each layer padded to its
    # fullest KV head) or "ragged" (each KV head holds only its own entries, see ragged.py).
    layout: ClassVar[str] = "rectangular"
    # Presses that profile the model with real questions need its tokenizer: press(model, tokenizer).
    needs_tokenizer: ClassVar[bool] = False
    # The constructor's parameters, validated by `validate_params` and then set as attributes of the
    # same names; subclasses extend the base's: `params = KVPress.params + (Param(...), ...)`.
    params: ClassVar[tuple[Param, ...]] = (RATIO,)

    def __init__(self, ratio: float = 0.0, **params):
        self.configure({"ratio": ratio, **params})
        self.ratio = float(self.ratio)
        self.validate_config()

    @classmethod
    def param_docs(cls) -> dict[str, str]:
        """{parameter name: doc}, in declared order (what `params` was before it held `Param`s)."""
        return {p.name: p.doc for p in cls.params}

    def __call__(self, model, tokenizer=None, layout: str | None = None) -> "PressSession":
        """A context manager applying this press to `model` (`tokenizer`: used by presses that profile
        the model on real text; without one they read the text's UTF-8 bytes as token ids; `layout`:
        "rectangular" or "ragged", default the press's own)."""
        return PressSession(self, model, tokenizer, layout)

    def __add__(self, other: "KVPress") -> "KVPress":
        """`press_a + press_b`: a pipeline applying a, then b to what a kept (see `attnzoo.kv.compose`)."""
        from .compose import compose

        return compose(self, other)

    def quantization(self) -> tuple[int, int] | None:
        """(bits, group) the kept entries are stored in after compression, or None (full precision)."""
        return None

    @property
    def label(self) -> str:
        return self.name

    @property
    def active(self) -> bool:
        return self.ratio > 0

    # -- what subclasses override --------------------------------------------------------------------

    def prepare(self, model, tokenizer) -> None:
        """One-time work per model before the first forward (profiling, training). Default: nothing."""

    def on_new_cache(self, cache, n_layers: int) -> None:
        """Called when a sequence starts on `cache`, before the first forward touches it."""

    def keep(self, step: Step) -> Selection | torch.Tensor | None:
        """Slots to keep (bool (B, Hkv, S)) or a Selection; None keeps everything."""
        return None

    def read(self, step: Step) -> torch.Tensor | None:
        """(B, Hq or Hkv, Sq, S) bool: slots each query may read this forward; None reads all."""
        return None

    def probe_ids(self, input_ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Tokens to append to the prefill of `input_ids` (B, L) with real tokens `valid` (B, L): ((B, R) ids,
        (B, R) bool valid), or None. The session runs them in the same forward, after the context; `keep`
        then sees their queries and keys at each layer as `step.probe`, the step itself holding the context
        only; they are never kept, and the forward's logits are the context's. Default: none."""
        return None

    @property
    def probes(self) -> bool:
        return type(self).probe_ids is not KVPress.probe_ids


PRESSES: Registry[type[KVPress]] = Registry("KV-cache method")


def register(cls: type[KVPress]) -> type[KVPress]:
    """Class decorator: adds a press to `PRESSES` under `cls.name`."""
    if cls.kind not in KINDS or not cls.stages or set(cls.stages) - set(STAGES):
        raise ValueError(f"{cls.name}: kind must be one of {KINDS}, stages a subset of {STAGES}")
    if "ratio" not in {p.name for p in cls.params}:
        raise ValueError(f"{cls.name}: params must declare 'ratio' (extend the base's: KVPress.params + (...))")
    return PRESSES.register(cls)


def get(name: str, **params) -> KVPress:
    """A configured press: `get("snapkv", ratio=0.75)`."""
    return PRESSES.get(name)(**params)


def methods() -> list[type[KVPress]]:
    """Every registered press class, in registration order."""
    return list(PRESSES)


# ---- applying a press to a model ---------------------------------------------------------------------


class _Settled:
    """An attribute of `_Slots` that first appends the deferred decoding tokens, when read or replaced."""

    def __set_name__(self, owner, name):
        self.name = "_" + name

    def __get__(self, slots, owner=None):
        slots._settle()
        return getattr(slots, self.name)

    def __set__(self, slots, value):
        slots._settle()
        setattr(slots, self.name, value)


class _Slots:
    """Per-layer bookkeeping aligned with the cache slots. A decoding step that needs no Step (see
    `PressSession._plain_decode`) only records its token here; such tokens (attendable, bias 0) are
    appended when the bookkeeping is next read, so that step costs no tensor operation per layer."""

    index, bias, extra = _Settled(), _Settled(), _Settled()

    def __init__(self, index: torch.Tensor, bias: torch.Tensor, extra: dict | None = None):
        self._index, self._bias, self._extra = index, bias, {} if extra is None else extra
        self.budget: torch.Tensor | None = None
        self.plain = False   # every slot attendable with bias 0: a lone query may attend to all of them unmasked
        self._pending = []   # token indices (consecutive) of decoded tokens not appended yet

    def defer(self, token: int) -> None:
        self._pending.append(token)

    def _settle(self) -> None:
        if not self._pending:
            return
        first, n = self._pending[0], len(self._pending)
        self._pending = []
        batch, heads = self._index.shape[:2]
        dev = self._index.device
        self._index = torch.cat([self._index, torch.arange(first, first + n, device=dev).expand(batch, heads, -1)], -1)
        self._bias = torch.cat([self._bias, self._bias.new_zeros(batch, heads, n)], -1)
        self._extra = {k: torch.cat([t, t.new_zeros(batch, heads, n)], -1) for k, t in self._extra.items()}


@dataclass
class _Forward:
    seen: int                 # tokens (padding included) before this forward
    length: int               # tokens in this forward
    valid: torch.Tensor       # (B, length) bool
    position: torch.Tensor    # (B, length) position ids
    prefill: bool
    probe: int = 0            # trailing probe tokens the press appended (KVPress.probe_ids); not context
    logits_of: int = 0        # when > 0, the output's logits are cut to the first `logits_of` positions
    all_valid: bool = field(init=False)  # computed once: every layer asks

    def __post_init__(self):
        self.all_valid = bool(self.valid.all())


class PressSession:
    """`with press(model) as session:` hooks `model` for the duration; `session.stats()` measures the cache."""

    def __init__(self, press: KVPress, model, tokenizer=None, layout: str | None = None):
        self.press, self.model, self.tokenizer = press, model, tokenizer
        self.layout = press.layout if layout is None else layout
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if self.layout == "rectangular" and press.quantization() is not None:
            raise ValueError(f"{press.label} stores its entries quantized, which needs layout='ragged'")
        self.active = False
        self.cache = None
        self._handles: list = []
        # Whether forwards after the prefill need a Step (presses that compress while decoding, read-sparse
        # presses); the others attend to a ragged cache directly, or to a rectangular one as the model does
        # (`_plain_decode`). Set on entering (the press is fixed; every layer of every step asks).
        self._steps_after_prefill = True
        self._reset()

    def _reset(self):
        self._slots: dict[int, _Slots] = {}
        self._seen = 0
        self._real_seen = None
        self._forward: _Forward | None = None
        self.exact = True          # no layer deviates from the model's own masks yet
        self.shared: dict = {}     # cross-layer state of a press within one sequence
        self.read_counts = [0, 0]  # slots read, slots readable (read-sparse presses, decoding forwards)

    # -- context manager -----------------------------------------------------------------------------

    def __enter__(self):
        self._cache_class, self._layer_class = require_cache_api()
        self._cache_arg = cache_argument(self.model)
        layers = [i for i, _ in hf.attention_modules(self.model)]
        self.n_layers = len(layers)
        if self.press.active:
            self.press.prepare(self.model, self.tokenizer)
        from .ragged import ragged_attention

        self._ragged_attention = ragged_attention
        decodes = "decode" in self.press.stages and type(self.press).keep is not KVPress.keep
        self._steps_after_prefill = self.press.active and (decodes or self.press.kind == "read")
        self._handles = [
            hf.hook(self.model, {i: self._layer_hook(i) for i in layers}),
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        self.active = True
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.active = False

    # -- model-level hooks ---------------------------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        DynamicCache = self._cache_class
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape_src = ids if ids is not None else kwargs.get("inputs_embeds")
        batch, length = shape_src.shape[:2]
        # The cache may come under either name (generate passes `cache` since transformers 5.24,
        # callers still pass `past_key_values`): find it, and hand it on under the name this model's
        # forward reads, so the object we compress is the object the model uses.
        names = [n for n in ("cache", "past_key_values") if kwargs.get(n) is not None]
        if len(names) > 1:
            raise ValueError("pass the cache as `cache` or `past_key_values`, not both")
        cache = kwargs.pop(names[0]) if names else None
        if cache is None:
            if not kwargs.get("use_cache", getattr(self.model.config, "use_cache", True)):
                self._forward = None
                return args, kwargs
            cache = DynamicCache(config=self.model.config)
        kwargs[self._cache_arg] = cache
        if not isinstance(cache, DynamicCache):
            raise TypeError(f"attnzoo.kv compresses transformers' DynamicCache; got {type(cache).__name__}")
        held = cache.get_seq_length()
        if cache is not self.cache or held == 0:
            self._reset()
            self.cache, self._seen = cache, held
            self._real_seen = torch.full((batch,), held, dtype=torch.long)
            if self.layout == "ragged":
                self._make_ragged(cache)
            else:
                _check_layers(cache, self._layer_class)
            if self.press.active:
                self.press.on_new_cache(cache, self.n_layers)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("attnzoo.kv needs a 2D attention_mask (batch, tokens) or none; got a "
                             f"{mask.dim()}D mask")
        valid = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask[:, -length:].bool().cpu()
        self._real_seen = self._real_seen + valid.sum(1)
        prefill = not self._slots
        probe = None
        if prefill and self.press.active and self.press.probes:
            if ids is None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
                raise ValueError(f"{self.press.label} appends probe tokens to the prefill: call the model with "
                                 "input_ids and without output_attentions / output_hidden_states")
            probe = self.press.probe_ids(ids, valid)
        if probe is not None:
            args, kwargs, valid = self._append_probe(args, kwargs, ids, valid, *probe)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(self._seen, self._seen + valid.shape[1],
                                                  device=shape_src.device).unsqueeze(0).expand(batch, -1)
        position = kwargs["position_ids"].reshape(-1, valid.shape[1]).expand(batch, -1)
        self._forward = _Forward(self._seen, valid.shape[1], valid, position, prefill=prefill,
                                 probe=valid.shape[1] - length, logits_of=length if probe is not None else 0)
        return args, kwargs

    def _append_probe(self, args, kwargs, ids, valid, probe, probe_valid):
        """The forward's inputs with the press's probe tokens appended (positions, masks, and the logits
        asked for, which stay the context's)."""
        batch, length = ids.shape
        if probe.shape[0] != batch or probe_valid.shape != probe.shape:
            raise RuntimeError(f"{self.press.label}: probe_ids returned ids {tuple(probe.shape)} and valid "
                               f"{tuple(probe_valid.shape)} for {batch} rows")
        r = probe.shape[1]
        if "input_ids" not in kwargs:  # given by position: from here it travels as a keyword
            args = args[1:]
        kwargs["input_ids"] = torch.cat([ids, probe.to(ids.device)], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask, probe_valid.to(mask)], dim=1)
        after = lambda t: t[..., -1:] + torch.arange(1, r + 1, device=t.device)
        for name in ("position_ids", "cache_position"):  # cache_position: transformers < 5.24
            if kwargs.get(name) is not None:
                kwargs[name] = torch.cat([kwargs[name], after(kwargs[name])], dim=-1)
        keep = kwargs.get("logits_to_keep", 0)
        # the context's logits only (the last `keep`, or all of them): the probe's would cost a vocabulary
        # product per probe token; models without `logits_to_keep` have theirs cut after the forward
        if isinstance(keep, int) and "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kwargs["logits_to_keep"] = torch.arange(max(0, length - keep) if keep else 0, length, device=ids.device)
        return args, kwargs, torch.cat([valid, probe_valid.cpu()], dim=1)

    def _make_ragged(self, cache) -> None:
        """Give `cache` ragged layers (empty ones are replaced; ragged ones are adopted)."""
        from .ragged import ragged_layer_class

        ragged = ragged_layer_class()
        _check_layers(cache, self._layer_class, allowed=(ragged,))
        if len(cache.layers) < self.n_layers:
            cache.layers.extend(ragged() for _ in range(self.n_layers - len(cache.layers)))
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, ragged):
                if layer.get_seq_length():
                    raise ValueError("a ragged session must see the sequence from its first token (got a non-empty "
                                     "DynamicCache); start from an empty cache or attnzoo.kv.ragged_cache(config)")
                cache.layers[i] = layer = ragged()
            layer.reader = self

    def _after_forward(self, module, args, kwargs, output):
        fwd = self._forward
        if fwd is not None:
            self._seen += fwd.length - fwd.probe
            self._forward = None
            if fwd.logits_of and output is not None and output.logits.shape[1] > fwd.logits_of:
                output.logits = output.logits[:, :fwd.logits_of]
        return output

    # -- per-layer hook ------------------------------------------------------------------------------

    def _layer_hook(self, layer: int) -> Callable:
        def run(module, query, key, value, attention_mask, scaling, call_next):
            fwd = self._forward
            if fwd is None:
                return call_next(query, key, value, attention_mask)
            self._check_cache_is_read(layer, key)
            if self._plain_decode(layer, fwd):
                self._slots[layer].defer(fwd.seen)
                return call_next(query, key, value, None)
            if self.layout == "ragged":
                cache_layer = self.cache.layers[layer]
                if cache_layer.tail_valid is not None or not fwd.all_valid:  # None: no padding in the tail
                    before = cache_layer.tail_valid
                    if before is None:
                        before = torch.ones(key.shape[0], key.shape[2] - fwd.length, dtype=torch.bool)
                    cache_layer.tail_valid = torch.cat([before.to(key.device), fwd.valid.to(key.device)], dim=1)
                if cache_layer.packed is not None:
                    if not self._steps_after_prefill:
                        scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
                        return self._ragged_attention(query, cache_layer.packed, key, value, cache_layer.tail_valid,
                                                      scale)
                    key, value = self._padded_view(cache_layer, key, value)
            with torch.no_grad():
                step = self._step(layer, module, fwd, query, key, value, scaling)
                if fwd.probe:
                    step = step.context(fwd.probe)
                read = self.press.read(step) if self.press.active else None
                if self.press.active and self.press.kind == "read" and not fwd.prefill:
                    self._count_reads(step, read)  # layers left dense (read None) count as reading everything
            # During prefill no layer has been compressed before its own attention runs: the model's mask is right.
            if read is None and (fwd.prefill or self.exact):
                out = call_next(query, key, value, attention_mask)
            else:
                out = call_next(query, key, value, attention_mask_for(step, read))
            if self.press.active and (fwd.prefill or "decode" in self.press.stages):
                with torch.no_grad():
                    selection = self.press.keep(step)
                    # the probe's own entries leave the cache even when the press keeps every context entry
                    self._apply(step, step.valid if selection is None and fwd.probe else selection,
                                cut=bool(fwd.probe))
            slots = self._slots[layer]
            if fwd.prefill:
                slots.budget = (slots.bias > -math.inf).sum(-1)
            if not self._steps_after_prefill:
                slots.plain = bool((slots.bias == 0).all())
            return out

        return run

    def _plain_decode(self, layer: int, fwd: "_Forward") -> bool:
        """Whether this forward's attention at `layer` is the model's own, unmasked: one real query per row
        over a rectangular cache whose slots are all attendable with bias 0, for a press with nothing to do
        after prefill. Then no Step is built; the token is only recorded in the layer's bookkeeping."""
        slots = self._slots.get(layer)
        return (self.layout == "rectangular" and not fwd.prefill and fwd.length == 1 and fwd.all_valid
                and slots is not None and slots.plain and not self._steps_after_prefill)

    def _padded_view(self, cache_layer, tail_keys, tail_values):
        """Rectangular keys / values of a ragged layer (packed entries to the front of each head, then the
        tail): the slots the session's bookkeeping is aligned with."""
        from .ragged import unpack

        k, v, _ = unpack(cache_layer.packed, tail_keys.shape[0])
        return (torch.cat([k.to(tail_keys.dtype), tail_keys], dim=2),
                torch.cat([v.to(tail_values.dtype), tail_values], dim=2))

    def _check_cache_is_read(self, layer: int, key: torch.Tensor) -> None:
        """The keys this layer attends to must be the ones the press's cache holds: if transformers
        routed another cache (or none) to the layer, compressing ours would be a silent no-op."""
        cache_layer = self.cache.layers[layer] if layer < len(self.cache.layers) else None
        held = 0 if cache_layer is None else (
            cache_layer.keys.shape[-2] if self.layout == "ragged" else cache_layer.get_seq_length())
        if held != key.shape[-2]:
            import transformers

            raise CacheNotRead(
                f"layer {layer} attended to {key.shape[-2]} cached keys that are not in the cache attnzoo.kv "
                f"manages ({held} there): this transformers "
                f"{transformers.__version__} passes the cache in a way attnzoo {_version()} does not know, so "
                f"compression would silently do nothing. attnzoo.kv supports transformers {SUPPORTED_TRANSFORMERS}.")

    def _step(self, layer, module, fwd: _Forward, query, key, value, scaling) -> Step:
        batch, hkv, total = key.shape[:3]
        dev = key.device
        valid = fwd.valid.to(dev)
        new_index = torch.arange(fwd.seen, fwd.seen + fwd.length, device=dev)
        new_bias = torch.zeros(batch, fwd.length, device=dev).masked_fill(~valid, -math.inf)
        slots = self._slots.get(layer)
        if slots is None:  # first forward on this cache: earlier entries (if any) are plain tokens
            before = total - fwd.length
            slots = _Slots(torch.arange(before, device=dev).expand(batch, hkv, -1),
                           torch.zeros(batch, hkv, before, device=dev))
            self._slots[layer] = slots
        slots.index = torch.cat([slots.index, new_index.expand(batch, hkv, -1)], dim=-1)
        slots.bias = torch.cat([slots.bias, new_bias.unsqueeze(1).expand(-1, hkv, -1)], dim=-1)
        for name, t in slots.extra.items():
            slots.extra[name] = torch.cat([t, t.new_zeros(batch, hkv, fwd.length)], dim=-1)
        if slots.index.shape[-1] != total:
            raise RuntimeError(f"layer {layer}: the cache holds {total} entries but the press tracked "
                               f"{slots.index.shape[-1]}; was the cache changed outside the press?")
        return Step(layer=layer, n_layers=self.n_layers, module=module, query=query, keys=key, values=value,
                    index=slots.index, bias=slots.bias, extra=slots.extra, query_index=new_index,
                    query_valid=valid, query_position=fwd.position.to(dev), row_length=self._real_seen.to(dev),
                    budget=slots.budget,
                    scaling=float(scaling if scaling is not None else query.shape[-1] ** -0.5),
                    prefill=fwd.prefill, session=self)

    def _count_reads(self, step: Step, read: torch.Tensor | None) -> None:
        visible = slot_bias(step.index, step.bias, step.query_index) > -math.inf  # (B, Hkv, Sq, S)
        visible = visible.repeat_interleave(step.groups, dim=1)  # counted per query head, as reads are
        read = visible if read is None else read
        if read.shape[1] != visible.shape[1]:
            read = read.repeat_interleave(step.groups, dim=1)
        self.read_counts[0] += int((read & visible).sum())
        self.read_counts[1] += int(visible.sum())

    def _apply(self, step: Step, selection, cut: bool = False) -> None:
        """Keep the selected slots of `step.layer` (packed to the front, per row and head) in the cache; `cut`:
        the cache holds more than `step`'s slots (a probe), so it is rewritten even if nothing is dropped."""
        if selection is None:
            return
        quantized = self.layout == "ragged" and self.press.quantization() is not None
        kept = selection if isinstance(selection, Step) else restrict(step, selection, keep_all=quantized or cut)
        if kept is None:
            return  # nothing valid dropped: leave the cache (and the model's own masks) untouched
        slots = self._slots[step.layer]
        cache_layer = self.cache.layers[step.layer]
        if self.layout == "ragged":
            from .ragged import pack

            keep = kept.bias > -math.inf
            bits, group = self.press.quantization() or (None, 32)
            cache_layer.store(pack(kept.keys, kept.values, keep, kept.bias, bits, group))
            # the bookkeeping follows the order the packed entries unpack in (each head's to the front)
            n = int(keep.sum(-1).max())
            order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
            kept = _gathered(kept, order, keys=False)
        else:
            cache_layer.keys, cache_layer.values = kept.keys.contiguous(), kept.values.contiguous()
        slots.index, slots.bias, slots.extra = kept.index, kept.bias, kept.extra
        self.exact = False

    @property
    def replays_prefill(self) -> bool:
        """Whether this press's prefill output is the uncompressed model's (it compresses only after each
        layer's attention and reads everything): then one shared prefill serves every such press."""
        return type(self.press).read is KVPress.read and not self.press.probes

    @torch.no_grad()
    def replay_prefill(self, input_ids: torch.Tensor, captured: dict, cache) -> None:
        """Fill and compress `cache` as `model(input_ids=input_ids, cache=cache)` would in this session,
        from the (query, key, value, scaling) each layer produced on that forward uncompressed
        (`capture_prefill`), without running the model again: only for presses that `replays_prefill`."""
        if not self.replays_prefill:
            raise ValueError(f"{self.press.label} reads sparsely during prefill: its prefill cannot be replayed")
        _, kwargs = self._before_forward(self.model, (), {"input_ids": input_ids, self._cache_arg: cache})
        cache = kwargs[self._cache_arg]
        modules = dict(hf.attention_modules(self.model))
        for layer in sorted(captured):
            query, key, value, scaling = captured[layer]
            keys, values = cache.update(key, value, layer)
            self._layer_hook(layer)(modules[layer], query, keys, values, None, scaling, lambda *a: None)
        self._after_forward(self.model, (), kwargs, None)

    # -- measurements --------------------------------------------------------------------------------

    def stats(self) -> dict:
        """What the cache holds now: bytes of its tensors, slots, valid entries, and the real tokens seen."""
        layers = [] if self.cache is None else [l for l in self.cache.layers if getattr(l, "is_initialized", False)]
        nbytes = cache_bytes(self.cache) if self.cache is not None else 0
        slots = entries = 0
        for i, l in enumerate(layers):
            if self.layout == "ragged":
                slots += l.entries()
                entries += l.entries()
            elif i in self._slots:
                s = self._slots[i]
                slots += s.bias.numel()
                entries += int((s.bias > -math.inf).sum())
            else:
                n = l.get_seq_length() * l.keys.shape[0] * l.keys.shape[1] if l.keys is not None else 0
                slots += n
                entries += n
        heads = layers[0].keys.shape[1] if layers and layers[0].keys is not None and layers[0].keys.dim() == 4 else 0
        tokens = int(self._real_seen.sum()) * len(layers) * heads if self._real_seen is not None else 0
        read = self.read_counts[0] / self.read_counts[1] if self.read_counts[1] else None
        return {"bytes": nbytes, "slots": slots, "entries": entries, "tokens": tokens,
                "removed": 1 - entries / tokens if tokens else 0.0, "read_fraction": read}

    def kept_tokens(self, layer: int) -> list[list[torch.Tensor]]:
        """Per row and KV head: the sorted token indices the layer holds, counted from the row's first real token."""
        s = self._slots[layer]
        pad = (self._seen - self._real_seen) if self._real_seen is not None else 0
        out = []
        for b in range(s.index.shape[0]):
            row = []
            for h in range(s.index.shape[1]):
                ok = (s.bias[b, h] > -math.inf) & (s.index[b, h] >= 0)
                row.append(torch.sort(s.index[b, h][ok]).values - int(pad[b]))
            out.append(row)
        return out


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("attnzoo")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "(source)"


def _check_layers(cache, DynamicLayer, allowed: tuple = ()) -> None:
    """Every layer must be a plain full-attention DynamicLayer (or one of `allowed`): pruning a
    sliding-window, static or quantized layer would break its own bookkeeping."""
    kinds = {type(l) for l in cache.layers} | ({cache.layer_class_to_replicate} if cache.layer_class_to_replicate
                                                else set())
    bad = sorted(k.__name__ for k in kinds if k is not DynamicLayer and k not in allowed)
    if bad:
        raise TypeError(f"attnzoo.kv prunes full-attention DynamicLayer caches; this cache has {', '.join(bad)} "
                        "layers (sliding-window or hybrid models, static or quantized caches are not supported)")


def cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers cache holds (quantized layers count their codes and scales)."""
    total = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        if hasattr(layer, "bytes_held"):  # quantized and ragged layers count codes, scales, offsets, tails
            total += layer.bytes_held()
        else:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    return total


def _gathered(step: Step, order: torch.Tensor, keys: bool = True) -> Step:
    """`step` with its slots reordered / cut to `order` (B, Hkv, n); keys and values too when `keys`."""
    take = lambda t: t.gather(2, order)
    kv = (t.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])) for t in (step.keys, step.values)) \
        if keys else (step.keys, step.values)
    k, v = kv
    return dataclasses.replace(step, keys=k, values=v, index=take(step.index), bias=take(step.bias),
                               extra={name: take(t) for name, t in step.extra.items()})


def restrict(step: Step, selection: Selection | torch.Tensor, keep_all: bool = False) -> Step | None:
    """`step` reduced to what `selection` keeps: the kept slots packed to the front of each row and head
    (empty slots after them masked with -inf), then the selection's synthetic slots. None when nothing
    valid is dropped and nothing added (unless `keep_all`). This is what a press's cache holds after
    `keep`, and what the next press of a pipeline sees."""
    if isinstance(selection, torch.Tensor):
        selection = Selection(selection)
    keep = selection.keep & step.valid
    if not keep_all and bool((keep | ~step.valid).all()) and selection.extra_keys is None:
        return None
    count = keep.sum(-1)
    n = int(count.max())
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
    filler = torch.arange(n, device=count.device).view(1, 1, n) >= count.unsqueeze(-1)
    out = _gathered(step, order)
    out.bias = out.bias.masked_fill(filler, -math.inf)
    if selection.extra_keys is not None:
        m = selection.extra_keys.shape[2]
        out.keys = torch.cat([out.keys, selection.extra_keys.to(out.keys.dtype)], dim=2)
        out.values = torch.cat([out.values, selection.extra_values.to(out.values.dtype)], dim=2)
        out.index = torch.cat([out.index, out.index.new_full((*out.index.shape[:2], m), -1)], dim=2)
        out.bias = torch.cat([out.bias, selection.extra_bias.float()], dim=2)
        out.extra = {k: torch.cat([t, t.new_zeros(*t.shape[:2], m)], dim=2) for k, t in out.extra.items()}
    return out


def attention_mask_for(step: Step, read: torch.Tensor | None) -> torch.Tensor:
    """(B, Hq, Sq, S) additive mask from the slots (validity, causality, biases) and an optional read mask."""
    mask = slot_bias(step.index, step.bias, step.query_index)
    if read is not None and read.shape[1] == mask.shape[1]:
        mask = mask.masked_fill(~read, -math.inf)
    mask = mask.repeat_interleave(step.groups, dim=1)
    if read is not None and read.shape[1] != step.keys.shape[1]:
        mask = mask.masked_fill(~read, -math.inf)
    # Padding queries see nothing; give them every slot so SDPA stays finite (their outputs are never used).
    empty = (mask == -math.inf).all(-1, keepdim=True)
    mask = mask.masked_fill(empty, 0.0)
    return mask.to(step.query.dtype)
