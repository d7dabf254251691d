"""The probes give known answers on tiny random-weight models whose attention is forced by a hook."""
from __future__ import annotations

import random

import pytest
import torch

from attnzoo.heads import Settings, analyze, get_probe
from attnzoo.heads.probes import run_map_probes
from attnzoo.heads.probes.attribution import attention_flow, max_flow, rollout
from attnzoo.heads.probes.lookback import auroc, fit_logistic, lookback_features
from attnzoo.heads.probes.position import calibration_hooks
from attnzoo.heads.probes.retrieval import contrast
from attnzoo.heads.probes.sinks import MassiveActivations, act_calibrate, decoder_layers, hidden_sinks
from attnzoo.heads.session import Item, Session
from attnzoo.heads.views import query_key_pca

PREV, SINK, SELF = (lambda i: i - 1), (lambda i: 0), (lambda i: i)


class _Tokens:
    """Stands in for a tokenizer where a probe only decodes ids for its summary."""

    @staticmethod
    def decode(ids):
        return f"<{ids[0]}>"


def _session(model, items: dict[str, list[torch.Tensor]], half: int | None = None) -> Session:
    s = Session(model, _Tokens(), Settings(validate=False), progress=False)
    for kind, seqs in items.items():
        s.provide(kind, [Item(kind, ids, {"half": half} if half else {}) for ids in seqs])
    return s


def _probes(session, names):
    return run_map_probes(session, [get_probe(n) for n in names])


def test_previous_token_and_sink_scores_of_forced_heads(tiny_llama, force_heads):
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    session = _session(tiny_llama, {"repeated": [ids], "prose": [ids]}, half=12)
    with force_heads(tiny_llama, 1, {0: PREV, 1: SINK, 2: SELF, 3: SELF}):
        r = _probes(session, ["previous_token", "sink", "entropy", "distance"])
    prev = r["previous_token"].scores
    assert prev.shape == (3, 4)
    assert prev[1, 0] > 0.99
    assert prev[1, 2:].max() < 0.01 and prev[1, 1] < 0.1  # the sink head's row 1 looks at token 0 = its previous token
    first = r["sink"].maps["first_token_sink"]
    assert first[1, 1] > 0.99 and first[1, 2:].max() < 0.01 and first[1, 0] < 0.1
    ent = r["entropy"].scores
    assert ent[1].max() < 0.01 and ent[0].min() > 0.1  # forced heads are one-hot; layer 0 is not
    dist = r["distance"].scores
    assert abs(dist[1, 0] - 1) < 0.01 and dist[1, 2] < 0.01
    assert abs(dist[1, 1] - 12) < 0.1  # the mean over rows 1..23 of i - 0


def test_induction_and_duplicate_scores_of_forced_heads(tiny_llama, force_heads):
    half = 10
    chunk = torch.randint(0, 97, (1, half), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([chunk, chunk], dim=1)

    def induction(i):
        return i - half + 1 if i >= half else i

    def duplicate(i):
        return i - half if i >= half else i

    session = _session(tiny_llama, {"repeated": [ids]}, half=half)
    with force_heads(tiny_llama, 2, {0: induction, 1: duplicate, 2: PREV, 3: SELF}):
        r = _probes(session, ["induction", "duplicate_token", "previous_token"])
    ind, dup = r["induction"].scores, r["duplicate_token"].scores
    assert ind[2, 0] > 0.99 and ind[2, 1:].max() < 0.01
    assert dup[2, 1] > 0.99 and dup[2, [0, 2, 3]].max() < 0.01
    assert r["previous_token"].scores[2, 2] > 0.99
    assert r["induction"].summary["top_induction"][0][:2] == [2, 0]


def test_active_dormant_finds_a_head_that_sinks_on_one_domain_only(tiny_llama, force_patterns):
    from attnzoo import hf

    g = torch.Generator().manual_seed(2)
    prose, code = torch.randint(0, 50, (1, 20), generator=g), torch.randint(50, 97, (1, 20), generator=g)
    session = _session(tiny_llama, {"prose": [prose], "code": [code]})
    current = {}
    stash = tiny_llama.register_forward_pre_hook(lambda m, args, kw: current.update(ids=kw["input_ids"]), with_kwargs=True)

    def head0_sinks_on_code(module, q, k, v, mask, scaling, call_next):
        on_code = bool(current["ids"][0, 0] >= 50)
        targets = {0: SINK if on_code else SELF, 1: SINK, 2: SELF, 3: SELF}
        return force_patterns(targets)(module, q, k, v, mask, scaling, call_next)

    try:
        with hf.hook(tiny_llama, {0: head0_sinks_on_code}):
            r = _probes(session, ["active_dormant"])
    finally:
        stash.remove()
    share = r["active_dormant"].maps["dormant_share"]
    gap = r["active_dormant"].maps["sink_gap_code_minus_prose"]
    assert share[0, 0] == 0.5 and share[0, 1] == 1 and share[0, 2:].max() == 0
    assert gap[0, 0] > 0.9 and gap[0, 1:].abs().max() < 0.01
    s = r["active_dormant"].summary
    assert s["domain_switching"] >= 1 and [0, 0] in [h[:2] for h in s["switching_heads"]]


def test_hidden_sinks_and_act_calibration():
    s = 40
    probs = torch.full((s, s), 0.0)
    for i in range(s):
        probs[i, : i + 1] = 1.0 / (i + 1)
    probs[20:, 0] += 0.5   # the first token: a sink, never calibrated
    probs[20:, 10] += 0.5  # a hidden sink at token 10
    probs = probs / probs.sum(-1, keepdim=True)
    sink = hidden_sinks(probs, causal=True)
    assert sink.nonzero().flatten().tolist() == [10]
    cal = act_calibrate(probs, causal=True, beta=0.4)
    assert torch.allclose(cal.sum(-1), torch.ones(s, dtype=cal.dtype), atol=1e-6)
    assert torch.allclose(cal[:, 10], 0.4 * probs[:, 10].to(cal.dtype))
    freed = 0.6 * probs[30, 10]
    others = probs[30].clone()
    others[10] = 0
    assert torch.allclose(cal[30, 0], (probs[30, 0] + freed * probs[30, 0] / others.sum()).to(cal.dtype), atol=1e-6)
    assert torch.equal(act_calibrate(probs[:15, :15], causal=True), probs[:15, :15].double())  # nothing over the threshold


def test_massive_activations_find_an_injected_entry(tiny_llama):
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    session = _session(tiny_llama, {"prose": [ids]})
    layers = decoder_layers(tiny_llama)
    assert [i for i, _ in layers] == [0, 1, 2]

    def inject(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out[0, 3, 7] = 5e4
        return output

    handle = layers[1][1].register_forward_hook(inject)
    try:
        r = MassiveActivations().run(session)
    finally:
        handle.remove()
    assert r.summary["massive_dims"] == [7]
    assert r.summary["massive_tokens"] == [(3, f"<{int(ids[0, 3])}>")]
    assert r.summary["layers_with_massive"][0] == 1
    assert r.summary["largest"]["dim"] == 7


def test_max_flow_exact_on_known_graphs_and_against_networkx():
    # the classic CLRS network, max flow 23
    edges = [(0, 1, 16), (0, 2, 13), (1, 3, 12), (2, 1, 4), (2, 4, 14), (3, 2, 9), (3, 5, 20), (4, 3, 7), (4, 5, 4)]
    assert abs(max_flow(6, edges, 0, 5) - 23) < 1e-9
    nx = pytest.importorskip("networkx")
    rng = random.Random(0)
    for _ in range(5):
        n = 12
        es = [(u, v, rng.random()) for u in range(n) for v in range(n) if u != v and rng.random() < 0.3]
        g = nx.DiGraph()
        g.add_weighted_edges_from(es, weight="capacity")
        if 0 in g and n - 1 in g:
            assert abs(max_flow(n, es, 0, n - 1) - nx.maximum_flow_value(g, 0, n - 1)) < 1e-9


def test_rollout_and_flow_on_known_maps():
    s = 5
    ident = [torch.eye(s).expand(2, s, s)] * 3
    assert torch.allclose(rollout(ident), torch.eye(s, dtype=torch.float64))
    assert torch.allclose(attention_flow(ident, target=4), torch.eye(s, dtype=torch.float64)[4])
    uniform = torch.tril(torch.ones(s, s)) / torch.arange(1, s + 1)[:, None]
    r = rollout([uniform])
    assert torch.allclose(r, 0.5 * uniform.double() + 0.5 * torch.eye(s, dtype=torch.float64))
    # one layer: the flow from token j to the top of token 4 is the capacity of the one edge between them
    assert torch.allclose(attention_flow([uniform], target=4), r[4])
    two = attention_flow([uniform, uniform], target=4)
    assert (two > 0).all() and (two <= 1 + 1e-9).all()


def test_query_key_pca_normalisation_keeps_attention():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(12, 8, generator=g) + 3, torch.randn(12, 8, generator=g) * 5 - 2
    q2, k2 = query_key_pca(q, k)
    assert q2.shape == k2.shape == (12, 2)


class _WordPieces:
    """Stands in for a BERT tokenizer: [CLS] = 1, [SEP] = 2, '.' = 3, ',' = 4, other ids are words."""

    cls_token_id, sep_token_id = 1, 2

    def __len__(self):
        return 97

    def convert_ids_to_tokens(self, i):
        return {1: "[CLS]", 2: "[SEP]", 3: ".", 4: ","}.get(i, f"w{i}")

    @staticmethod
    def decode(ids):
        return f"<{ids[0]}>"


def test_bert_patterns_of_forced_encoder_heads(tiny_bert, force_heads):
    # [CLS] w . w , [SEP] w [SEP]: a sentence pair with punctuation (8 tokens: the tiny encoder's head_dim)
    ids = torch.tensor([[1, 20, 3, 21, 4, 2, 22, 2]])
    s = len(ids[0])
    session = Session(tiny_bert, _WordPieces(), Settings(validate=False), progress=False)
    session.provide("prose", [Item("prose", ids, {})])
    to_sep = lambda i: 5 if i < 6 else 7  # noqa: E731 (each segment's own [SEP])
    nxt, prev = (lambda i: min(i + 1, s - 1)), (lambda i: max(i - 1, 0))  # noqa: E731 (one-hot in every row)
    with force_heads(tiny_bert, 1, {0: SINK, 1: nxt, 2: prev, 3: to_sep}, causal=False):
        r = _probes(session, ["bert_patterns"])["bert_patterns"].maps
    assert r["cls"].shape == (2, 4)
    for pattern, head in (("cls", 0), ("next_token", 1), ("previous_token", 2), ("sep", 3)):
        others = [h for h in range(4) if h != head]
        assert r[pattern][1, head] > 0.99 and r[pattern][1, others].max() < 0.5, (pattern, r[pattern][1])
    assert r["broad_entropy"][1].max() < 0.05 and r["broad_entropy"][0].min() > 1.0  # layer 0 is not forced
    assert r["punctuation"][1].max() < 0.3  # no forced head looks at '.' or ','


def test_unknown_probe_and_wrong_model_kind(tiny_llama, tiny_bert):
    with pytest.raises(ValueError, match="unknown probe 'nope'; known probes: retrieval, sink"):
        analyze(tiny_llama, None, ["nope"])
    with pytest.raises(ValueError, match="bert_patterns' applies to bidirectional encoders"):
        analyze(tiny_llama, None, ["bert_patterns"])
    with pytest.raises(ValueError, match="'induction' needs a causal language model"):
        analyze(tiny_bert, None, ["induction"])
    with pytest.raises(ValueError, match="AttentionInterface"):
        analyze(torch.nn.Linear(2, 2), None, ["sink"])


def test_lookback_ratio_of_forced_heads(tiny_llama, force_heads):
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(5))
    with force_heads(tiny_llama, 1, {0: lambda i: 5, 1: SELF, 2: PREV, 3: SELF}):
        feats = lookback_features(tiny_llama, ids, context=(2, 12), answer=(20, 30), layers=3, heads=4)
    assert feats.shape == (3, 4)
    assert feats[1, 0] > 0.99  # looks only at the context
    assert feats[1, 1] < 0.01 and feats[1, 2] < 0.01  # looks only at what was generated


def test_logistic_detector_and_auroc():
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0.5
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (x[:, 2] > 0).double()
    predict, w = fit_logistic(x, y)
    assert auroc(predict(x), y) == 1.0 and w.abs().argmax() == 2


def test_decore_contrast_prefers_what_the_masked_model_lost():
    base = torch.tensor([[2.0, 1.9, -5.0]])
    masked = torch.tensor([[0.0, 3.0, -5.0]])  # the masked model prefers token 1: contrast pushes to token 0
    assert contrast(base, masked, alpha=0.5).argmax(-1).item() == 0
    assert contrast(base, masked, alpha=None).argmax(-1).item() == 0
    assert contrast(base, masked, alpha=0.5)[0, 2] == float("-inf")  # implausible under the base model


def test_position_calibration_with_zero_bias_changes_nothing(tiny_llama):
    tiny_llama.set_attn_implementation("sdpa")
    ids = torch.randint(0, 97, (1, 26), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = tiny_llama(input_ids=ids, use_cache=False).logits
        with calibration_hooks(tiny_llama, torch.zeros(3, 4, 16), context=(4, 20)):
            same = tiny_llama(input_ids=ids, use_cache=False).logits
        with calibration_hooks(tiny_llama, torch.full((3, 4, 16), 0.02), context=(4, 20)):
            moved = tiny_llama(input_ids=ids, use_cache=False).logits
    assert torch.allclose(same, plain, atol=1e-5)
    assert torch.equal(moved[0, :20], plain[0, :20])  # rows before the question are not touched
    assert not torch.allclose(moved[0, 20:], plain[0, 20:], atol=1e-4)
