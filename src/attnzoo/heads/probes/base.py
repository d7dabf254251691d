"""What every probe is: a name, the paper it comes from, its parameters (`Param`s, validated as the
variants' and the KV presses' are) and `run(session) -> ProbeResult` whose
main output is a (layers, heads) score map. Probes that only read attention maps (`MapProbe`)
declare which shared inputs they read and reduce each layer's maps as they arrive, so several
of them share one forward pass per input."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ...core.info import Configurable, Paper, Param
from ...core.registry import Registry
from ..capture import LayerAttention, watch_attention
from ..session import Item, Session


@dataclass
class ProbeResult:
    """`maps`: (layers, heads) score tensors, the first is the probe's main score. `summary`: the
    headline numbers. `details`: anything else the report draws (JSON-able)."""

    name: str
    paper: str
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def scores(self) -> torch.Tensor | None:
        return next(iter(self.maps.values()), None)

    def as_dict(self) -> dict:
        return {"name": self.name, "paper": self.paper,
                "maps": {k: [[round(float(x), 6) for x in row] for row in v.tolist()] for k, v in self.maps.items()},
                "summary": self.summary, "details": self.details}


class Probe(Configurable):
    name: ClassVar[str]
    paper: ClassVar[Paper]
    about: ClassVar[str] = ""
    models: ClassVar[str] = "any"  # "causal" (decoders only), "encoder" (bidirectional only) or "any"
    # The constructor's parameters, validated by `validate_params` and set as attributes of the same names.
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, **params):
        self.configure(params)
        self.validate_config()

    def check(self, session: Session) -> None:
        if self.models == "causal" and not session.causal:
            raise ValueError(f"probe {self.name!r} needs a causal language model; this model's attention is bidirectional")
        if self.models == "encoder" and session.causal:
            raise ValueError(f"probe {self.name!r} applies to bidirectional encoders (e.g. all-MiniLM-L6-v2), not causal LMs")

    def run(self, session: Session) -> ProbeResult:
        raise NotImplementedError

    def result(self, maps=None, summary=None, details=None) -> ProbeResult:
        return ProbeResult(self.name, str(self.paper), maps or {}, summary or {}, details or {})


REGISTRY: Registry[type[Probe]] = Registry("probe")


def register(cls: type[Probe]) -> type[Probe]:
    """Adds a probe class to `REGISTRY` under `cls.name`."""
    return REGISTRY.register(cls)


class MapProbe(Probe):
    """A probe that reduces attention maps of the shared inputs `inputs` one layer at a time."""

    inputs: ClassVar[tuple[str, ...]] = ("prose",)

    def start(self, session: Session) -> None:
        self.session = session
        self.total = torch.zeros(session.layers, session.heads, dtype=torch.float64)
        self.count = 0

    def observe(self, rec: LayerAttention, item: Item) -> None:
        raise NotImplementedError

    def finish(self, session: Session) -> ProbeResult:
        raise NotImplementedError

    def run(self, session: Session) -> ProbeResult:
        return run_map_probes(session, [self])[self.name]


def top_summary(session: Session, scores: torch.Tensor, label: str, k: int = 5, lowest: bool = False) -> dict:
    """{"top_<label>": [[layer, head, score], ...]} for the `k` highest (or lowest) scoring heads."""
    order = session.top_heads(-scores if lowest else scores, k)
    return {"top_" + label: [[l, h, round(float(scores[l, h]), 4)] for l, h in order]}


def run_map_probes(session: Session, probes: list[MapProbe]) -> dict[str, ProbeResult]:
    """Start the probes, run each input they need through the model once (inputs of one kind and
    length in one batch), feed every layer's maps to the probes that read that input, finish them."""
    for p in probes:
        p.start(session)
    kinds = list(dict.fromkeys(k for p in probes for k in p.inputs))
    for kind in kinds:
        readers = [p for p in probes if kind in p.inputs]
        for batch in session.progress(_same_length_batches(session.inputs(kind)), desc=f"attention maps ({kind})"):
            def observe(rec, batch=batch):
                for b, item in enumerate(batch):
                    one = LayerAttention(rec.layer, rec.probs[b:b + 1], rec.rows, rec.query[b:b + 1], rec.key[b:b + 1],
                                         rec.value[b:b + 1], rec.output[b:b + 1])
                    for p in readers:
                        p.observe(one, item)

            with torch.no_grad(), watch_attention(session.model, observe):
                session.forward(torch.cat([item.ids for item in batch]))
    return {p.name: p.finish(session) for p in probes}


def _same_length_batches(items: list[Item]) -> list[list[Item]]:
    groups: dict[int, list[Item]] = {}
    for item in items:
        groups.setdefault(item.ids.shape[1], []).append(item)
    return list(groups.values())
