"""The probes, by name. Each is one class with its paper; see `describe()` for the list."""
from __future__ import annotations

from .attribution import RolloutFlow
from .base import REGISTRY, MapProbe, Probe, ProbeResult, register, run_map_probes
from .importance import Importance
from .lookback import LookbackLens
from .patterns import BertPatterns, Distance, DuplicateToken, Entropy, Induction, PreviousToken
from .position import PositionBias
from .retrieval import DeCoRe, Retrieval, retrieval_scores
from .sinks import ActiveDormant, MassiveActivations, Sink

# Registered here, in the order listings and reports show them.
for _probe in (Retrieval, Sink, Induction, PreviousToken, DuplicateToken, Entropy, Distance, MassiveActivations,
               ActiveDormant, Importance, RolloutFlow, BertPatterns, PositionBias, LookbackLens, DeCoRe):
    register(_probe)

PROBES: dict[str, type[Probe]] = REGISTRY.classes  # name -> class, in registration order


def get_probe(name: str, **params) -> Probe:
    """A probe configured with `params` (its declared `Param`s; defaults for the rest)."""
    return REGISTRY.get(name)(**params)


def describe() -> list[dict]:
    """name, paper, what it measures, which models it applies to and its parameters, for every probe."""
    return [{"name": p.name, "paper": str(p.paper), "about": p.about, "models": p.models,
             "params": {q.name: {"default": q.default, "doc": q.doc, "expected": q.expected} for q in p.params}}
            for p in REGISTRY]


__all__ = ["PROBES", "REGISTRY", "MapProbe", "Probe", "ProbeResult", "describe", "get_probe", "register",
           "retrieval_scores", "run_map_probes"]
