"""Cost-aware controllers (goodput, tree_size, threshold): the cost and acceptance models on synthetic traces, the
policies' decisions against brute force, bad options, the disk cache, and lossless generation through them."""

from __future__ import annotations

import itertools
import json
import random
import time

import numpy
import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.backends.graph import GraphBackend
from specdec.backends.hf import HFBackend
from specdec.backends.static import StaticBackend
from specdec.controllers import Budget, Frontier, StepStats, make_controller
from specdec.controllers.acceptance import AcceptanceModel
from specdec.controllers.adaptive import GoodputController, ThresholdController, TreeSizeController
from specdec.controllers.cost import CostModel, OnlineLine, nondecreasing, profile_plain, profile_verify
from specdec.drafters.model import ModelDrafter
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule
from specdec.tree import DraftTree, max_depth, subtree

from tiny_models import fresh_tiny_model, repetitive_prompt, single_thread, tiny_model


@pytest.fixture(autouse=True)
def cost_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_COST_CACHE", str(tmp_path / "costs"))
    return tmp_path / "costs"


def linear_cost(base=0.010, per_node=0.001, sizes=(0, 1, 2, 4, 8, 16, 32, 64), stepwise=False) -> CostModel:
    return CostModel({n: base + per_node * n for n in sizes}, stepwise=stepwise)


def prepared(controller, cost: CostModel):
    """A controller as `prepare` leaves it, with a given cost model (no backend, nothing profiled)."""
    controller.cost, controller._backend = cost, object()
    return controller


def chain_step(depth: int, accepted: int, draft_s=0.0, verify_s=0.01, step_s=0.0) -> StepStats:
    tree = DraftTree.chain(list(range(1, depth + 1)))
    return StepStats(depth, depth, accepted, draft_s, verify_s, step_s, tree, tuple(range(accepted)))


# ---- cost model -----------------------------------------------------------------------------------------------


def test_cost_model_interpolates_steps_and_extrapolates():
    cost = CostModel({0: 1.0, 4: 2.0, 8: 4.0})
    assert cost.verify_s(0) == 1.0 and cost.verify_s(2) == 1.5 and cost.verify_s(6) == 3.0
    assert cost.verify_s(12) == 6.0  # the last slope extended
    stepwise = CostModel({0: 1.0, 4: 2.0, 8: 4.0}, stepwise=True)
    assert stepwise.verify_s(1) == 2.0 and stepwise.verify_s(5) == 4.0  # the bucket that holds it
    for model in (cost, stepwise):
        assert numpy.allclose(model.verify_table(12), [model.verify_s(n) for n in range(13)])
    with pytest.raises(ValueError, match="plain step"):
        CostModel({1: 1.0})
    with pytest.raises(ValueError, match="finite and > 0"):
        CostModel({0: 1.0, 2: -1.0})


def test_a_noisy_profile_is_made_nondecreasing():
    cost = CostModel({0: 2.0, 1: 1.8, 2: 1.1, 4: 1.9, 8: 2.6, 16: 1.6})
    assert all(a <= b for a, b in zip(cost.points, cost.points[1:]))
    assert cost.points[:3] == pytest.approx([1.6333333, 1.6333333, 1.6333333])
    assert nondecreasing([1.0, 3.0, 2.0, 4.0]) == pytest.approx([1.0, 2.5, 2.5, 4.0])
    cost.observe(StepStats(4, 4, 0, verify_s=0.1, step_s=0.1))  # one fast step: its neighbours follow it down
    assert all(a <= b for a, b in zip(cost.points, cost.points[1:]))


def test_online_line_fits_a_line_and_a_single_point_through_the_origin():
    line = OnlineLine()
    line.add(3, 6.5)
    assert line(6) == pytest.approx(13.0)  # one distinct x: proportional
    for x in (1, 2, 4, 8):
        line.add(x, 0.5 + 2.0 * x)  # on the line 0.5 + 2x, as the first point
    assert line(10) == pytest.approx(20.5, rel=1e-6)


def test_cost_model_refines_toward_measured_steps_and_counts_its_error():
    cost = CostModel({0: 0.010, 8: 0.020}, decay=0.5)
    for _ in range(30):
        cost.observe(StepStats(4, 4, 1, draft_s=0.002, verify_s=0.030, step_s=0.033))
    assert cost.verify_s(4) == pytest.approx(0.030, rel=1e-3)
    assert cost.draft_s(4) == pytest.approx(0.002, rel=1e-3) and cost.other == pytest.approx(0.001, rel=1e-3)
    mape, steps = cost.error()
    assert steps == 30 and 0 < mape < 0.5
    first = CostModel({0: 0.010, 8: 0.020})
    first.observe(StepStats(4, 4, 1, draft_s=0.0, verify_s=0.015, step_s=0.030))
    assert first.error() == (pytest.approx(0.5), 1)  # predicted 0.015 (draft, rest unknown: 0), measured 0.030
    cost.observe(StepStats(0, 0, 0, verify_s=0.016, step_s=0.016, plain_steps=8))
    assert cost.plain_s(8) == pytest.approx(0.016)


def test_single_plain_steps_keep_a_stale_profiles_plain_step_current():
    """A profile cached when the machine was faster: single plain steps (the HF backend's plain runs) are predicted
    from its step of 0 nodes, capped by it; they refine that point, so the predictions follow the machine."""
    cost = CostModel({0: 0.050, 8: 0.080})
    for _ in range(60):
        cost.observe(StepStats(0, 0, 0, verify_s=0.070, step_s=0.070, plain_steps=1))
    assert cost.plain_s(1) == pytest.approx(0.070, rel=0.01) and cost.verify_s(0) == pytest.approx(0.070, rel=0.01)
    assert cost.verify_s(8) >= cost.verify_s(0)  # the larger trees stay at least as costly


def test_profile_times_every_size_and_is_cached_on_disk(cost_cache):
    model = tiny_model("llama")
    backend = HFBackend(model)
    prompt = repetitive_prompt(model.config.vocab_size, seed=1)
    with single_thread():
        points = profile_verify(backend, prompt, max_nodes=16, reps=3)
        assert sorted(points) == [0, 1, 2, 3, 4, 6, 8, 12, 16] and all(s > 0 for s in points.values())
        first = CostModel.load_or_profile(backend, prompt, max_nodes=16, reps=3)
        files = list(cost_cache.glob("*.json"))
        assert len(files) == 1
        saved = json.loads(files[0].read_text())
        assert saved["key"]["backend"] == "HFBackend" and saved["max_nodes"] == 16
        second = CostModel.load_or_profile(backend, prompt, max_nodes=16, reps=3)
        assert second.points == first.points  # read back, not profiled again
        files[0].write_text("{not json")
        third = CostModel.load_or_profile(backend, prompt, max_nodes=16, reps=3)  # corrupt: profiled anew
        assert sorted(third.sizes) == sorted(first.sizes) and json.loads(files[0].read_text())["max_nodes"] == 16


def test_plain_chains_are_profiled_where_the_backend_chains_them():
    model = fresh_tiny_model("llama").float()
    prompt = repetitive_prompt(model.config.vocab_size, seed=1)
    with single_thread():
        points = profile_plain(GraphBackend(model), prompt, longest=8, reps=2)
        assert sorted(points) == [1, 2, 4, 8] and all(s > 0 for s in points.values())
        assert profile_plain(HFBackend(model), prompt) == {}  # one step at a time there: nothing to chain


# ---- acceptance model -----------------------------------------------------------------------------------------


def test_acceptance_model_learns_per_depth_rates_from_a_synthetic_chain_trace():
    rng, model = random.Random(0), AcceptanceModel(max_depth=8, decay=1.0)
    truth = [0.9, 0.7, 0.5, 0.3]
    for _ in range(4000):
        accepted = next((d for d, p in enumerate(truth) if rng.random() > p), len(truth))
        model.observe(list(range(-1, len(truth) - 1)), list(range(accepted)))
    assert numpy.allclose(model.rates()[1:5, 0], truth, atol=0.04)
    values = model.values([-1, 0, 1, 2])
    assert numpy.allclose(values, numpy.cumprod(truth), atol=0.04)


def test_observe_counts_the_tested_nodes_by_depth_and_rank():
    """Tree a(-1) b(0) c(0) d(-1) e(1) f(2), accepted path a, c: tested are the root's children a, d (depth 1,
    ranks 0, 1), a's children b, c (depth 2, ranks 0, 1) and c's child f (depth 3, rank 0); e's parent b was
    rejected. Accepted: a and c."""
    model = AcceptanceModel(max_depth=4, decay=1.0)
    model.observe([-1, 0, 0, -1, 1, 2], [0, 2])
    expected_tested = numpy.zeros((5, 4))
    expected_tested[1, [0, 1]] = 1
    expected_tested[2, [0, 1]] = 1
    expected_tested[3, 0] = 1
    expected_accepted = numpy.zeros((5, 4))
    expected_accepted[1, 0] = expected_accepted[2, 1] = 1
    assert (model.tested == expected_tested).all() and (model.accepted == expected_accepted).all()


def test_node_values_follow_the_docstring_example_and_ranks_never_outvalue_earlier_siblings():
    model = AcceptanceModel(max_depth=4, prior=0.5, strength=1e-9, decay=1.0)
    model.tested[1, 0], model.accepted[1, 0] = 10, 8
    model.tested[2, 0], model.accepted[2, 0] = 10, 5
    model.tested[1, 1], model.accepted[1, 1] = 10, 3
    assert numpy.allclose(model.values([-1, 0, -1]), [0.8, 0.4, 0.3])
    later = AcceptanceModel(max_depth=4, strength=1e-9, decay=1.0)
    later.tested[1, :3], later.accepted[1, :3] = 10, [8, 3, 9]  # a later rank measured higher: capped at rank 1's
    assert later.rates()[1, 2] == pytest.approx(0.3)
    assert later.rates()[3, 0] == pytest.approx(0.8)  # never tested: depth 2's rate, which is depth 1's


def test_untested_cells_inherit_their_neighbours_rates():
    model = AcceptanceModel(max_depth=4, prior=0.5, strength=2.0, decay=1.0)
    model.tested[1, 0], model.accepted[1, 0] = 100, 30  # the root's first children: 0.3
    rates = model.rates()
    assert rates[1, 0] == pytest.approx((30 + 1.0) / 102)
    assert rates[2, 0] == pytest.approx(rates[1, 0]) and rates[4, 0] == pytest.approx(rates[1, 0])
    assert rates[1, 1] == pytest.approx(0.5 * rates[1, 0])


def test_best_tree_is_the_brute_force_best_set_of_nodes():
    model = AcceptanceModel(max_depth=3, decay=1.0)
    model.tested[1:4, :2] = 10
    model.accepted[1:4, 0] = [9, 7, 5]
    model.accepted[1:4, 1] = [4, 3, 2]
    values, depths = model.best_tree(5, 3, width=2)
    # every node of the width-2 tree to depth 3, valued; the best 5 (a closed set: values fall along paths)
    everything = []
    for depth in (1, 2, 3):
        for ranks in itertools.product((0, 1), repeat=depth):
            everything.append(numpy.prod([model.rates()[d + 1, r] for d, r in enumerate(ranks)]))
    assert numpy.allclose(values, sorted(everything, reverse=True)[:5])
    assert list(values) == sorted(values, reverse=True) and depths.max() <= 3


# ---- policies -------------------------------------------------------------------------------------------------


def test_goodput_goes_plain_when_drafts_fail_and_probes_with_doubling_gaps():
    """A drafter whose drafts cost 2 plain tokens (a model's) is probed after 4, 8, 16 plain tokens, twice a probe."""
    controller = prepared(GoodputController(probe_every=4, probe_max=16, plain_chain=4, resolve_every=1),
                          linear_cost(per_node=0.004))
    for _ in range(40):  # drafts of 4 that never get accepted
        controller.observe(chain_step(4, 0, draft_s=0.020, verify_s=0.026, step_s=0.046))
    decisions = []
    for _ in range(30):
        budget = controller.budget([])
        decisions.append(budget.max_nodes)
        if budget.max_nodes:
            controller.observe(chain_step(budget.max_depth, 0, draft_s=0.020, verify_s=0.026, step_s=0.046))
        else:
            assert budget.plain_steps >= 1
            controller.observe(StepStats(0, 0, 0, verify_s=0.010 * budget.plain_steps,
                                         step_s=0.010 * budget.plain_steps, plain_steps=budget.plain_steps))
    drafts = [i for i, nodes in enumerate(decisions) if nodes]
    probes = [i for i in drafts if i - 1 not in drafts]  # a probe drafts twice: the second step is measured
    assert decisions[0] == 0 and len(probes) >= 2 and all(i + 1 in drafts for i in probes[:-1])
    gaps = numpy.diff(probes)
    assert all(later >= earlier for earlier, later in zip(gaps, gaps[1:]))  # the gaps grow (to probe_max)
    assert controller.report()["probes"] == len(probes)


def test_goodput_gates_speculation_on_measured_rates_not_on_the_models_alone():
    """The models promise a good draft (flat verify cost, full acceptance), but the measured speculative steps make
    fewer tokens per second than the measured plain runs: plain runs win; when the probes measure speculation
    faster again, it resumes."""
    controller = prepared(GoodputController(resolve_every=1, probe_every=2, plain_chain=4), linear_cost(0.010, 1e-5))
    for _ in range(10):
        for _ in range(2):  # (the first draft after plain runs pays the drafter's catch-up: not measured)
            controller.observe(chain_step(4, 4, draft_s=0.08, verify_s=0.0101, step_s=0.100))  # 5 in 100 ms: 50 tok/s
        controller.observe(StepStats(0, 0, 0, verify_s=0.04, step_s=0.040, plain_steps=4))  # 100 tok/s
    def decide(steps: int, spec_s: float) -> list[int]:
        decisions = []
        for _ in range(steps):
            budget = controller.budget([])
            decisions.append(budget.max_nodes)
            if budget.max_nodes:
                controller.observe(chain_step(4, 4, draft_s=spec_s - 0.0101, verify_s=0.0101, step_s=spec_s))
            else:
                controller.observe(StepStats(0, 0, 0, verify_s=0.04, step_s=0.040, plain_steps=budget.plain_steps))
        return decisions

    slow = decide(16, spec_s=0.100)  # probes as slow as before: plain runs win, probes (two drafts) after 4, 8, 16
    assert slow.count(0) >= 7 and slow[-7:].count(0) >= 4
    fast = decide(20, spec_s=0.030)  # probes now make 5 tokens in 30 ms (167 tok/s): speculation resumes
    speculated = [nodes for nodes in fast[-8:] if nodes]
    assert len(speculated) >= 7  # (at most one plain probe)


def test_a_drafters_slow_first_step_does_not_turn_speculation_off():
    """A draft model's first step of a sequence includes its prefill (here 2 s); later steps make 5 tokens in
    20 ms, plain runs 1 token in 10 ms: goodput keeps speculating."""
    controller = prepared(GoodputController(resolve_every=1), linear_cost(0.010, 1e-5))
    controller.observe(chain_step(4, 4, verify_s=0.0101, step_s=2.0))
    controller.observe(chain_step(4, 4, verify_s=0.0101, step_s=0.020))
    controller.cost.seed_plain({8: 0.080})
    assert all(controller.budget([]).max_nodes > 0 for _ in range(4))  # (then a plain probe: the next test)


def run_trace(controller, steps: int, spec_s: float, plain_s: float) -> list[int]:
    """Each budget's nodes (0: a plain run); a speculative step makes 5 tokens in spec_s (half of it a model-like
    drafter's draft: not cheap), a plain run of 8 plain_s."""
    decisions = []
    for _ in range(steps):
        budget = controller.budget([])
        decisions.append(budget.max_nodes)
        if budget.max_nodes:
            controller.observe(chain_step(4, 4, draft_s=spec_s / 2, verify_s=0.0101, step_s=spec_s))
        else:
            run_s = plain_s * budget.plain_steps / 8
            controller.observe(StepStats(0, 0, 0, verify_s=run_s, step_s=run_s, plain_steps=budget.plain_steps))
    return decisions


def test_goodput_measures_plain_runs_where_the_profile_flatters_speculation():
    """The profile says a plain run of 8 takes 400 ms (20 tok/s), so speculation (5 tokens in 100 ms: 50 tok/s)
    looks better; the loop's real plain runs take 80 ms (100 tok/s). A plain probe after 4 speculative steps
    measures that, and plain runs win from then on (speculation probed at growing gaps)."""
    controller = prepared(GoodputController(resolve_every=1, plain_chain=8), linear_cost(0.050, 1e-5))
    controller.cost.seed_plain({8: 0.400})
    decisions = run_trace(controller, 60, spec_s=0.100, plain_s=0.080)
    first_plain = decisions.index(0)
    assert 4 <= first_plain <= 6 and controller.report()["plain_probes"] >= 1
    assert decisions[-30:].count(0) >= 20


def test_plain_probes_grow_apart_while_speculation_wins():
    controller = prepared(GoodputController(resolve_every=1, plain_chain=8), linear_cost(0.010, 1e-5))
    # speculation: 5 tokens in 20 ms (250 tok/s); plain runs: 8 in 80 ms (100 tok/s)
    decisions = run_trace(controller, 200, spec_s=0.020, plain_s=0.080)
    plain = [i for i, nodes in enumerate(decisions) if nodes == 0]
    gaps = numpy.diff(plain)
    assert len(plain) >= 3 and all(later > earlier for earlier, later in zip(gaps, gaps[1:]))
    assert len(plain) <= 6  # at most 8 plain tokens per 4, 8, 16, 32, ... speculative steps


def test_a_probe_that_accepts_nothing_does_not_lock_goodput_into_plain_runs():
    """An n-gram-like drafter: its steps accept 0, 0, 0, 9, 0, 0, 0, 9, ... nodes (3.25 tokens a 10 ms step on
    average: 325 tok/s) against plain runs of 8 tokens in 40 ms (200 tok/s). A probe of speculation is one or two
    steps, most of which accept nothing: judged by the probe's own tokens, speculation looks like 100 tok/s and plain
    runs win for good (the H100 run: `ngram@goodput` 88% plain, 1.05x, against 1.25x for `heuristic`). Tokens per
    step are averaged over many speculative steps, seconds per step over the recent ones: speculation keeps most
    steps. (Before: 79 speculative tokens against 2200 plain.)"""
    controller = prepared(GoodputController(resolve_every=1, plain_chain=8), linear_cost(0.008, 1e-5))
    controller.cost.seed_plain({8: 0.040})
    pattern, spec_steps, spec_tokens, plain_tokens = [0, 0, 0, 9], 0, 0, 0
    for _ in range(300):
        budget = controller.budget([])
        if budget.max_nodes:
            accepted = pattern[spec_steps % len(pattern)]
            spec_steps += 1
            controller.observe(chain_step(12, accepted, verify_s=0.01, step_s=0.010))
            spec_tokens += accepted + 1
        else:
            controller.observe(StepStats(0, 0, 0, verify_s=0.040, step_s=0.040, plain_steps=budget.plain_steps))
            plain_tokens += budget.plain_steps
    assert spec_tokens >= 3 * plain_tokens


@pytest.fixture
def learn_every_step(monkeypatch):
    """The models learn from every step: how often they do otherwise follows the host's own timing (LEARN_SHARE of
    the simulated step seconds), and a loaded CI host made the simulations' lessons rare enough to fail them."""
    import specdec.controllers.adaptive as adaptive

    monkeypatch.setattr(adaptive, "LEARN_SHARE", 1e9)


def gated_step(controller, tree: DraftTree, accepted: int, draft_s: float, spec_s: float, token_s: float):
    """One decision of a cheap drafter under goodput, as the generator makes it: budget, draft (`tree`), trim ->
    (tokens made, seconds, whether the tree was verified; None: not drafted). A verified step accepts `accepted`
    tokens of the tree and costs draft_s + spec_s; a plain run costs draft_s + token_s a token."""
    budget = controller.budget([])
    if not budget.max_nodes:  # plain runs without a draft (verified: None)
        run_s = budget.plain_steps * token_s
        controller.observe(StepStats(0, 0, 0, verify_s=run_s, step_s=run_s, plain_steps=budget.plain_steps))
        return budget.plain_steps, run_s, None
    decision = controller.trim(tree, draft_s)
    if isinstance(decision, Budget):
        run_s = decision.plain_steps * token_s
        controller.observe(StepStats(0, 0, 0, draft_s=draft_s, verify_s=run_s, step_s=draft_s + run_s,
                                     plain_steps=decision.plain_steps, proposed_nodes=len(tree)))
        return decision.plain_steps, draft_s + run_s, False
    accepted = min(accepted, max_depth(decision))
    controller.observe(StepStats(len(decision), max_depth(decision), accepted, draft_s, spec_s, draft_s + spec_s,
                                 decision, tuple(range(accepted)), proposed_nodes=len(tree)))
    return accepted + 1, draft_s + spec_s, True


def test_a_cheap_drafters_trees_that_never_match_run_plain_runs_with_a_check_as_often_as_it_is_cheap(learn_every_step):
    """A drafter whose drafts cost ~nothing (0.1 ms against 10 ms a plain token) and never match: once its class of
    trees is learnt to be worth less than plain runs (after a few checks from the prior), its proposals run a plain
    run of 8 instead, and the next is checked. A check that finds nothing costs 0.23 plain tokens (12.3 ms against
    10) more than a plain token: PROBE_SHARE (2%) of 1.4 runs of 8, so the gap between checks stays at 1 run. (With
    a GPU's costs a check costs most of a token, and the gap grows: the next test.)"""
    controller = prepared(GoodputController(resolve_every=1, plain_chain=8), linear_cost(0.010, 1e-5))
    controller.cost.seed_plain({8: 0.080})
    tree = DraftTree.from_paths([[5, 6, 7, 8]], match_len=1)
    verified = [gated_step(controller, tree, 0, draft_s=0.0001, spec_s=0.0122, token_s=0.010)[2] for _ in range(80)]
    later = verified[10:]  # (how often the models learn depends on the host's timing: no exact sequence)
    assert 0.3 <= sum(later) / len(later) <= 0.6 and not any(a and b for a, b in zip(later, later[1:]))
    assert controller.report()["gate_gap"] == controller._cheap_gap(8) == 1


@pytest.mark.parametrize("short_len", [1, 0], ids=["match-of-1", "no-match-given"])
def test_a_gated_cheap_drafter_verifies_long_matches_and_skips_short_ones(short_len, learn_every_step):
    """`ngram`-like trees in runs of 10: matches of 3 tokens are accepted to depth 4, matches of 1 never. On
    H100-like costs (a step 1.3 ms, a plain token 0.7 ms) goodput learns the two classes apart: it verifies the long
    matches and runs plain runs for the short ones (the first after a step that paid, and a check now and then).
    Trees that give no match length (`fused` led by `recycling`) are a class of their own, not judged by the matched
    trees' acceptance."""
    controller = prepared(GoodputController(resolve_every=1, plain_chain=8), linear_cost(0.00092, 1e-6))
    controller.cost.seed_plain({8: 0.0056})
    long_match = DraftTree.from_paths([[1, 2, 3, 4, 5, 6, 7, 8]], match_len=3)
    short_match = DraftTree.from_paths([[9, 10, 11, 12, 13, 14, 15, 16]], match_len=short_len)
    verified, drafted = {short_len: 0, 3: 0}, {short_len: 0, 3: 0}
    proposals = itertools.cycle([short_match] * 10 + [long_match] * 10)
    tree = next(proposals)
    for step in range(400):
        made, _, was = gated_step(controller, tree, 4 if tree is long_match else 0, draft_s=0.0001, spec_s=0.0013,
                                  token_s=0.0007)
        if was is not None:  # the drafter proposed it: the next decision sees the other class
            if step >= 200:
                verified[tree.match_len] += was
                drafted[tree.match_len] += 1
            tree = next(proposals)
    assert drafted[3] >= 50 and verified[3] == drafted[3]  # every long match, in the second half
    assert verified[short_len] <= drafted[short_len] / 3  # short ones: checks only, after 1, 2, 4 skips, then ~5
    assert controller.report()["gate_gap"] >= 4 and controller._cheap_gap(8) >= 4


def simulate(policy: str, match_span: int, period: int = 200, total: int = 3000, spec_s: float = 0.012,
             token_s: float = 0.010, draft_s: float = 0.0002) -> float:
    """Tokens per second of an n-gram-like drafter on a text whose first `match_span` positions of every `period`
    are matched (a draft there is a match of 3 tokens, accepted up to the span's end; elsewhere the drafter proposes
    a match of 1 token that is never accepted): `goodput` (the generator's protocol: budget, draft, trim), `plain`
    (runs of 8), or `static` (always a depth-8 draft). A speculative step takes draft_s + spec_s, a plain token
    token_s."""
    controller = prepared(GoodputController(resolve_every=1, plain_chain=8), linear_cost(0.010, 1e-5))
    controller.cost.seed_plain({8: 8 * token_s})
    long_match = DraftTree.from_paths([list(range(1, 9))], match_len=3)
    short_match = DraftTree.from_paths([list(range(11, 19))], match_len=1)
    position, seconds = 0, 0.0
    while position < total:
        left = match_span - position % period
        accepted = min(8, left - 1) if left > 1 else 0
        if policy == "goodput":
            made, spent, _ = gated_step(controller, long_match if left > 1 else short_match, accepted, draft_s,
                                        spec_s, token_s)
        elif policy == "plain":
            made, spent = 8, 8 * token_s
        else:
            made, spent = accepted + 1, draft_s + spec_s
        position, seconds = position + made, seconds + spent
    return position / seconds


@pytest.mark.parametrize("token_s, spec_s, draft_s", [(0.010, 0.012, 0.0002), (0.00095, 0.0013, 0.00015)],
                         ids=["cpu-like", "gpu-like"])
def test_goodput_follows_runs_of_matches_and_never_loses_to_plain_runs(token_s, spec_s, draft_s, learn_every_step):
    """Matches come in runs. Always drafting loses where they are rare (a step that finds nothing costs more than
    a plain token); plain runs lose where they are common. goodput drafts at every decision and verifies the trees
    whose class (match length) pays: >= 0.97x the better of the two everywhere (checks may cost 2% of the plain
    tokens, PROBE_SHARE, and a plain run of 8 misses up to 7 of a run's first tokens), better than both where
    matches are neither rare nor everywhere. (A CPU's costs, and an H100's for SmolLM2-135M with `ngram`.)"""
    costs = dict(token_s=token_s, spec_s=spec_s, draft_s=draft_s)
    for span in (0, 8, 20, 60, 150):
        rates = {policy: simulate(policy, span, **costs) for policy in ("goodput", "plain", "static")}
        assert rates["goodput"] >= 0.97 * max(rates["plain"], rates["static"]), (span, rates)
        if span in (60, 150):
            assert rates["goodput"] > max(rates["plain"], rates["static"]), (span, rates)


@pytest.mark.parametrize("per_node, max_nodes", [(1e-5, 64), (1e-3, 16), (5e-3, 64), (1e-4, 4)])
def test_goodput_solves_the_best_depth_and_node_count_as_a_loop_over_them_would(per_node, max_nodes):
    """The solve's one pass of array operations picks what trying every solve depth and node count picks."""
    controller = prepared(GoodputController(max_nodes=max_nodes, max_depth=16), linear_cost(0.01, per_node))
    generator = random.Random(int(per_node * 1e6) + max_nodes)
    for _ in range(30):  # a learnt acceptance model: trees of 1-3 paths, each accepting its first 0-2 tokens
        depth = generator.randrange(1, 9)
        tree = DraftTree.from_paths([[generator.randrange(50) for _ in range(depth)] for _ in range(3)])
        accepted = generator.randrange(0, min(depth, 2) + 1)
        controller._learn(StepStats(len(tree), depth, accepted, 0.001 * depth, 0.01, 0.02, tree,
                                    tuple(range(accepted))))
    controller._verify_table = controller.cost.verify_table(controller.max_nodes)
    values, depths = controller._best_first()
    best, best_rate = None, -1.0
    for depth in (d for d in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16) if d <= controller.max_depth):
        within = values[depths <= depth][:max_nodes]
        for n in range(1, len(within) + 1):
            rate = (1 + within[:n].sum()) / (controller._verify_table[n] + controller.cost.draft_s(depth)
                                            + controller.cost.other)
            if rate > best_rate + 1e-12:
                best, best_rate = Budget(n, depth), rate
    budget, rate = controller._solve()
    assert budget == best and rate == pytest.approx(best_rate)


def test_goodput_drafts_deep_when_verification_is_flat_and_drafts_are_accepted():
    controller = prepared(GoodputController(resolve_every=1), linear_cost(per_node=0.00001))
    for _ in range(60):
        controller.observe(chain_step(8, 8, verify_s=0.0101, step_s=0.0101))
    budget = controller.budget([])
    assert budget.max_depth >= 8 and budget.max_nodes >= 8


def test_goodput_trim_keeps_the_brute_force_best_closed_subtree():
    controller = prepared(GoodputController(), linear_cost(per_node=0.002))
    rng = random.Random(1)
    for _ in range(200):  # a branching trace: rank 0 accepted 70% per depth, rank 1 20%
        parents = [-1, -1, 0, 0, 2, 4]
        accepted, node = [], -1
        for _ in range(3):
            children = [i for i, p in enumerate(parents) if p == node]
            taken = next((c for c, p in zip(children, (0.7, 0.2)) if rng.random() < p), None)
            if taken is None:
                break
            accepted.append(taken)
            node = taken
        controller.observe(StepStats(6, 4, len(accepted), 0.0, 0.02, 0.0, DraftTree.from_paths(
            [[1, 2, 3, 4], [1, 5], [6]]), tuple(accepted)))
    controller.budget([])
    tree = DraftTree.from_paths([[1, 2, 3, 4], [1, 5], [6]])  # parents [-1, 0, 1, 2, 0, -1]
    cut = controller.trim(tree, draft_s=0.001)
    values = controller.acceptance.values(tree.host_parents)
    best = max((subset for size in range(len(tree) + 1) for subset in itertools.combinations(range(len(tree)), size)
                if all(tree.host_parents[n] in (-1, *subset) for n in subset)),
               key=lambda s: (1 + values[list(s)].sum()) / (0.001 + controller.cost.verify_s(len(s))
                                                            + controller.cost.other))
    assert sorted(cut.origin or range(len(tree))) == sorted(best)
    assert cut.host_tokens == tuple(tree.host_tokens[n] for n in sorted(best))


def test_tree_size_solves_the_best_node_budget():
    controller = prepared(TreeSizeController(resolve_every=1, max_nodes=32), linear_cost(per_node=0.0015))
    for _ in range(100):
        controller.observe(chain_step(6, 3, verify_s=0.019, step_s=0.019))
    budget = controller.budget([])
    values, _ = controller.acceptance.best_tree(32 + 16, 16, 1)
    ratios = [(1 + values[:n].sum()) / (controller.cost.verify_s(n) + controller.cost.draft_s(16)
                                        + controller.cost.other) for n in range(1, 33)]
    assert budget.max_nodes == int(numpy.argmax(ratios)) + 1


def test_threshold_cut_comes_from_the_cost_model_and_the_rate():
    cheap, dear = (prepared(ThresholdController(resolve_every=1), linear_cost(per_node=per_node))
                   for per_node in (0.0001, 0.003))
    for controller in (cheap, dear):
        for _ in range(20):
            controller.observe(chain_step(4, 2, verify_s=0.012, step_s=0.012))
    low, high = cheap.budget([]).min_confidence, dear.budget([]).min_confidence
    assert 0 < low < high <= 1.0
    values = dear.acceptance.values([-1, 0, 1, 2])
    assert len(dear.trim(DraftTree.chain([5, 6, 7, 8]), 0.0)) == int((values >= high).sum())


def test_keep_drafting_weighs_the_frontier_against_its_marginal_cost():
    controller = prepared(GoodputController(), linear_cost(per_node=0.001))
    for _ in range(20):
        controller.observe(chain_step(4, 4, draft_s=0.004, verify_s=0.014, step_s=0.02))
    assert controller.keep_drafting(Frontier(2, (0.9,), (0.9,), nodes=2))
    assert not controller.keep_drafting(Frontier(2, (0.001,), (0.01,), nodes=2))


@pytest.mark.parametrize("spec, message", [
    ("goodput:max_depth=0", "max_depth must be an integer >= 1"),
    ("tree_size:max_nodes=-3", "max_nodes must be an integer >= 1"),
    ("threshold:probe_every=8,probe_max=4", "probe_max"),
    ("goodput:profile_seconds=0", "profile_seconds must be > 0"),
    ("no_such_controller", "unknown controller 'no_such_controller'.*goodput.*static.*threshold.*tree_size"),
])
def test_bad_controller_options_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        make_controller(spec)


def test_negative_budgets_and_plain_steps_are_refused():
    with pytest.raises(ValueError, match="budget sizes must be >= 0"):
        Budget(-1, 2)
    with pytest.raises(ValueError, match="plain_steps must be >= 1"):
        Budget(0, 0, plain_steps=0)


def test_subtree_renumbers_and_refuses_an_orphan():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 4], [5]])  # parents [-1, 0, 1, 0, -1]
    cut = subtree(tree, [0, 3, 4])
    assert cut.host_tokens == (1, 4, 5) and cut.host_parents == (-1, 0, -1) and cut.origin == (0, 3, 4)
    with pytest.raises(ValueError, match="drops the parent"):
        subtree(tree, [2])


# ---- lossless through the generator ---------------------------------------------------------------------------


@pytest.mark.parametrize("controller", ["goodput", "tree_size", "threshold"])
@pytest.mark.parametrize("drafter", ["ngram", "recycling", "fused:drafters=ngram+copyspec"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_output_equals_the_reference(controller, drafter, arch):
    model = tiny_model(arch)
    prompt = repetitive_prompt(model.config.vocab_size, seed=5)
    with single_thread():
        truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(60))
        generator = SpeculativeGenerator(model, drafter=drafter, controller=f"{controller}:profile_reps=2")
        for _ in range(2):  # the second generation starts from what the first learnt
            out = generator.generate(prompt, max_new_tokens=60)
            assert out.token_ids == truth and out.stats.drafter_errors == 0
    assert out.stats.controller["cost_steps"] > 0


def test_plain_runs_on_a_static_backend_and_a_failing_drafter_stay_lossless():
    """Drafts that cost time and are never accepted: goodput switches to plain runs (no drafter calls between
    probes)."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(model.config.vocab_size, seed=2)

    class Wrong:
        vocab_size, calls = None, 0

        def propose(self, ctx):
            Wrong.calls += 1
            time.sleep(0.003)  # drafting costs time (so the verdict does not hang on timing noise)
            size = min(6, ctx.budget.max_depth, ctx.budget.max_nodes)
            return DraftTree.chain([(ctx.token_ids[-1] + 1) % 7] * size)

        def observe(self, result):
            pass

        def reset(self):
            pass

    with single_thread():
        truth = reference_decode(StaticBackend(model), prompt, SamplingParams(), StopRule(200))
        controller = GoodputController(profile_reps=2, probe_every=4)
        generator = SpeculativeGenerator(model, drafter=Wrong(), controller=controller, backend="static")
        out = generator.generate(prompt, max_new_tokens=200)
    assert out.token_ids == truth
    assert out.stats.controller["plain_tokens"] > 100 and Wrong.calls < 60


@pytest.mark.parametrize("backend", ["hf", "static"])
def test_gated_ngram_on_backends_with_and_without_chains_stays_lossless(backend):
    """goodput gates `ngram` (cheap): skipped trees run plain runs instead -- a chain where the backend's chained
    tokens cost less than single steps (measured at `prepare`), else one step (HF: no chains) -- and the output is
    the reference's."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(model.config.vocab_size, seed=3)
    with single_thread():
        truth = reference_decode(HFBackend(model), prompt, SamplingParams(), StopRule(120))
        controller = GoodputController(profile_reps=2)
        generator = SpeculativeGenerator(model, drafter="ngram", controller=controller, backend=backend)
        for _ in range(2):
            out = generator.generate(prompt, max_new_tokens=120)
            assert out.token_ids == truth and out.stats.drafter_errors == 0
    assert controller._gating()
    if backend == "hf":
        assert controller._gate_run == 1
    else:
        chains = controller.cost.plain
        assert controller._gate_run in (1, controller.plain_chain) and chains.seen


def test_first_path_is_each_nodes_first_child_in_turn():
    from specdec.controllers.adaptive import _first_path, _match_class

    assert [_match_class(n) for n in (0, 1, 2, 3, 4, 7, 8, 32)] == [0, 1, 2, 3, 4, 4, 8, 8]

    tree = DraftTree.from_paths([[1, 2], [1, 3, 4], [5, 6]])  # parents [-1, 0, 0, 2, -1, 4]
    path = _first_path(tree)
    assert path.host_tokens == (1, 2) and path.host_parents == (-1, 0)
    assert len(_first_path(DraftTree.empty())) == 0


def test_model_drafter_keeps_its_cache_through_trimmed_trees():
    """A trimmed tree (`origin`) is still recognised by the model drafter: its calibration learns and the output is
    the reference's."""
    with single_thread():
        torch.manual_seed(0)
        target = fresh_tiny_model("llama", layers=2, init_range=0.1)
        draft = fresh_tiny_model("llama", layers=1, init_range=0.1)
        prompt = repetitive_prompt(target.config.vocab_size, seed=4)
        truth = reference_decode(HFBackend(target), prompt, SamplingParams(), StopRule(40))
        drafter = ModelDrafter(draft, mode="tree", topk=3)
        controller = GoodputController(profile_reps=2, max_nodes=24, max_depth=6)
        generator = SpeculativeGenerator(target, drafter=drafter, controller=controller)
        out = generator.generate(prompt, max_new_tokens=40)
    assert out.token_ids == truth and out.stats.drafter_errors == 0
    assert drafter.calibration.tested.sum() > 0


def test_sampling_through_goodput_matches_the_target_distribution():
    """Temperature 1: the first sampled token's frequencies over many seeds match the target's probabilities
    (trims and plain runs never bias a draw)."""
    model = tiny_model("llama")
    prompt = repetitive_prompt(model.config.vocab_size, seed=7)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits, -1)
    top = probs.topk(3)
    generator = SpeculativeGenerator(model, drafter="ngram", controller="goodput:profile_reps=2")
    counts = torch.zeros_like(probs)
    trials = 300
    with single_thread():
        for seed in range(trials):
            out = generator.generate(prompt, max_new_tokens=4, temperature=1.0, seed=seed)
            counts[out.token_ids[0]] += 1
    for token, p in zip(top.indices.tolist(), top.values.tolist()):
        assert abs(counts[token] / trials - p) < 4 * (p * (1 - p) / trials) ** 0.5 + 1e-3


# A draft model's regimes: (plain token s, verify points, draft s per depth, catch-up s of a sequence's first draft).
# bf16 on an AMX Xeon (the Qwen pair): a verify costs about one AR step, a draft token ~0.1 s: chains pay.
# float32 on this 2-core EPYC (`qwen_fp32_short`): verifying 2 tokens costs 1.8 AR steps, 5 tokens 2.25: none pays.
MODEL_REGIMES = {
    "bf16-amx": (0.228, {0: 0.228, 1: 0.21, 2: 0.212, 4: 0.215, 8: 0.225, 16: 0.26, 32: 0.33, 64: 0.47}, 0.10, 0.5),
    "fp32-2core": (0.40, {0: 0.40, 1: 0.73, 2: 0.76, 4: 0.90, 8: 1.0, 16: 1.3, 32: 2.0, 64: 3.5}, 0.16, 1.0),
}


def simulate_model_drafter(policy: str, regime: str, p_accept: float = 0.85, sequences: int = 12,
                           tokens: int = 96) -> float:
    """Tokens per second of a draft model's chains over `sequences` answers of `tokens`: `goodput` (the generator's
    protocol: budget, draft to its depth, trim, verify, observe; a new sequence's first draft pays the draft model's
    catch-up, a draft after plain runs the plain tokens' catch-up at a tenth of a depth each), `plain`, or
    `static` (depth 4). Each drafted token is accepted with p_accept, in order (a fixed pseudo-random sequence)."""
    token_s, points, depth_s, catch_up_s = MODEL_REGIMES[regime]
    nodes = sorted(points)

    def verify_s(n: int) -> float:  # the machine's truth: the profile's points, interpolated
        return float(numpy.interp(n, nodes, [points[k] for k in nodes]))

    controller = prepared(GoodputController(resolve_every=1, plain_chain=8), CostModel(dict(points)))
    controller.cost.seed_plain({1: token_s, 8: 8 * token_s})
    rng, made, seconds = random.Random(0), 0, 0.0
    for _ in range(sequences):
        if policy == "plain":
            made, seconds = made + tokens, seconds + tokens * token_s
            continue
        controller.prepare(controller._backend, [1, 2, 3])  # a new sequence (the profile is kept)
        position, fresh, missed = 0, True, 0
        while position < tokens:
            budget = controller.budget([]) if policy == "goodput" else Budget(4, 4)
            if not budget.max_nodes:
                steps = budget.plain_steps
                controller.observe(StepStats(0, 0, 0, verify_s=steps * token_s, step_s=steps * token_s,
                                             plain_steps=steps))
                position, seconds, missed = position + steps, seconds + steps * token_s, missed + steps
                continue
            depth = min(budget.max_depth, budget.max_nodes)
            draft_s = depth * depth_s + (catch_up_s if fresh else 0.1 * depth_s * missed)
            fresh, missed = False, 0
            tree = DraftTree.chain(list(range(1, depth + 1)))
            if policy == "goodput":
                tree = controller.trim(tree, draft_s)
            if isinstance(tree, Budget):  # the draft is spent; a plain run instead of its verify
                steps = tree.plain_steps
                controller.observe(StepStats(0, 0, 0, draft_s=draft_s, verify_s=steps * token_s,
                                             step_s=draft_s + steps * token_s, plain_steps=steps,
                                             proposed_nodes=depth))
                position, seconds, missed = position + steps, seconds + draft_s + steps * token_s, steps
                continue
            depth = max_depth(tree)
            accepted = next((k for k in range(depth) if rng.random() >= p_accept), depth)
            spec_s = verify_s(depth)
            if policy == "goodput":
                controller.observe(StepStats(depth, depth, accepted, draft_s, spec_s, draft_s + spec_s, tree,
                                             tuple(range(accepted)), proposed_nodes=depth))
            position, seconds = position + accepted + 1, seconds + draft_s + spec_s
        made += position
    return made / seconds


@pytest.mark.parametrize("p_accept", [0.7, 0.85, 0.95])
@pytest.mark.parametrize("regime", sorted(MODEL_REGIMES))
def test_goodput_with_a_draft_model_speculates_where_chains_pay_and_runs_plain_where_none_does(
        regime, p_accept, learn_every_step):
    """A draft model is no cheap drafter: goodput solves the depth from the learnt acceptance and the measured draft
    seconds. Where verifying costs about an AR step and a draft token half of one (bf16 on an AMX Xeon), chains pay:
    goodput speculates, well above plain decoding. Where a verify costs twice an AR step (float32 on 2 cores), only
    long accepted chains pay. Everywhere >= 0.94x the better of plain decoding and a static depth 4: a sequence's
    first draft pays the draft model's catch-up, and where speculating and plain runs are near even (float32, 0.85)
    the switches between them cost their catch-ups. Before the catch-up was kept out of the draft-cost line, the
    first draft's prefill made every depth past 1 look twice as dear: goodput drafted one token a step, 0.82-0.84x
    of static depth 4 at p = 0.95."""
    rates = {policy: simulate_model_drafter(policy, regime, p_accept) for policy in ("goodput", "plain", "static")}
    assert rates["goodput"] >= 0.94 * max(rates["plain"], rates["static"]), rates
    if regime == "bf16-amx":
        assert rates["goodput"] >= 1.15 * rates["plain"], rates


def test_online_line_forgets_a_slope_only_faded_points_give():
    """One old point at another x (a draft model's first draft, its prefill included) must not set the slope
    forever once every later point sits at one x: the line falls back to cost proportional to x."""
    line = OnlineLine(decay=0.95)
    line.add(4, 1.3)  # depth 4: 0.4 s of drafting + 0.9 s of catch-up
    for _ in range(200):
        line.add(1, 0.1)
    assert line(1) == pytest.approx(0.1, rel=1e-3) and line(4) == pytest.approx(0.4, rel=1e-3)
    mixed = OnlineLine(decay=0.95)
    for depth in [1, 4] * 50:
        mixed.add(depth, 0.05 + 0.1 * depth)
    assert mixed(8) == pytest.approx(0.85)  # depths really mixed: the fitted line, intercept kept
