"""The backend registry: backends register themselves; the core imports none of them.

A backend is a name, a priority (higher wins under `backend="auto"`), a capability check
`why_not(variant, call, q) -> str | None` (None = it can run this call; else the reason it cannot),
its run function `run(variant, q, k, v, call)`, and `serves(variant_class) -> bool`, what it can
serve at all (for `info.backends` and listings). Adding a backend (Triton kernels, fla, a
distributed one) is a module that calls `register_backend` when imported, never a core edit:

    from attnzoo.core.dispatch import Backend, register_backend
    register_backend(Backend("mine", priority=50, why_not=..., run=..., serves=...))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    name: str
    priority: int
    why_not: Callable[[Any, Any, Any], "str | None"]
    run: Callable[..., Any]
    serves: Callable[[type], bool] = lambda cls: True
    # An extra condition for `backend="auto"` only (e.g. "compiled Flex is slower on CPU"): a backend that
    # can run a call may still not be the automatic choice for it. None = no extra condition.
    auto_why_not: Callable[[Any, Any, Any], "str | None"] | None = None
    doc: str = ""

    def auto_reason(self, variant, call, q) -> str | None:
        why = self.why_not(variant, call, q)
        if why is None and self.auto_why_not is not None:
            why = self.auto_why_not(variant, call, q)
        return why


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add `backend` to the registry (`replace=True` swaps one of the same name)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend takes a Backend, got {type(backend).__name__}")
    if not backend.name or backend.name == AUTO:
        raise ValueError(f"a backend needs a name other than {AUTO!r}, got {backend.name!r}")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered (pass replace=True to swap it)")
    _BACKENDS[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    _BACKENDS.pop(name, None)


def backends() -> list[Backend]:
    """Registered backends, highest priority first."""
    _load_builtin()
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def serving(cls) -> tuple[str, ...]:
    """Names of the backends that can serve variant class `cls` at all, highest priority first."""
    return tuple(b.name for b in backends() if b.serves(cls))


def reasons(variant, call, q) -> dict[str, str | None]:
    """Every backend -> None if it can run this call, else why not (in priority order)."""
    return {b.name: b.why_not(variant, call, q) for b in backends()}


def choose(variant, call, q) -> Backend:
    for b in backends():
        if b.auto_reason(variant, call, q) is None:
            return b
    why = "; ".join(f"{n}: {r}" for n, r in reasons(variant, call, q).items())
    raise ValueError(f"no backend can run {variant.name} for this call ({why})")


def run(variant, q, k, v, call, backend: str = AUTO):
    names = [b.name for b in backends()]
    if not isinstance(backend, str) or (backend != AUTO and backend not in names):
        raise ValueError(f"backend must be one of {[AUTO, *names]}, got {backend!r}")
    if backend == AUTO:
        chosen = choose(variant, call, q)
    else:
        chosen = _BACKENDS[backend]
        why = chosen.why_not(variant, call, q)
        if why:
            raise ValueError(f"backend={backend!r} cannot serve this call: {why}")
    return chosen.run(variant, q, k, v, call)


def explain(variant, call, q) -> list[dict]:
    """One row per backend: name, priority, whether `auto` picks it, and why (not)."""
    rows, picked = [], None
    for b in backends():
        why = b.auto_reason(variant, call, q)
        chosen = why is None and picked is None
        picked = b.name if chosen else picked
        rows.append({"backend": b.name, "priority": b.priority, "chosen": chosen,
                     "runs": b.why_not(variant, call, q) is None,
                     "reason": ("chosen: the highest-priority backend that can run this call" if chosen
                                else why or "can run this call, but a higher-priority backend is chosen")})
    return rows


def _load_builtin() -> None:
    """The built-in backends register themselves when attnzoo.backends is imported."""
    import importlib

    importlib.import_module("attnzoo.backends")
