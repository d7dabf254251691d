"""One registry pattern for the zoo's variants, the KV presses and the head probes: a `Registry`
holds classes under their `name`, refuses a second class under a taken name, and looks names up
with a did-you-mean. The variants' registry and its module-level functions live here too."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

from .info import ALL_PATTERNS, VariantInfo, did_you_mean

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by their `name` attribute, in registration order.

    `kind` / `plural` name what is registered in messages ("variant" / "variants"); `load`, when
    given, runs before every lookup (e.g. importing the modules whose classes register themselves)."""

    def __init__(self, kind: str, plural: str | None = None, load: Callable[[], None] | None = None):
        self.kind, self.plural = kind, plural or kind + "s"
        self._load = load
        self.classes: dict[str, T] = {}  # name -> class, in registration order (read it, add with register)

    def register(self, cls: T) -> T:
        """Adds `cls` under `cls.name` (usable as a class decorator); ValueError if the name is empty
        or another class holds it (registering the same class again does nothing)."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} class {cls.__qualname__} needs a non-empty str `name`, got {name!r}")
        held = self.classes.get(name)
        if held is not None and held is not cls:
            raise ValueError(f"{self.kind} name {name!r} is registered twice ({held.__qualname__}, {cls.__qualname__})")
        self.classes[name] = cls
        return cls

    def get(self, name: str) -> T:
        """The class registered under `name`; ValueError naming the closest names and every known one."""
        self._loaded()
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} must be a str name, got {type(name).__name__}")
        try:
            return self.classes[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}{did_you_mean([name], self.classes)}; known "
                             f"{self.plural}: {', '.join(self.classes) or 'none'}") from None

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        self._loaded()
        return list(self.classes)

    def __iter__(self) -> Iterator[T]:
        self._loaded()
        return iter(list(self.classes.values()))

    def __len__(self) -> int:
        self._loaded()
        return len(self.classes)

    def __contains__(self, name: object) -> bool:
        self._loaded()
        return name in self.classes

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.classes)})"

    def _loaded(self) -> None:
        if self._load is not None:
            self._load()


_loaded = False


def _load_all() -> None:
    """Import every family module under attnzoo.variants, so each registers its classes."""
    global _loaded
    if _loaded:
        return
    pkg = importlib.import_module("attnzoo.variants")

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    _loaded = True


VARIANTS: Registry[type] = Registry("variant", load=_load_all)
_REGISTRY = VARIANTS.classes  # the same dict (tests patch entries into it)


def register(cls):
    """Class decorator: adds a Variant subclass to the zoo under `cls.name`."""
    return VARIANTS.register(cls)


def variant_class(name: str) -> type:
    return VARIANTS.get(name)


def names() -> list[str]:
    return sorted(VARIANTS.names())


def variants(family: str | None = None, exact: bool | None = None, pattern: str | None = None) -> list[VariantInfo]:
    """Every registered variant's info, optionally filtered, sorted by family then name."""
    if pattern is not None and pattern not in ALL_PATTERNS:
        raise ValueError(f"pattern must be one of {list(ALL_PATTERNS)}, got {pattern!r}")
    classes = list(VARIANTS)
    families = {c.family for c in classes}
    if family is not None and family not in families:
        raise ValueError(f"unknown family {family!r}; families: {sorted(families)}")
    out = []
    for cls in classes:
        info = cls.class_info()
        if family is not None and info.family != family:
            continue
        if exact is not None and info.exact != exact:
            continue
        if pattern is not None and pattern not in info.patterns:
            continue
        out.append(info)
    return sorted(out, key=lambda i: (i.family, i.name))


def import_submodules(package: str, path) -> None:
    """Import every module and subpackage of a family package (names starting with '_' excepted), so
    each registers its classes; a new mechanism is a new file, with no import line to add."""
    for mod in pkgutil.iter_modules(path):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{package}.{mod.name}")
