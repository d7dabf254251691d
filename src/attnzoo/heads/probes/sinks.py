"""Attention sinks and the extreme-token phenomena around them.

- `Sink`: attention mass on the first token, and on "hidden" sinks later in the text, with the
  Attention Calibration Technique (ACT) of "Unveiling and Harnessing Hidden Attention Sinks"
  (Yu et al., 2024) applied at inference and its effect on loss and passkey accuracy measured.
- `ActiveDormant`: heads that are sinks (dormant) on one input domain and active on another
  ("Active-Dormant Attention Heads", Guo et al., 2024), with the value-state drain of the sink.
- `MassiveActivations`: the few huge hidden-state entries per layer, their tokens and dimensions
  ("Massive Activations in Large Language Models", Sun et al., 2024).
"""
from __future__ import annotations

from collections import Counter

import torch

from ... import hf
from ...core.info import Paper, Param, positive_int
from .. import tasks
from ..capture import attention_probs
from ..session import Session
from .base import MapProbe, Probe, top_summary

ACT_PAPER = Paper("Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training "
                  "through Attention Calibration", 2024, "2406.15765")
SINK_THRESHOLD = 0.1   # a token is a sink for a head when it gets this much of each later row's attention on average
MIN_VIEWERS = 16       # ...averaged over at least this many rows; the last tokens of a text are seen by too few
ACT_BETA = 0.4         # ACT keeps this share of a hidden sink's attention and gives the rest to the other tokens
ACT_CANDIDATES = 4     # heads with the most hidden-sink mass tried one by one in ACT's head search


def _viewers(sq: int, sk: int, causal: bool) -> torch.Tensor:
    """How many query rows see each key: Sk - j for a causal self-attention map, Sq otherwise."""
    return (sk - torch.arange(sk)).clamp_max(sq).double() if causal else torch.full((sk,), float(sq), dtype=torch.float64)


def hidden_sinks(probs: torch.Tensor, causal: bool, threshold: float = SINK_THRESHOLD) -> torch.Tensor:
    """Bool (..., Sk): keys after the first whose mean received attention (over the rows that see
    them, at least MIN_VIEWERS) exceeds `threshold`. probs: (..., Sq, Sk) with Sq == Sk."""
    sq, sk = probs.shape[-2:]
    viewers = _viewers(sq, sk, causal)
    received = probs.double().sum(-2) / viewers
    sink = (received > threshold) & (viewers >= MIN_VIEWERS)
    sink[..., 0] = False
    return sink


def act_calibrate(probs: torch.Tensor, causal: bool, beta: float = ACT_BETA,
                  threshold: float = SINK_THRESHOLD) -> torch.Tensor:
    """ACT on attention maps (..., S, S): the attention to each hidden sink is scaled by `beta` and
    the freed mass is given to the other keys in proportion to their attention. Rows still sum to 1."""
    sink = hidden_sinks(probs, causal, threshold).unsqueeze(-2)
    others = probs.masked_fill(sink, 0.0)
    freed = (probs * sink).sum(-1, keepdim=True) * (1 - beta)
    share = others / others.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.where(sink, probs * beta, others + freed * share)


def act_hooks(model, heads: list[tuple[int, int]], beta: float = ACT_BETA, threshold: float = SINK_THRESHOLD) -> hf.HookHandle:
    """Run `model` with ACT on `heads`: their outputs are recomputed from calibrated maps. Needs
    whole sequences in one pass (hidden sinks are found from all rows of the map)."""
    from ..ablate import heads_by_layer

    def make(idx):
        index = torch.tensor(idx)

        def run(module, query, key, value, attention_mask, scaling, call_next):
            out = call_next(query, key, value, attention_mask).clone()
            if query.shape[2] != key.shape[2]:
                raise ValueError("ACT calibration needs the whole sequence in one forward pass (no KV cache)")
            causal = bool(getattr(module, "is_causal", True))
            probs = attention_probs(query, key, attention_mask, scaling, causal=causal)[:, index]
            v = value.float().repeat_interleave(query.shape[1] // value.shape[1], dim=1)[:, index]
            out[:, index] = (act_calibrate(probs, causal, beta, threshold) @ v).to(out.dtype)
            return out

        return run

    return hf.hook(model, {layer: make(idx) for layer, idx in heads_by_layer(model, heads).items()})


class Sink(MapProbe):
    name = "sink"
    paper = ACT_PAPER
    about = ("attention mass on the first token, and on hidden sinks (later tokens that take over "
             f"{SINK_THRESHOLD:.0%} of every later row on average); ACT (beta={ACT_BETA}) applied to the heads its "
             "head search keeps, with held-out loss and passkey accuracy measured with and without it")
    inputs = ("prose",)
    params = (
        Param("threshold", SINK_THRESHOLD, "mean share of each later row's attention that makes a token a sink",
              (int, float), lambda v: 0 < v < 1, "a number in (0, 1)"),
        Param("beta", ACT_BETA, "share of a hidden sink's attention ACT keeps (the rest goes to the other tokens)",
              (int, float), lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        positive_int("candidates", ACT_CANDIDATES, "heads with the most hidden-sink mass tried in ACT's head search"),
    )

    def start(self, session):
        super().start(session)
        self.hidden = torch.zeros_like(self.total)
        self.sink_tokens: Counter = Counter()

    def observe(self, rec, item):
        start = 1 if self.session.causal else 0
        p = rec.probs[0].double()  # (H, S, S)
        self.total[rec.layer] += p[:, start:, 0].mean(-1)
        sink = hidden_sinks(p, self.session.causal, self.threshold)  # (H, S)
        self.hidden[rec.layer] += (p[:, start:] * sink[:, None, :]).sum(-1).mean(-1)
        self.sink_tokens.update(int(t) for t in item.ids[0][sink.any(0)])
        if rec.layer == 0:
            self.count += 1

    def finish(self, session):
        n = max(self.count, 1)
        first, hidden = (self.total / n).float(), (self.hidden / n).float()
        tok = session.tokenizer
        summary = {
            "mean_first_token_mass": round(float(first.mean()), 4),
            "heads_over_half_on_first_token": int((first > 0.5).sum()),
            "mean_hidden_sink_mass": round(float(hidden.mean()), 4),
            "heads_with_hidden_sinks_over_0.1": int((hidden > 0.1).sum()),
            "hidden_sink_tokens": [[tok.decode([t]), c] for t, c in self.sink_tokens.most_common(10)],
            **top_summary(session, first, "first_token"), **top_summary(session, hidden, "hidden_sink"),
        }
        if session.causal and session.settings.validate:
            summary["act"] = evaluate_act(session, hidden, self.beta, self.threshold, self.candidates)
        return self.result({"first_token_sink": first, "hidden_sink": hidden}, summary)


@torch.no_grad()
def evaluate_act(session: Session, hidden: torch.Tensor, beta: float = ACT_BETA, threshold: float = SINK_THRESHOLD,
                 candidates: int = ACT_CANDIDATES) -> dict:
    """ACT as the paper runs it: a head search on calibration text (keep the heads whose calibration
    alone lowers the loss), then the kept heads calibrated on held-out text and passkey questions."""
    s = session.settings
    calib = torch.cat([it.ids for it in session.inputs("prose")])
    heldout = torch.cat(tasks.prose_segments(session.tokenizer, s.text_segments, s.text_tokens, split="heldout"))

    def loss(texts: torch.Tensor) -> float:
        return float(tasks.lm_loss(session.forward(texts).logits, texts))

    base_calib = loss(calib)
    candidates = [h for h in session.top_heads(hidden, candidates) if hidden[h] > 0]
    kept, tried = [], []
    for head in session.progress(candidates, desc="ACT head search"):
        with act_hooks(session.model, [head], beta, threshold):
            delta = loss(calib) - base_calib
        tried.append([*head, round(delta, 5)])
        if delta < 0:
            kept.append(head)
    out = {"beta": beta, "threshold": threshold, "candidates_loss_change": tried,
           "kept_heads": [list(h) for h in kept], "heldout_loss_base": round(loss(heldout), 4),
           "passkey_accuracy_base": session.passkey_baseline()}
    # the heads the search kept, as the paper runs it; if it kept none, all candidates, to show the effect
    label, heads = ("kept", kept) if kept else ("all_candidates", candidates)
    if heads:
        with act_hooks(session.model, heads, beta, threshold):
            out[f"heldout_loss_act_{label}"] = round(loss(heldout), 4)
            out[f"passkey_accuracy_act_{label}"] = session.passkey_accuracy(f"passkey (ACT, {label} heads)")
    return out


class ActiveDormant(MapProbe):
    name = "active_dormant"
    paper = Paper("Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs", 2024,
                  "2410.13835")
    DORMANT = 0.7  # the default of `dormant`
    about = (f"a head is dormant on an input when it parks at least {DORMANT:.0%} of its attention on the first "
             "token; share of inputs (real prose and Python source) on which each head is dormant, and the sink-mass "
             "gap between the two domains")
    inputs = ("prose", "code")
    models = "causal"
    params = (Param("dormant", DORMANT, "share of a head's attention on the first token that makes it dormant on an "
                    "input", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),)

    def start(self, session):
        super().start(session)
        self.sink = {}    # (kind, id(item)) -> (layers, heads) first-token mass
        self.norm = {}    # (kind, id(item)) -> (layers, heads) mean head output norm
        self.drain = torch.zeros(session.layers, dtype=torch.float64)

    def observe(self, rec, item):
        key = (item.kind, id(item))
        L, H = self.session.layers, self.session.heads
        self.sink.setdefault(key, torch.zeros(L, H))[rec.layer] = rec.probs[0, :, 1:, 0].mean(-1)
        self.norm.setdefault(key, torch.zeros(L, H))[rec.layer] = rec.output[0, :, 1:].float().norm(dim=-1).mean(-1)
        vn = rec.value[0].float().norm(dim=-1)  # (Hkv, S): the sink's value is small ("value-state drain")
        self.drain[rec.layer] += float((vn[:, 0] / vn[:, 1:].mean(-1)).mean())
        if rec.layer == 0:
            self.count += 1

    def finish(self, session):
        keys = sorted(self.sink)
        sink = torch.stack([self.sink[k] for k in keys])        # (items, L, H)
        norm = torch.stack([self.norm[k] for k in keys])
        dormant = sink >= self.dormant
        share = dormant.float().mean(0)
        by_domain = {kind: sink[[i for i, k in enumerate(keys) if k[0] == kind]].mean(0) for kind in ("prose", "code")}
        dorm_by = {kind: dormant[[i for i, k in enumerate(keys) if k[0] == kind]] for kind in ("prose", "code")}
        switch = (dorm_by["prose"].all(0) & ~dorm_by["code"].any(0)) | (dorm_by["code"].all(0) & ~dorm_by["prose"].any(0))
        active_norm = norm[~dormant].mean() if (~dormant).any() else torch.tensor(float("nan"))
        dormant_norm = norm[dormant].mean() if dormant.any() else torch.tensor(float("nan"))
        gap = by_domain["code"] - by_domain["prose"]
        summary = {
            "dormant_threshold": self.dormant,
            "always_dormant": int((share == 1).sum()), "never_dormant": int((share == 0).sum()),
            "active_dormant": int(((share > 0) & (share < 1)).sum()),
            "domain_switching": int(switch.sum()),
            "switching_heads": [[int(l), int(h), round(float(gap[l, h]), 3)] for l, h in switch.nonzero().tolist()][:12],
            "output_norm_dormant_over_active": round(float(dormant_norm / active_norm), 4),
            **top_summary(session, gap.abs(), "domain_gap"),
        }
        details = {"value_norm_first_over_rest_by_layer": [round(float(x), 4) for x in self.drain / max(self.count, 1)]}
        return self.result({"dormant_share": share, "sink_gap_code_minus_prose": gap}, summary, details)


class MassiveActivations(Probe):
    name = "massive_activations"
    paper = Paper("Massive Activations in Large Language Models", 2024, "2402.17762")
    about = ("the largest |hidden state| entries after each decoder layer (forward hooks), against the layer's "
             "median; 'massive' = above 100 and 1000x the median, as in the paper; their tokens and dimensions")
    TOP = 4  # the default of `top`
    params = (positive_int("top", TOP, "largest |hidden state| entries reported per layer"),)

    def run(self, session):
        layers = decoder_layers(session.model)
        ids = session.inputs("prose")[0].ids
        stats = {}

        def make(i):
            def grab(module, args, output):
                h = (output[0] if isinstance(output, tuple) else output)[0].detach().float().abs()  # (S, D)
                top = h.flatten().topk(min(self.top, h.numel()))
                stats[i] = (top.values.tolist(), (top.indices // h.shape[1]).tolist(),
                            (top.indices % h.shape[1]).tolist(), float(h.median()))

            return grab

        handles = [m.register_forward_hook(make(i)) for i, m in layers]
        try:
            with torch.no_grad():
                session.forward(ids)
        finally:
            for h in handles:
                h.remove()
        tok = session.tokenizer
        rows, massive = [], []
        for i in sorted(stats):
            values, positions, dims, med = stats[i]
            entries = [{"value": round(v, 2), "position": p, "token": tok.decode([int(ids[0, p])]), "dim": d}
                       for v, p, d in zip(values, positions, dims)]
            massive += [[i, e["position"], e["token"], e["dim"]] for e in entries if e["value"] > 100 and e["value"] > 1000 * med]
            rows.append({"layer": i, "median": round(med, 4), "top": entries})
        peak = max(range(len(rows)), key=lambda i: rows[i]["top"][0]["value"])
        largest = rows[peak]["top"][0]
        summary = {
            "largest": {**largest, "layer": rows[peak]["layer"], "ratio_to_median": round(largest["value"] / rows[peak]["median"], 1)},
            "layers_with_massive": sorted({m[0] for m in massive}),
            "massive_dims": sorted({m[3] for m in massive}),
            "massive_tokens": sorted({(m[1], m[2]) for m in massive}),
        }
        return self.result({}, summary, {"layers": rows})


def decoder_layers(model) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, block) of the blocks holding each attention module, found as the ModuleList
    whose entries each contain one attention layer."""
    attn = {id(m): i for i, m in hf.attention_modules(model)}
    for ml in model.modules():
        if isinstance(ml, torch.nn.ModuleList) and len(ml) == len(attn):
            found = []
            for block in ml:
                inside = [attn[id(m)] for m in block.modules() if id(m) in attn]
                if len(inside) != 1:
                    break
                found.append((inside[0], block))
            else:
                return sorted(found, key=lambda t: t[0])
    raise hf.UnsupportedModel(f"{type(model).__name__}: no list of layer blocks holding one attention module each")
