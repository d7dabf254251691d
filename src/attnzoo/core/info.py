"""What every variant declares about itself: paper, parameters, extra inputs, patterns, cost."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

# The four patterns of CAB: causal/noncausal x self (Sq == Sk) / cross (Sq != Sk).
CAUSAL_SELF = "causal_self"
CAUSAL_CROSS = "causal_cross"
NONCAUSAL_SELF = "noncausal_self"
NONCAUSAL_CROSS = "noncausal_cross"
ALL_PATTERNS = (CAUSAL_SELF, CAUSAL_CROSS, NONCAUSAL_SELF, NONCAUSAL_CROSS)
CAUSAL_PATTERNS = (CAUSAL_SELF, CAUSAL_CROSS)


def pattern_of(causal: bool, sq: int, sk: int) -> str:
    return ("causal_" if causal else "noncausal_") + ("self" if sq == sk else "cross")


@dataclass(frozen=True)
class Paper:
    title: str
    year: int
    arxiv: str | None = None

    def __str__(self) -> str:
        tail = f", arXiv:{self.arxiv}" if self.arxiv else ""
        return f"{self.title} ({self.year}{tail})"


@dataclass(frozen=True)
class Param:
    """A configuration parameter of a variant, a KV press or a head probe.

    `types`: the accepted types (bool only when listed); None accepts any type and leaves it all to
    `check`. `check(value)` returns True when valid; `expected` says what is (in error messages).
    """

    name: str
    default: Any
    doc: str
    types: tuple[type, ...] | None = (int,)
    check: Callable[[Any], bool] | None = None
    expected: str = ""

    def validate(self, owner: str, value: Any) -> Any:
        """`value`, or TypeError (wrong type) / ValueError (fails `check`) naming `owner` and the parameter."""
        if self.types is not None:
            if isinstance(value, bool) and bool not in self.types:
                raise TypeError(f"{owner}: parameter {self.name!r} must be {self._type_names()}, got bool")
            if not isinstance(value, self.types):
                raise TypeError(
                    f"{owner}: parameter {self.name!r} must be {self._type_names()}, got {type(value).__name__}"
                )
        if self.check is not None and not self.check(value):
            raise ValueError(f"{owner}: parameter {self.name!r} must be {self.expected}, got {value!r}")
        return value

    def _type_names(self) -> str:
        if self.types is None:
            return "any type"
        return " or ".join("None" if t is type(None) else t.__name__ for t in self.types)


def close_names(unknown, valid) -> dict[str, str]:
    """The closest valid name of each misspelled one (difflib), where one is close enough."""
    close = {u: difflib.get_close_matches(u, sorted(valid), n=1, cutoff=0.6) for u in unknown}
    return {u: c[0] for u, c in close.items() if c}


def did_you_mean(unknown, valid) -> str:
    """' (did you mean ...?)' naming the closest valid name of each misspelled one, or ''."""
    close = close_names(unknown, valid)
    if not close:
        return ""
    names = ", ".join(f"{c!r} for {u!r}" if len(unknown) > 1 else repr(c) for u, c in close.items())
    return f" (did you mean {names}?)"


def validate_params(owner: str, declared: Iterable[Param], given: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration of `owner` (a variant, press or probe name): every declared parameter, in
    declared order, its value from `given` or its default, each validated.

    Raises TypeError for names not declared (with the closest declared name) and for values of the
    wrong type, ValueError naming the parameter and the values it takes."""
    declared = tuple(declared)
    known = {p.name: p for p in declared}
    if len(known) != len(declared):
        twice = sorted({p.name for p in declared if sum(q.name == p.name for q in declared) > 1})
        raise ValueError(f"{owner}: parameter(s) {twice} declared more than once")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"{owner}: unknown parameter(s) {unknown}{did_you_mean(unknown, known)}; "
                        f"valid parameters: {sorted(known) or 'none'}")
    return {p.name: p.validate(owner, given.get(p.name, p.default)) for p in declared}


@dataclass(frozen=True)
class Input:
    """An extra per-call tensor a mechanism needs (document ids, gates, positions...)."""

    name: str
    shape: str  # e.g. "(B, Sk)"; letters: B batch, H query heads, Hkv kv heads, Sq, Sk, D
    doc: str
    required: bool = True
    dtype: str = "float"  # "float" | "long" | "bool"


@dataclass(frozen=True)
class VariantInfo:
    name: str
    family: str
    paper: Paper | None
    exact: bool
    patterns: tuple[str, ...]
    params: tuple[Param, ...] = ()
    inputs: tuple[Input, ...] = ()
    cost: str = ""
    state_size: str = "KV cache: Sk x (D + Dv) per kv head"
    backends: tuple[str, ...] = ("torch",)
    summary: str = ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "summary": self.summary,
            "paper": None
            if self.paper is None
            else {"title": self.paper.title, "year": self.paper.year, "arxiv": self.paper.arxiv},
            "exact": self.exact,
            "patterns": list(self.patterns),
            "params": {p.name: {"default": p.default, "doc": p.doc, "expected": p.expected} for p in self.params},
            "inputs": {i.name: {"shape": i.shape, "doc": i.doc, "required": i.required} for i in self.inputs},
            "cost": self.cost,
            "state_size": self.state_size,
            "backends": list(self.backends),
        }


def positive_int(name: str, default: Any, doc: str, allow_none: bool = False) -> Param:
    types = (int, type(None)) if allow_none else (int,)
    return Param(
        name,
        default,
        doc,
        types,
        (lambda v: v is None or v >= 1) if allow_none else (lambda v: v >= 1),
        "a positive int" + (" or None" if allow_none else ""),
    )


def nonneg_int(name: str, default: Any, doc: str) -> Param:
    return Param(name, default, doc, (int,), lambda v: v >= 0, "a non-negative int")


def positive_float(name: str, default: Any, doc: str) -> Param:
    import math

    return Param(name, default, doc, (int, float), lambda v: math.isfinite(v) and v > 0, "a finite float > 0")


class Configurable:
    """Declared parameters as attributes: KV presses and head probes (variants keep theirs in `config`).
    Subclasses set `name` and `params`; `configure` validates what the constructor was given."""

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()

    def configure(self, given: Mapping[str, Any]) -> dict[str, Any]:
        config = validate_params(self.name, self.params, given)
        for key, value in config.items():
            setattr(self, key, value)
        return config

    def validate_config(self) -> None:
        """Checks across parameters (each is an attribute by now); raise ValueError naming them."""

    @property
    def config(self) -> dict:
        """The parameters and their current values, in declared order."""
        return {p.name: getattr(self, p.name) for p in self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"
