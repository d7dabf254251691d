"""attnzoo.kv presses: ratio 0 is exact, kept sets on hand-built cases, budgets, decode-time eviction."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kv_tiny import greedy_logits, ids, kept, make_step, tiny_llama, tiny_qwen3

import attnzoo.kv as kv
from attnzoo.kv import headwise, profile, retrieval
from attnzoo.kv.base import keep_count, topk_mask

EVICTING = [m.name for m in kv.methods() if m.kind == "evict" and not m.needs_tokenizer]  # the tiny models have none
ALL_BUT_QUANT = [m.name for m in kv.methods() if m.kind != "quantize"]


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen3()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def small(name: str, ratio: float) -> kv.KVPress:
    """A press with settings scaled to the tiny models (short training for the gate)."""
    return kv.get(name, ratio=ratio, steps=5) if name == "attention_gate" else kv.get(name, ratio=ratio)


# ---- ratio 0 reproduces the model exactly ----------------------------------------------------------


@pytest.mark.parametrize("name", ALL_BUT_QUANT)
def test_ratio_zero_gives_bit_identical_logits(qwen, name):
    x = ids(70)
    base = greedy_logits(qwen, x, steps=4)
    ours = greedy_logits(qwen, x, steps=4, press=kv.get(name, ratio=0.0))
    assert all(torch.equal(a, b) for a, b in zip(base, ours))


def test_registry_lists_every_method_with_its_stages_and_paper():
    names = [m.name for m in kv.methods()]
    for expected in ("streaming_llm", "h2o", "snapkv", "pyramidkv", "tova", "knorm", "random", "quest", "duo_attention",
                     "razor", "moa", "task_kv", "attention_gate", "a2ats", "hylra", "promptdistill", "kv_quant",
                     "token_select"):
        assert expected in names
    for m in kv.methods():
        assert m.stages and set(m.stages) <= {"prefill", "decode"} and m.summary
        assert m.paper is not None or m.name == "random"


# ---- kept sets on hand-built cases --------------------------------------------------------------------


def test_topk_mask_per_row_counts_and_ties_to_the_earlier_slot():
    scores = torch.tensor([[[1.0, 3.0, 3.0, 0.0, 2.0]], [[5.0, 5.0, 5.0, 5.0, 5.0]]])
    mask = topk_mask(scores, torch.tensor([2, 3]))
    assert kept(mask) == [[[1, 2]], [[0, 1, 2]]]
    assert keep_count(torch.tensor([100, 10, 1]), 0.9).tolist() == [10, 1, 1]
    assert keep_count(torch.tensor([1000]), 0.75).tolist() == [250]


def test_streaming_llm_keeps_sinks_and_the_recent_window():
    k = torch.randn(1, 2, 40, 8)
    step = make_step(torch.randn(1, 4, 40, 8), k)
    mask = kv.get("streaming_llm", ratio=0.5).keep(step)
    assert kept(mask) == [[list(range(4)) + list(range(24, 40))] * 2]


def test_knorm_keeps_the_lowest_norm_keys():
    k = torch.randn(1, 2, 30, 8)
    step = make_step(torch.randn(1, 2, 30, 8), k)
    mask = kv.get("knorm", ratio=0.8).keep(step)  # keeps 6
    for h in range(2):
        expected = sorted(torch.argsort(k[0, h].norm(dim=-1))[:6].tolist())
        assert kept(mask)[0][h] == expected


def _spike_case(s=20, d=8, heavy=(3, 11)):
    """Keys that are zero except `heavy` tokens; every query points at them, so they draw the attention."""
    k = torch.zeros(1, 1, s, d)
    for i, t in enumerate(heavy):
        k[0, 0, t, i] = 6.0
    q = torch.zeros(1, 2, s, d)
    q[..., : len(heavy)] = 1.0
    return q, k


def test_snapkv_keeps_what_the_window_attends_to_plus_the_window():
    q, k = _spike_case()
    step = make_step(q, k)
    mask = kv.get("snapkv", ratio=0.7, window=4, kernel=1).keep(step)  # keeps 6: 2 spikes + 4 window tokens
    assert kept(mask) == [[[3, 11, 16, 17, 18, 19]]]


def test_snapkv_scores_match_the_kvpress_formula():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 50, 8), torch.randn(2, 2, 50, 8)
    step = make_step(q, k, scaling=8 ** -0.5)
    press = kv.get("snapkv", ratio=0.5, window=8, kernel=5)
    # kvpress's definition, written out: window queries' softmax over all keys (causal), mean over the
    # window, avg-pool the non-window part, mean over each KV group, window kept.
    logits = q[:, :, -8:] @ k.repeat_interleave(3, dim=1).transpose(-1, -2) * 8 ** -0.5
    causal = torch.arange(50).view(1, -1) > torch.arange(42, 50).view(-1, 1)
    probs = logits.masked_fill(causal, -math.inf).softmax(-1)[..., :-8].mean(2)
    pooled = F.avg_pool1d(probs.reshape(12, 1, 42), 5, stride=1, padding=2).view(2, 6, 42)
    expected = pooled.view(2, 2, 3, 42).mean(2)
    assert torch.allclose(press.score(step)[..., :42], expected, atol=1e-6)
    assert (press.score(step)[..., 42:] == math.inf).all()


def test_h2o_keeps_the_heavy_hitter_and_the_recent_half():
    q, k = _spike_case(heavy=(2,))
    step = make_step(q, k)
    mask = kv.get("h2o", ratio=0.7).keep(step)  # keeps 6: 3 recent + 3 heavy
    got = kept(mask)[0][0]
    assert len(got) == 6 and 2 in got and {17, 18, 19} <= set(got)


def test_tova_keeps_what_the_last_query_attends_to_and_the_last_token():
    q = torch.zeros(1, 2, 20, 8)
    k = torch.randn(1, 1, 20, 8) * 0.01
    k[0, 0, 7, 0] = 8.0
    q[0, :, -1, 0] = 1.0
    mask = kv.get("tova", ratio=0.9).keep(make_step(q, k))  # keeps 2
    assert kept(mask) == [[[7, 19]]]


def test_random_is_seeded_and_keeps_the_budget():
    step = make_step(torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8))
    a = kv.get("random", ratio=0.5).keep(step)
    assert a.sum(-1).tolist() == [[15, 15]]
    assert torch.equal(a, kv.get("random", ratio=0.5).keep(step))
    assert not torch.equal(a, kv.get("random", ratio=0.5, seed=1).keep(step))


def test_pyramidkv_budgets_fall_with_depth_and_average_to_the_ratio():
    press = kv.get("pyramidkv", ratio=0.75)
    budgets = [press.layer_budget(2048, layer, 30) for layer in range(30)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) / 30 - 512) <= 1
    assert [press.layer_budget(100, layer, 30) for layer in (0, 29)] == [36, 14]  # window 64 caps the bottom
    assert kv.get("pyramidkv", ratio=0.25).layer_budget(100, 0, 30) == 75  # no pyramid fits: uniform budget


def test_duo_attention_whole_heads_keep_everything_streaming_heads_sinks_and_window():
    press = kv.get("duo_attention", ratio=0.5, sinks=2, recent=6)
    press.scores = torch.tensor([[0.9, 0.1], [0.2, 0.3]])  # (layers, Hkv): head (0, 0) retrieves
    n_full, window = headwise.split_budget(40, 0.5, 8, 4)
    assert n_full == 1 and window == 13  # 1 x 40 + 3 x 13 ~= 4 x 20 entries
    step = make_step(torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8), n_layers=2)
    got = kept(press.keep(step))[0]
    assert got[0] == list(range(40))
    assert got[1] == [0, 1] + list(range(29, 40))


def test_split_budget_keeps_the_ratio():
    for length, ratio in ((1000, 0.75), (1000, 0.5), (333, 0.9), (2048, 0.25)):
        n_full, window = headwise.split_budget(length, ratio, 80, 90)
        total = n_full * length + (90 - n_full) * window
        target = int(keep_count(torch.tensor(length), ratio)) * 90
        assert target - 90 <= total <= target


def test_razor_compensation_token_stands_for_the_dropped_tokens():
    press = kv.get("razor", ratio=0.5, sinks=1, recent=4)
    press.scores = torch.tensor([[0.1]])
    q, k, v = torch.randn(1, 2, 12, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    sel = press.keep(make_step(q, k, v))
    dropped = ~sel.keep[0, 0]
    n = int(dropped.sum())
    assert n > 0
    assert torch.allclose(sel.extra_keys[0, 0, 0], k[0, 0, dropped].mean(0), atol=1e-6)
    assert torch.allclose(sel.extra_values[0, 0, 0], v[0, 0, dropped].mean(0), atol=1e-6)
    assert math.isclose(float(sel.extra_bias[0, 0, 0]), math.log(n), rel_tol=1e-6)
    # A slot with additive bias log(n) attends exactly like n copies of its key and value.
    qv = torch.randn(8)
    keys_kept, vals_kept = k[0, 0, sel.keep[0, 0]], v[0, 0, sel.keep[0, 0]]
    kc, vc = sel.extra_keys[0, 0], sel.extra_values[0, 0]
    w = torch.softmax(torch.cat([keys_kept @ qv, kc @ qv + math.log(n)]), 0)
    out = w @ torch.cat([vals_kept, vc])
    w2 = torch.softmax(torch.cat([keys_kept @ qv, (kc @ qv).repeat(n)]), 0)
    out2 = w2 @ torch.cat([vals_kept, vc.repeat(n, 1)])
    assert torch.allclose(out, out2, atol=1e-5)


def test_moa_plan_meets_the_budget_and_widens_the_heads_that_need_it():
    press = kv.get("moa", ratio=0.75)
    fr = len(press.FRACTIONS)
    coverage = torch.zeros(2, 2, fr)
    coverage[0, 0] = torch.linspace(0.1, 1.0, fr)  # this head needs long windows
    coverage[:, :, :] += torch.tensor([0.9] * fr).view(1, 1, -1) * (coverage.sum(-1, keepdim=True) == 0)
    press.coverage = coverage
    plan = press.plan(1000)
    assert plan.float().mean() <= 250
    assert plan[0, 0] == plan.max() and plan[0, 0] > plan[1, 1]


def test_quest_reads_the_page_holding_the_matching_key_and_the_current_page():
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 64, 8) * 0.1
    keys[0, 0, 37] = torch.tensor([5.0] + [0.0] * 7)
    q = torch.zeros(1, 1, 1, 8)
    q[..., 0] = 1.0
    step = make_step(q, keys, prefill=False, query_index=torch.tensor([63]))
    read = kv.get("quest", ratio=0.5, page=16, dense_layers=0).read(step)  # 2 pages of 4, the current one included
    chosen = torch.nonzero(read[0, 0, 0]).flatten().tolist()
    assert 37 in chosen and 63 in chosen and len(chosen) == 32


def test_a2ats_windowed_rope_gives_the_true_score_at_the_window_distance(llama):
    rot = retrieval.rotary_module(llama)
    q, k = torch.randn(1, 1, 1, 12), torch.randn(1, 1, 1, 12)  # head_dim of the tiny Llama
    pq, window = 50, 8
    q_rot = retrieval.rotate(rot, q, torch.tensor([[pq]]))
    k_rot = retrieval.rotate(rot, k, torch.tensor([[pq - window]]))
    assert torch.allclose(retrieval.rotate(rot, k_rot, torch.tensor([[-(pq - window)]])), k, atol=1e-5)
    q_win = retrieval.rotate(rot, q_rot, torch.tensor([[window - pq]]))
    k_raw = retrieval.rotate(rot, k_rot, torch.tensor([[-(pq - window)]]))
    assert torch.allclose((q_win * k_raw).sum(), (q_rot * k_rot).sum(), atol=1e-4)


def test_hylra_policy_reads_the_ratio_on_average():
    torch.manual_seed(0)
    probe = [torch.softmax(torch.randn(4, 8, 64) * 3, -1) for _ in range(6)]
    probe[3] = probe[2].clone()  # layer 3 looks like layer 2: reusing its selection is free
    for ratio in (0.5, 0.75):
        selecting, share, dense = retrieval.plan_layer_reuse(probe, ratio, groups=2)
        assert selecting[0] and dense
        reads = sum(1.0 if s else share for s in selecting) / len(selecting)
        assert abs(reads - (1 - ratio)) < 1e-9


# ---- the model-level behaviour on the tiny models --------------------------------------------------


@pytest.mark.parametrize("name", EVICTING)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_entries_removed_match_the_ratio(llama, name, ratio):
    press = small(name, ratio)
    x = ids(240)
    with torch.no_grad(), press(llama) as session:
        llama(input_ids=x)
        stats = session.stats()
    slack = 0.06 if name in ("promptdistill", "moa", "task_kv") else 0.02
    assert abs(stats["removed"] - ratio) <= slack, stats
    assert stats["bytes"] == stats["slots"] * 2 * llama.config.head_dim * 4


@pytest.mark.parametrize("name, ratio, options", [
    ("quest", 0.75, {"dense_layers": 0}), ("quest", 0.5, {"dense_layers": 1}),  # dense layers count as reading all
    ("token_select", 0.5, {}), ("token_select", 0.75, {}), ("a2ats", 0.5, {}), ("a2ats", 0.75, {}),
    ("hylra", 0.5, {}), ("hylra", 0.75, {})])
def test_read_sparse_methods_read_the_ratio_and_keep_the_cache(llama, name, ratio, options):
    press = kv.get(name, ratio=ratio, **options)
    x = ids(200)
    with press(llama) as session:
        llama.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        stats = session.stats()
    assert stats["removed"] == 0.0
    assert abs(stats["read_fraction"] - (1 - ratio)) < 0.08, stats


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "tova", "duo_attention", "moa", "attention_gate"])
def test_decode_time_eviction_holds_the_budget_on_long_generations(qwen, name):
    press = small(name, 0.5)
    x = ids(40)
    with press(qwen) as session:
        out = qwen.generate(x, max_new_tokens=60, min_new_tokens=60, do_sample=False)
        end = session.stats()
    assert out.shape[1] == 100
    budget = sum(int(s.budget.sum()) for s in session._slots.values())
    if name in ("duo_attention", "moa"):  # heads kept whole keep growing; the others hold their window
        whole = [session.shared[(name, i)] for i in range(2)]
        grown = sum(int(w.sum()) for w in whole) * 59
        assert end["entries"] == budget + grown
    else:
        assert end["entries"] == budget  # 59 tokens decoded into the cache, as many evicted
    if name == "streaming_llm":
        for row in session.kept_tokens(0)[0]:
            assert row.tolist() == [0, 1, 2, 3] + list(range(99 - 16, 99))


def test_promptdistill_keeps_early_layers_whole_and_later_layers_the_selected_tokens():
    model = tiny_llama(layers=6)
    press = kv.get("promptdistill", ratio=0.25)
    assert press.plan(200, 6) == (2, 100)  # 3 whole layers + 3 x 100 entries = 0.75 x 6 x 200
    with torch.no_grad(), press(model) as session:
        model(input_ids=ids(200))
        counts = [int(session._slots[i].bias.isfinite().sum(-1).max()) for i in range(6)]
        chosen = [session.kept_tokens(i)[0][0].tolist() for i in (3, 4, 5)]
    assert counts == [200, 200, 200, 100, 100, 100]
    assert chosen[0] == chosen[1] == chosen[2] and set(range(192, 200)) <= set(chosen[0])  # one set, window kept


def test_prefill_only_methods_grow_during_decoding(qwen):
    with kv.get("snapkv", ratio=0.5, window=8)(qwen) as session:
        qwen.generate(ids(40), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert session.stats()["entries"] == (20 + 9) * 2 * 2


def test_task_kv_and_promptdistill_run_on_qk_norm_models(qwen):
    for name in ("task_kv", "promptdistill", "razor", "a2ats"):
        with kv.get(name, ratio=0.5)(qwen) as session:
            out = qwen.generate(ids(120), max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert out.shape == (1, 125) and session.stats()["bytes"] > 0


def test_profiles_are_computed_once_per_model(llama):
    a = profile.needle_copy_scores(llama, None, samples=1, length=64)
    b = profile.needle_copy_scores(llama, None, samples=1, length=64)
    assert a is b and a.shape == (3, 2) and ((a >= 0) & (a <= 1)).all()


def test_sessions_are_independent_sequences(qwen):
    press = kv.get("snapkv", ratio=0.5, window=8)
    with press(qwen) as session:
        qwen.generate(ids(40), max_new_tokens=3, do_sample=False)
        first = session.stats()["entries"]
        qwen.generate(ids(60, seed=3), max_new_tokens=3, do_sample=False)
        second = session.stats()["entries"]
    assert first == (20 + 2) * 4 and second == (30 + 2) * 4



# ---- per-layer and per-head budgets ------------------------------------------------------------------


def test_per_layer_budgets_keep_each_layers_own_count(llama):
    press = kv.get("snapkv", ratio=0.5, window=8).with_budgets([0.25, 0.5, 0.9])
    assert press.ratio == pytest.approx(0.55)
    with torch.no_grad(), press(llama) as session:
        llama(input_ids=ids(200))
        kept = [[len(h) for h in session.kept_tokens(i)[0]] for i in range(3)]
    assert kept == [[150, 150], [100, 100], [20, 20]]


@pytest.mark.parametrize("name", ["h2o", "tova", "knorm", "streaming_llm"])
def test_per_head_budgets_keep_each_heads_own_count_and_hold_them_while_decoding(qwen, name):
    budgets = [[0.25, 0.75], [0.5, 0.0]]  # (layers, kv heads) of the tiny Qwen3
    press = kv.get(name, ratio=0.5).with_budgets(budgets)
    with press(qwen) as session:
        qwen.generate(ids(80), max_new_tokens=5, min_new_tokens=5, do_sample=False)
        kept = [[len(h) for h in session.kept_tokens(i)[0]] for i in range(2)]
    grows = 4 if name == "knorm" else 0  # prefill-only presses keep the decoded tokens; the others hold the budget
    assert kept == [[60 + grows, 20 + grows], [40 + grows, 80 + grows]]


def test_budgets_are_checked():
    with pytest.raises(ValueError, match=r"budgets: every ratio must be in \[0, 1\)"):
        kv.get("snapkv").with_budgets([0.5, 1.0])
    with pytest.raises(ValueError, match="budgets: expected a"):
        kv.get("snapkv").with_budgets([[[0.5]]])
    with pytest.raises(ValueError, match="pyramidkv sets its own per-layer budgets"):
        kv.get("pyramidkv").with_budgets([0.5, 0.5])


def test_budgets_that_do_not_fit_the_model_name_its_shape(llama):
    with pytest.raises(ValueError, match=r"budgets: expected \(3,\) or \(3, 2\) ratios"):
        with torch.no_grad(), kv.get("knorm").with_budgets([0.5, 0.5])(llama):
            llama(input_ids=ids(50))
